"""Full fine-tuned checkpoints as inputs (#16): ours vs mergekit 0.1.5, side by side, on the 492M synthetic base.

    .venv/bin/python benchmarks/full_models_bench.py                    # 1x: ours vs mergekit, then ours at 2x, 4x
    .venv/bin/python benchmarks/full_models_bench.py --repeats 3 --mergekit-repeats 1 --depths 16,32
    .venv/bin/python benchmarks/full_models_bench.py --depths "" --tools ours   # a quick look at ours alone

The inputs are "fine-tunes" of the synthetic bf16 base (benchmarks/synthetic.py): every tensor W becomes
W + N(0, (0.01·rms(W))²), seeded per model, written as sharded safetensors (~400 MB shards, an index) with the
base's config.json and any tokenizer files copied, skipped when already there. The scale: a fine-tune moves the
weights of a pretrained model by about 0.1-1% of their norm (full fine-tunes of Llama/Mistral-class models against
their bases measure ‖W_ft − W‖/‖W‖ ≈ 1e-3..1e-2; instruction tunes sit near the upper end), and at 1% of rms the
noise is ~2-3 bf16 steps of a typical entry: the stored fine-tune differs from the base in most entries, by a few
rounding steps, as real bf16 fine-tunes do. The noise is dense (every entry of every tensor, norms included), so
nothing can be skipped: every tensor of every model is read and merged.

Methods: task_arithmetic (weight 1 each) and ties (density 0.5, weight 1 each) over `--models` fine-tunes (3), and
slerp (t 0.5) between two fine-tunes (mergekit's form: base_model is the first, models are both). mergekit runs
`mergekit-yaml CONFIG OUT --no-copy-tokenizer` from the scratch venv benchmarks/work/peers-venv (see run.py's
ensure_peers); ours runs `merge run` on the config `merge convert` makes from the same mergekit YAML (so both
compute the same definitions: `models:` entries, mergekit's TIES normalisation), alternating with mergekit in
each round, each its own process under /usr/bin/time (wall, peak RSS of the child). The depth rows run ours
only at 2x and 4x the layers (the same fine-tune recipe on the 16- and 32-layer bases).

Agreement with mergekit (mergekit computes in bf16 when `dtype: bfloat16`, we in float32 rounded once): per
tensor the largest |ours − mergekit| in bf16 steps at that tensor's largest magnitude (as mergekit_compat.py), the
largest per-entry distance in bf16 steps (adjacent representable values), the share of entries that differ,
and ‖ours − mergekit‖ / ‖mergekit − W‖ (relative error of the merged change).

`--baseline DIR` times an earlier checkout of ours too (its `merge run` under PYTHONPATH=DIR, built in place with
`setup.py build_ext --inplace`; e.g. `git worktree add /tmp/old HEAD~3`), in the same rounds as ours: before and
after a change, paired under the same load. Each run records the 1-minute load average before it (the machine
is shared).

Results: benchmarks/results/full_models.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "results"
PEERS = WORK / "peers-venv" / "bin"
sys.path.insert(0, str(HERE))
from run import machine, timed  # noqa: E402
from synthetic import Shape, build_base  # noqa: E402

#: relative size of the fine-tune noise: N(0, (NOISE · rms(W))²) per tensor (see the docstring)
NOISE = 0.01
SHARD_BYTES = 400 * 10**6
METHODS = ("task_arithmetic", "ties", "slerp")
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json")


def root_for(layers: int) -> Path:
    return WORK / f"synthetic_h2048_l{layers}_v32000"


def build_finetune(base: Path, folder: Path, seed: int) -> Path:
    """base + dense seeded noise per tensor, as sharded bf16 safetensors (skipped when the index is there)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    names = list(weight_map)  # checkpoint order
    generator = torch.Generator().manual_seed(7919 * (seed + 1))
    shards: list[list[str]] = [[]]
    size = 0
    handles = {file: safe_open(str(base / file), "pt") for file in sorted(set(weight_map.values()))}
    sizes = {}
    for name in names:
        info = handles[weight_map[name]].get_slice(name)
        numel = 1
        for d in info.get_shape():
            numel *= d
        sizes[name] = numel * 2
        if shards[-1] and size + sizes[name] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    out_map, total = {}, 0
    for number, members in enumerate(shards):
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in members:
            w = handles[weight_map[name]].get_tensor(name).float()
            rms = float(w.pow(2).mean().sqrt())
            noise = torch.randn(w.shape, generator=generator)
            tensors[name] = w.add_(noise, alpha=NOISE * rms).to(torch.bfloat16)
            del noise
            out_map[name] = file
            total += sizes[name]
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    for name in COPIED:
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": out_map}, indent=2))
    return folder


def ensure_inputs(layers: int, models: int) -> tuple[Path, list[Path]]:
    """The base at this depth (built when missing) and `models` fine-tunes of it."""
    root = root_for(layers)
    base = root / "base"
    if not (base / "model.safetensors.index.json").is_file():
        build_base(base, Shape(layers=layers))
    finetunes = []
    for seed in range(models):
        print(f"fine-tune {seed} of {base} ...", flush=True)
        finetunes.append(build_finetune(base, root / f"finetune_{seed}", seed))
    return base, finetunes


def mergekit_yaml(method: str, base: Path, finetunes: list[Path]) -> dict:
    """mergekit's config for one case."""
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(finetunes[0]), "dtype": "bfloat16",
                "models": [{"model": str(finetunes[0])}, {"model": str(finetunes[1])}], "parameters": {"t": 0.5}}
    params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(f), "parameters": params} for f in finetunes]}


def write_configs(tag: str, method: str, base: Path, finetunes: list[Path], out: Path) -> tuple[Path, Path]:
    """(mergekit's YAML, ours converted from it by `merge convert`)."""
    configs = WORK / "full_models"
    configs.mkdir(parents=True, exist_ok=True)
    theirs = configs / f"mergekit_{tag}_{method}.yml"
    theirs.write_text(yaml.safe_dump(mergekit_yaml(method, base, finetunes), sort_keys=False))
    converted = subprocess.run([str(REPO / ".venv" / "bin" / "merge"), "convert", str(theirs)], capture_output=True,
                               text=True, check=True).stdout
    data = yaml.safe_load(converted)
    data["output"]["path"] = str(out)
    assert data.get("models") and not data.get("adapters"), data
    ours = configs / f"ours_{tag}_{method}.yaml"
    ours.write_text(yaml.safe_dump(data, sort_keys=False))
    return theirs, ours


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int16) -> integers whose difference counts representable steps across zero."""
    wide = bits.to(torch.int32)
    return torch.where(wide < 0, -(wide & 0x7FFF), wide)


def compare(ours: Path, theirs: Path, base: Path) -> dict:
    """Agreement of two bf16 checkpoints, tensor by tensor (see the docstring)."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                found.update({name: file for name in handle.keys()})
        return found

    mine, peer, original = files(ours), files(theirs), files(base)
    worst_steps, worst_ulps, differing, total, error, change = 0.0, 0, 0, 0, 0.0, 0.0
    for name, file in mine.items():
        with safe_open(str(file), "pt") as a, safe_open(str(peer[name]), "pt") as b, \
                safe_open(str(original[name]), "pt") as c:
            x, y, w = a.get_tensor(name), b.get_tensor(name), c.get_tensor(name)
        assert x.dtype == y.dtype == torch.bfloat16, (name, x.dtype, y.dtype)
        delta = (x.double() - y.double()).abs()
        step = float(y.abs().max()) * 2.0 ** -7 or 1.0
        worst_steps = max(worst_steps, float(delta.max()) / step)
        ulps = (_ordered(x.view(torch.int16)) - _ordered(y.view(torch.int16))).abs()
        worst_ulps = max(worst_ulps, int(ulps.max()))
        differing += int((delta > 0).sum())
        total += delta.numel()
        error += float((delta ** 2).sum())
        change += float(((y.double() - w.double()) ** 2).sum())
    return {"max_steps_at_tensor_max": worst_steps, "max_entry_steps": worst_ulps,
            "differing_share": differing / max(total, 1), "relative_change_error": (error / change) ** 0.5}


def run_case(label: str, command: list[str], out: Path, logs: Path, repeat: int,
             env: dict[str, str] | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    result = {**timed(command, logs / f"{label.replace(' ', '_')}.{repeat}.log", env=env), "load_1m": load}
    print(f"[{repeat}] {label}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
          f"{result['peak_rss_bytes'] / 1e9:.3f} GB (load {load:.2f})", flush=True)
    return result


def summarize(runs: list[dict]) -> dict:
    return {"median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "runs": runs}


def load_range(runs: list[dict]) -> str:
    """The 1-minute load averages seen before these runs, as 'a-b' (empty for runs that did not record it)."""
    loads = [r["load_1m"] for r in runs if "load_1m" in r]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--models", type=int, default=3, help="fine-tunes merged by task_arithmetic and ties")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tools", default="ours,mergekit")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of ours")
    parser.add_argument("--mergekit-repeats", type=int, default=1, help="rounds of mergekit (it is slow)")
    parser.add_argument("--depths", default="16,32", help="ours alone at these layer counts too ('' for none)")
    parser.add_argument("--depth-repeats", type=int, default=1)
    parser.add_argument("--keep-depth-inputs", action="store_true",
                        help="keep the 2x/4x fine-tunes (deleted after their runs by default: ~10 GB)")
    parser.add_argument("--name", default="full_models")
    parser.add_argument("--depth-from", type=Path, default=None,
                        help="take the depth rows from this JSON (a --repeats 0 --mergekit-repeats 0 run done alongside)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json (and --depth-from)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier checkout of ours (built in place), timed in the same rounds as ours")
    parser.add_argument("--baseline-label", default="", help="what the baseline is (a commit), for the report")
    parser.add_argument("--note", default="", help="a paragraph for the report (e.g. where the depth rows come from)")
    args = parser.parse_args()
    if args.render:
        report = json.loads((RESULTS / f"{args.name}.json").read_text())
        if args.depth_from is not None:
            report["depth"] = json.loads(args.depth_from.read_text())["depth"]
            (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        args.repeats, args.mergekit_repeats = report["repeats"], report["mergekit_repeats"]
        (RESULTS / f"{args.name}.md").write_text(markdown(report, [m for m in args.methods.split(",") if m], args))
        print((RESULTS / f"{args.name}.md").read_text())
        return
    methods = [m for m in args.methods.split(",") if m]
    tools = args.tools.split(",")
    merge = str(REPO / ".venv" / "bin" / "merge")
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = WORK / "out" / args.name

    base, finetunes = ensure_inputs(args.layers, args.models)
    cases: dict[str, tuple[list[str], Path]] = {}
    for method in methods:
        inputs = finetunes[:2] if method == "slerp" else finetunes
        theirs, ours = write_configs(f"l{args.layers}", method, base, inputs, out / f"ours_{method}")
        if "ours" in tools:
            cases[f"ours {method}"] = ([merge, "run", str(ours), "--no-progress", "--device", "cpu"],
                                       out / f"ours_{method}")
        if args.baseline is not None:
            cases[f"baseline {method}"] = ([merge, "run", str(ours), "--no-progress", "--device", "cpu", "--out",
                                            str(out / f"baseline_{method}")], out / f"baseline_{method}")
        if "mergekit" in tools:
            cases[f"mergekit {method}"] = ([str(PEERS / "mergekit-yaml"), str(theirs), str(out / f"mergekit_{method}"),
                                            "--no-copy-tokenizer"], out / f"mergekit_{method}")
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    baseline_env = {"PYTHONPATH": str(args.baseline.resolve())} if args.baseline is not None else None
    for repeat in range(max(args.repeats, args.mergekit_repeats)):
        for label, (command, folder) in cases.items():  # per method: ours, the baseline, then mergekit
            if repeat >= (args.mergekit_repeats if label.startswith("mergekit") else args.repeats):
                continue
            env = baseline_env if label.startswith("baseline") else None
            runs[label].append(run_case(label, command, folder, logs, repeat, env))
    report: dict = {"machine": machine(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    "noise": NOISE, "models": args.models, "layers": args.layers,
                    "repeats": args.repeats, "mergekit_repeats": args.mergekit_repeats,
                    "baseline": args.baseline_label if args.baseline is not None else None, "note": args.note,
                    "cases": {label: summarize(r) for label, r in runs.items() if r}, "agreement": {}, "depth": {}}
    for method in methods:
        ours, theirs = out / f"ours_{method}", out / f"mergekit_{method}"
        if ours.is_dir() and theirs.is_dir():
            reference = finetunes[0] if method == "slerp" else base
            report["agreement"][method] = compare(ours, theirs, reference)
            print(f"agreement {method}: {report['agreement'][method]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    for layers in [int(d) for d in args.depths.split(",") if d]:
        depth_base, depth_finetunes = ensure_inputs(layers, args.models)
        for method in methods:
            inputs = depth_finetunes[:2] if method == "slerp" else depth_finetunes
            folder = out / f"ours_l{layers}_{method}"
            _, ours = write_configs(f"l{layers}", method, depth_base, inputs, folder)
            label = f"ours {method} l{layers}"
            results = [run_case(label, [merge, "run", str(ours), "--no-progress", "--device", "cpu"], folder, logs, r)
                       for r in range(args.depth_repeats)]
            shutil.rmtree(folder, ignore_errors=True)
            report["depth"].setdefault(method, {})[str(layers)] = summarize(results)
        if not args.keep_depth_inputs:
            for folder in depth_finetunes:
                shutil.rmtree(folder, ignore_errors=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(report, methods, args))
    print((RESULTS / f"{args.name}.md").read_text())


def markdown(report: dict, methods: list[str], args: argparse.Namespace) -> str:
    cases = report["cases"]
    every_run = [r for case in cases.values() for r in case["runs"]]
    loads = load_range(every_run)
    when = f"Measured {report['date']}" if report.get("date") else "Measured"
    lines = [f"# Full fine-tunes as inputs: ours vs mergekit 0.1.5 ({args.layers} layers, "
             f"{Shape(layers=args.layers).parameters() / 1e6:.0f}M parameters, bf16)", "",
             f"Machine: {report['machine']}; shared with other work while measuring, so times are noisy (medians; "
             f"ours {args.repeats}x, mergekit {args.mergekit_repeats}x, alternating per method). "
             + (f"{when}, 1-minute load average {loads} before the runs. " if loads else "")
             + f"Inputs: {args.models} fine-tunes W + N(0, ({NOISE}·rms W)²) per tensor (slerp: the first two), "
             "see benchmarks/full_models_bench.py.", "",
             "| method | ours wall | mergekit wall | mergekit / ours (wall) | ours CPU | mergekit CPU | "
             "mergekit / ours (CPU) | ours peak RSS | mergekit peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        mine, theirs = cases.get(f"ours {method}"), cases.get(f"mergekit {method}")
        if mine is None:
            continue
        ratio = f"{theirs['median_wall_s'] / mine['median_wall_s']:.1f}x" if theirs else ""
        cpu_ratio = f"{theirs['median_cpu_s'] / mine['median_cpu_s']:.1f}x" if theirs else ""
        their_wall = f"{theirs['median_wall_s']:.1f} s" if theirs else ""
        their_cpu = f"{theirs['median_cpu_s']:.1f} s" if theirs else ""
        their_rss = f"{theirs['peak_rss_bytes'] / 1e9:.2f} GB" if theirs else ""
        lines.append(f"| {method} | {mine['median_wall_s']:.1f} s | {their_wall} | {ratio} | {mine['median_cpu_s']:.1f} s "
                     f"| {their_cpu} | {cpu_ratio} | {mine['peak_rss_bytes'] / 1e9:.2f} GB | {their_rss} |")
    baselines = [m for m in methods if f"baseline {m}" in cases and f"ours {m}" in cases]
    if baselines:
        lines += ["", f"Before this change ({report.get('baseline') or 'baseline checkout'}), timed in the same rounds "
                  "as ours (paired, same load):", "",
                  "| method | before wall | ours wall | before / ours (wall) | before CPU | ours CPU | before peak RSS "
                  "| ours peak RSS | mergekit / before (wall) |", "|---|---|---|---|---|---|---|---|---|"]
        for method in baselines:
            old, mine, theirs = cases[f"baseline {method}"], cases[f"ours {method}"], cases.get(f"mergekit {method}")
            ratio = f"{theirs['median_wall_s'] / old['median_wall_s']:.1f}x" if theirs else ""
            lines.append(f"| {method} | {old['median_wall_s']:.2f} s | {mine['median_wall_s']:.2f} s | "
                         f"{old['median_wall_s'] / mine['median_wall_s']:.2f}x | {old['median_cpu_s']:.2f} s | "
                         f"{mine['median_cpu_s']:.2f} s | {old['peak_rss_bytes'] / 1e9:.2f} GB | "
                         f"{mine['peak_rss_bytes'] / 1e9:.2f} GB | {ratio} |")
    if report.get("note"):
        lines += ["", report["note"]]
    if report.get("depth"):
        depths = sorted({int(d) for v in report["depth"].values() for d in v})
        lines += ["", "Ours at depth (peak RSS; wall):", "",
                  "| method | " + " | ".join(f"{d // args.layers}x ({d} layers)" for d in [args.layers, *depths]) + " |",
                  "|---|" + "---|" * (len(depths) + 1)]
        for method in methods:
            mine = cases.get(f"ours {method}")
            cells = [f"{mine['peak_rss_bytes'] / 1e9:.2f} GB; {mine['median_wall_s']:.1f} s" if mine else ""]
            for d in depths:
                value = report["depth"].get(method, {}).get(str(d))
                cells.append(f"{value['peak_rss_bytes'] / 1e9:.2f} GB; {value['median_wall_s']:.1f} s" if value else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report.get("agreement"):
        lines += ["", "Agreement with mergekit's output (mergekit computes in bf16 with `dtype: bfloat16`; we compute "
                  "in float32 and round once). The per-entry column counts representable bf16 values between the two "
                  "entries, so it is dominated by entries near zero (a cancellation giving 1e-9 here and 0 there is "
                  "thousands of steps); the tensor-max column is the one comparable with mergekit_compat.md. TIES "
                  "differs by its trim set: bf16 fine-tunes make τ quantized, so many entries tie at the k-th "
                  "magnitude; we keep exactly k (lower flat index first, SEMANTICS §3), mergekit ranks in bf16.", "",
                  "| method | max diff (bf16 steps at the tensor's max) | max diff per entry (bf16 steps) | "
                  "entries that differ | ‖ours − mergekit‖ / ‖mergekit − W‖ |", "|---|---|---|---|---|"]
        for method, value in report["agreement"].items():
            lines.append(f"| {method} | {value['max_steps_at_tensor_max']:.2f} | {value['max_entry_steps']} | "
                         f"{100 * value['differing_share']:.2f}% | {value['relative_change_error']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if platform.system() != "Linux":
        print("warning: /usr/bin/time -f is GNU time (Linux)", file=sys.stderr)
    main()
