"""Benchmarks: ours vs PEFT vs mergekit vs the raw I/O floor, side by side in one run, each its own process.

    python benchmarks/run.py                      # the 492M setup of the benchmarks issue, 3 repeats
    python benchmarks/run.py --layers 2 --repeats 1 --tools ours,io   # a quick look
    python benchmarks/run.py --scaling            # peak RSS at 1x, 2x, 4x depth
    python benchmarks/run.py --depth 1,4 --tools io,ours --repeats 5   # the speed-at-scale table (1x and 4x)
    python benchmarks/run.py --tools io,ours --methods task_arithmetic,tsv_m,iso_c,iso_cts,knots,ties_core
    python benchmarks/run.py --tools ours,peft --methods task_arithmetic,adapter_exact,adapter_r16

Peers are installed into their own venv (benchmarks/work/peers-venv, torch pinned to 2.13.0), never into
the project's. Wall time and peak RSS come from /usr/bin/time (the child's maximum resident set). Cases run
in alternation, `--repeats` times; the table gives medians, and "× I/O floor" is the median of the paired
ratios (each run over the floor's run of the same round), which cancels slow drifts of a shared machine.
Results: benchmarks/results/*.md and *.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
PEERS = WORK / "peers-venv"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from synthetic import Shape, add_shape_arguments, build  # noqa: E402

#: case -> (method, parameters, output options); the first three are the default run
OUR_METHODS: dict[str, tuple[str, dict, dict]] = {
    "task_arithmetic": ("task_arithmetic", {}, {}),
    "linear": ("linear", {}, {}),
    "ties": ("ties", {"density": 0.5}, {}),
    "magnitude_prune": ("magnitude_prune", {"density": 0.5}, {}),
    "dare_ties": ("dare_ties", {"density": 0.5}, {}),
    "tsv_m": ("tsv_m", {}, {}),
    "iso_c": ("iso_c", {}, {}),
    "iso_cts": ("iso_cts", {}, {}),
    "knots": ("knots", {"density": 0.5}, {}),
    "ties_core": ("ties", {"density": 0.5, "space": "core"}, {}),
    "adapter_exact": ("task_arithmetic", {}, {"format": "peft"}),
    "adapter_r16": ("task_arithmetic", {}, {"format": "peft", "rank": 16}),
}
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare_ties"]
#: case -> PEFT's add_weighted_adapter combination (an adapter_* case saves PEFT's adapter, not a merged model)
PEFT_METHODS = {"task_arithmetic": "cat", "ties": "ties", "dare_ties": "dare_ties", "adapter_exact": "cat",
                "adapter_r16": "svd"}
MERGEKIT_METHODS = {"task_arithmetic", "ties", "dare_ties"}


def ensure_peers() -> Path:
    """The peers' venv with peft, transformers and mergekit 0.1.5 beside torch 2.13.0."""
    python = PEERS / "bin" / "python"
    if not (PEERS / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"]
        subprocess.run(pip, check=True)
        subprocess.run([*pip, "peft", "transformers", "mergekit==0.1.5"], check=True)
    return python


def timed(command: list[str], log: Path, timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run a command under /usr/bin/time: wall seconds, CPU seconds (user + system: less sensitive than the wall
    time to other work on a shared machine) and peak RSS bytes of the child (killed after `timeout` seconds)."""
    stats = log.with_suffix(".time")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%U %S %M", *command], stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    user, system, rss_kb = stats.read_text().split()[-3:]
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_bytes": int(rss_kb) * 1024}


def print_run(round_: int, label: str, result: dict) -> None:
    """One line per timed run, as every benchmark prints it."""
    print(f"[{round_}] {label}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
          f"{result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)


def paired_summary(runs: dict[str, list[dict]], baseline: str, name: str) -> dict[str, dict]:
    """Medians per label, and each run's wall and CPU over the baseline's run of the same round (paired ratios:
    the only comparison that means anything on a shared machine), as `vs_<name>` and `cpu_vs_<name>`."""
    by_round = {r["round"]: r for r in runs[baseline]}
    return {
        label: {
            "median_wall_s": statistics.median(r["wall_s"] for r in results),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in results),
            f"vs_{name}": statistics.median(r["wall_s"] / by_round[r["round"]]["wall_s"] for r in results),
            f"cpu_vs_{name}": statistics.median(r["cpu_s"] / by_round[r["round"]]["cpu_s"] for r in results),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "runs": results}
        for label, results in runs.items()
    }


def our_config(root: Path, case: str, out: Path, adapters: int) -> Path:
    method, parameters, output = OUR_METHODS[case]
    data = {
        "base_model": str(root / "base"), "method": method, "parameters": parameters,
        "adapters": [{"path": str(root / f"adapter_{i}")} for i in range(adapters)],
        "output": {"path": str(out), **output}, "seed": 0,
    }
    path = WORK / f"ours_{root.name}_{case}.yaml"  # per input folder: runs at two sizes at once never share one
    path.write_text(yaml.safe_dump(data))
    return path


def mergekit_config(root: Path, method: str, adapters: int) -> Path:
    params = {"weight": 1.0, **({"density": 0.5} if method != "task_arithmetic" else {})}
    data = {
        "merge_method": method, "base_model": str(root / "base"), "dtype": "bfloat16",
        "models": [{"model": f"{root / 'base'}+{root / f'adapter_{i}'}", "parameters": params} for i in range(adapters)],
    }
    path = WORK / f"mergekit_{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cases(root: Path, tools: list[str], methods: list[str], adapters: int,
          peers: Path | None) -> dict[str, tuple[list[str], list[Path]]]:
    """label -> (command, folders to delete before it runs, outside the timing) for every case."""
    merge = str(Path(sys.executable).with_name("merge"))
    found: dict[str, list[str]] = {}
    out = WORK / "out"
    if "io" in tools:
        found["I/O floor (safetensors read + write)"] = ([sys.executable, str(HERE / "peers" / "io_floor.py"),
                                                          str(root / "base"), str(out / "io")], [out / "io"])
    for method in methods:
        if "ours" in tools:
            config = our_config(root, method, out / f"ours_{method}", adapters)
            found[f"mergekit_lite {method}"] = ([merge, "run", str(config), "--no-progress", "--device", "cpu"],
                                                [out / f"ours_{method}"])
        if "peft" in tools and peers is not None and method in PEFT_METHODS:
            adapter_only = ["--adapter"] if method.startswith("adapter_") else []
            label = f"PEFT {PEFT_METHODS[method]}" + (" (adapter saved)" if adapter_only else "")
            found[label] = ([
                str(peers), str(HERE / "peers" / "peft_merge.py"), *adapter_only, str(root / "base"),
                str(out / f"peft_{method}"), PEFT_METHODS[method], *[str(root / f"adapter_{i}") for i in range(adapters)]],
                [out / f"peft_{method}"])
        if "mergekit" in tools and peers is not None and method in MERGEKIT_METHODS:
            cache = WORK / "lora-cache"
            found[f"mergekit {method}"] = ([
                str(PEERS / "bin" / "mergekit-yaml"), str(mergekit_config(root, method, adapters)),
                str(out / f"mergekit_{method}"), "--lora-merge-cache", str(cache), "--no-copy-tokenizer"],
                [cache, out / f"mergekit_{method}"])
    return found


def compare(ours: Path, theirs: Path, base: Path) -> dict:
    """Agreement of two merged checkpoints: ‖ours − theirs‖ / ‖ours − base‖ (relative error of the merged
    delta), and the share of entries that differ at all."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                found.update({name: (file, name) for name in handle.keys()})
        return found

    mine, peer, original = tensors(ours), tensors(theirs), tensors(base)
    error, delta, differing, total = 0.0, 0.0, 0, 0
    for name, (file, key) in mine.items():
        if name not in peer:
            continue
        with safe_open(str(file), "pt") as a, safe_open(str(peer[name][0]), "pt") as b, \
                safe_open(str(original[name][0]), "pt") as c:
            x, y, w = a.get_tensor(key).double(), b.get_tensor(name).double(), c.get_tensor(name).double()
        error += float(((x - y) ** 2).sum())
        delta += float(((x - w) ** 2).sum())
        differing += int((x != y).sum())
        total += x.numel()
    return {"relative_delta_error": (error / delta) ** 0.5 if delta else 0.0,
            "fraction_of_entries_differing": differing / max(total, 1)}


def adapter_deltas(folder: Path) -> dict:
    """Module path -> scale · B · A (float64) of a plain LoRA adapter folder (r, lora_alpha and the patterns)."""
    import re

    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))

    def pattern(table: dict, module: str, default: float) -> float:
        return next((v for k, v in table.items() if re.match(rf"(.*\.)?({k})$", module)), default)

    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        r = pattern(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        out[module] = scale * (b.double() @ a.double())
    return out


def adapter_error(candidate: Path, inputs: list[Path]) -> float:
    """‖Δ_candidate − Σᵢ τᵢ‖_F / ‖Σᵢ τᵢ‖_F over all modules: how far a merged adapter is from the exact sum."""
    exact: dict = {}
    for folder in inputs:
        for module, delta in adapter_deltas(folder).items():
            exact[module] = exact[module] + delta if module in exact else delta
    got = adapter_deltas(candidate)
    error = sum(float(((got.get(m, 0) - d) ** 2).sum()) for m, d in exact.items())
    norm = sum(float((d**2).sum()) for d in exact.values())
    return (error / norm) ** 0.5


def run(args: argparse.Namespace) -> dict:
    shape = Shape(args.hidden, args.intermediate, args.layers, args.vocab)
    root = build(WORK / f"synthetic_h{args.hidden}_l{args.layers}_v{args.vocab}", shape, args.adapters, args.rank)
    peers = ensure_peers() if {"peft", "mergekit"} & set(args.tools) else None
    found = cases(root, args.tools, args.methods, args.adapters, peers)
    if args.merge_command:  # e.g. a pinned snapshot of the package, so edits made meanwhile change no run
        merge = str(Path(sys.executable).with_name("merge"))
        for command, _ in found.values():
            if command[0] == merge:
                command[:1] = args.merge_command.split()
    runs: dict[str, list[dict]] = {label: [] for label in found}
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for label, (command, clear) in found.items():
            if label.startswith("mergekit ") and repeat >= args.peer_repeats:
                continue
            for folder in clear:
                shutil.rmtree(folder, ignore_errors=True)
            slug = label.replace(" ", "_").replace("/", "_")
            load = os.getloadavg()[0]
            result = timed(command, logs / f"{slug}.{repeat}.log") | {"load_before": load}
            runs[label].append(result)
            print(f"[{repeat}] {label}: {result['wall_s']:.1f} s, {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    floor_runs = next((r for label, r in runs.items() if label.startswith("I/O floor")), [])
    summary = {
        label: {"median_wall_s": statistics.median(r["wall_s"] for r in results),
                "median_cpu_s": statistics.median(r["cpu_s"] for r in results),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "runs": results,
                "paired_ratios": [r["wall_s"] / f["wall_s"] for r, f in zip(results, floor_runs)]}
        for label, results in runs.items() if results
    }
    for value in summary.values():
        value["median_paired_ratio"] = statistics.median(value["paired_ratios"]) if value["paired_ratios"] else None
    agreement = {}
    out = WORK / "out"
    for method in ("task_arithmetic", "ties"):
        if (out / f"ours_{method}").is_dir() and (out / f"mergekit_{method}").is_dir():
            agreement[f"{method}: ours vs mergekit"] = compare(out / f"ours_{method}", out / f"mergekit_{method}", root / "base")
    if (out / "ours_task_arithmetic").is_dir() and (out / "peft_task_arithmetic").is_dir():
        agreement["task_arithmetic: ours vs PEFT cat"] = compare(out / "ours_task_arithmetic", out / "peft_task_arithmetic",
                                                                 root / "base")
    inputs = [root / f"adapter_{i}" for i in range(args.adapters)]
    errors = {}
    for case in ("adapter_exact", "adapter_r16"):
        for tool, folder in (("mergekit_lite", out / f"ours_{case}"), ("PEFT", out / f"peft_{case}")):
            weights = folder / "merged" if (folder / "merged").is_dir() else folder  # PEFT saves in a subfolder
            if (weights / "adapter_model.safetensors").is_file():
                errors[f"{tool} {case}"] = adapter_error(weights, inputs)
    return {"shape": vars(shape) | {"parameters": shape.parameters()}, "adapters": args.adapters, "rank": args.rank,
            "repeats": args.repeats, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": summary, "agreement": agreement,
            "adapter_errors": errors}


def machine() -> str:
    """Cores, memory and CPU model of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        memory = 0
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, no GPU"


def table(report: dict) -> str:
    """Markdown table with ratios against the I/O floor."""
    results = report["results"]
    floor = next((v["median_wall_s"] for k, v in results.items() if k.startswith("I/O floor")), None)
    lines = [
        f"{report['shape']['parameters'] / 1e6:.0f}M-parameter bf16 Llama-shaped base (hidden {report['shape']['hidden']}, "
        f"intermediate {report['shape']['intermediate']}, {report['shape']['layers']} layers, vocab {report['shape']['vocab']}), "
        f"{report['adapters']} rank-{report['rank']} adapters on all linear layers; {report['machine']}; "
        f"median of {report['repeats']} run(s); × I/O floor: median of the paired ratios (same round).",
        "",
        "| tool, method | wall | × I/O floor | peak RSS |",
        "|---|---|---|---|",
    ]
    for label, value in results.items():
        paired = value.get("median_paired_ratio")
        ratio = f"{paired:.2f}" if paired is not None else (f"{value['median_wall_s'] / floor:.2f}" if floor else "-")
        lines.append(f"| {label} | {value['median_wall_s']:.1f} s | {ratio} | {value['peak_rss_bytes'] / 1e9:.2f} GB |")
    if report["agreement"]:
        lines += ["", "| agreement (same semantics, unit weights) | ‖ours − theirs‖ / ‖merged delta‖ | entries differing |",
                  "|---|---|---|"]
        for label, value in report["agreement"].items():
            lines.append(f"| {label} | {value['relative_delta_error']:.2%} | {value['fraction_of_entries_differing']:.2%} |")
    if report.get("adapter_errors"):
        lines += ["", "| merged adapter | ‖Δ − Σ τᵢ‖_F / ‖Σ τᵢ‖_F |", "|---|---|"]
        lines += [f"| {label} | {value:.4f} |" for label, value in report["adapter_errors"].items()]
    return "\n".join(lines) + "\n"


def side_by_side(reports: list[dict]) -> str:
    """One row per case, one column group per depth: wall, paired ratio to the floor, peak RSS."""
    labels = list(dict.fromkeys(label for r in reports for label in r["results"]))
    head = ["tool, method"]
    for r in reports:
        size = f"{r['shape']['layers']} layers, {r['shape']['parameters'] / 1e9:.2f}B"
        head += [f"{size}: wall", "× floor", "CPU s", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [label]
        for r in reports:
            value = r["results"].get(label)
            if value is None:
                cells += ["-", "-", "-", "-"]
                continue
            paired = value.get("median_paired_ratio")
            cpu = value.get("median_cpu_s")
            cells += [f"{value['median_wall_s']:.1f} s", f"{paired:.2f}" if paired is not None else "-",
                      "-" if cpu is None else f"{cpu:.1f}", f"{value['peak_rss_bytes'] / 1e9:.2f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-repeats", type=int, default=1, help="repeats for mergekit (slow)")
    parser.add_argument("--tools", type=lambda s: s.split(","), default=["io", "ours", "peft", "mergekit"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=DEFAULT_METHODS,
                        help=f"cases, from: {', '.join(OUR_METHODS)}")
    parser.add_argument("--scaling", action="store_true", help="ours and PEFT at 1x, 2x, 4x depth")
    parser.add_argument("--depth", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="depth factors to run side by side, e.g. 1,4 (layers x factor)")
    parser.add_argument("--name", default=None, help="results file stem")
    parser.add_argument("--merge-command", default=None,
                        help="command run in place of the venv's `merge` (e.g. 'python pinned_merge.py')")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.scaling or args.depth:
        reports = []
        for factor in args.depth or (1, 2, 4):
            step = argparse.Namespace(**{**vars(args), "layers": args.layers * factor})
            reports.append(run(step))
        text = "\n".join(table(r) for r in reports) + "\n" + side_by_side(reports)
        stem = args.name or ("depth_" + "_".join(map(str, args.depth)) if args.depth else "scaling")
        (RESULTS / f"{stem}.json").write_text(json.dumps(reports, indent=2))
    else:
        report = run(args)
        text = table(report)
        stem = args.name or f"bench_{round(report['shape']['parameters'] / 1e6)}M"
        (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    shutil.rmtree(WORK / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
