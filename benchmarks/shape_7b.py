"""The 7B shape (#27): a seeded 7B-class bf16 base + three rank-16 adapters, ours against the I/O floor in paired rounds.

    .venv/bin/python benchmarks/shape_7b.py                      # 32 layers (5.9B, 11.9 GB bf16), 2 rounds
    .venv/bin/python benchmarks/shape_7b.py --layers 8 --rounds 3 # the 7B width at a quarter of the depth
    .venv/bin/python benchmarks/shape_7b.py --tools io,ours,peft,mergekit --peer-rounds 1
    .venv/bin/python benchmarks/shape_7b.py --keep --variant "before=python /tmp/before/merge.py"  # A/B, same rounds

The base is Llama-shaped at the width users merge (hidden 4096, MLP 11008, 32 heads / 8 KV heads — the same tensor
shapes as 16 / 4 heads of 256 —, vocab 32000), built on demand by benchmarks/synthetic.py (streamed, matrices cut from one seeded
Gaussian pool: `build_base(tiled=True)`) into
benchmarks/work/shape_7b_l{layers} (never committed) and deleted afterwards unless `--keep`. Disk: the base
(2 bytes a parameter), the adapters (~0.1 GB) and one output at a time (every output is deleted before each
case, outside the timing): about 25 GB at 32 layers; the script refuses to start with less free.

Each round runs the I/O floor (peers/io_floor.py: safetensors read + write, shard by shard), then each method of
ours (`merge run`; with `--variant`, other builds of ours too, their order rotated each round), each its own process under /usr/bin/time: wall, CPU seconds (user + system), peak RSS. Before
each case the previous output is deleted and the page cache's dirty pages are flushed (`sync`, outside the
timing), so no case pays for the previous one's writeback. "× floor" is the median over rounds of wall / the
floor's wall in the same round (run.py's paired ratios). The load average (`os.getloadavg`) is recorded beside
every case: on a shared machine, read the CPU seconds.

Results: benchmarks/results/shape_7b[_l{layers}].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import WORK, cases, ensure_peers, machine, timed  # noqa: E402
from synthetic import Shape, build  # noqa: E402

RESULTS = HERE / "results"


def shape_of(args: argparse.Namespace) -> Shape:
    return Shape(args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads)


def disk_needed(shape: Shape, adapters: int, rank: int) -> int:
    """Bytes on disk: the bf16 base, the float32 adapters and one output as large as the base."""
    base = 2 * shape.parameters()
    adapter = 0
    for layer in range(shape.layers):
        adapter += sum(4 * rank * (o + i) for o, i in shape.linear_shapes(layer).values())
    return 2 * base + adapters * adapter


def run(args: argparse.Namespace) -> dict:
    shape = shape_of(args)
    root = WORK / ("shape_7b" if args.layers == 32 else f"shape_7b_l{args.layers}")
    need = disk_needed(shape, args.adapters, args.rank)
    built = (root / "base" / "model.safetensors.index.json").is_file()
    free = shutil.disk_usage(WORK.parent if not WORK.exists() else WORK).free
    if need - (2 * shape.parameters() if built else 0) > free:
        raise SystemExit(f"shape_7b: needs {need / 1e9:.1f} GB of disk under {WORK}, {free / 1e9:.1f} GB free")
    print(f"{shape.parameters() / 1e9:.2f}B parameters, {2 * shape.parameters() / 1e9:.1f} GB bf16; "
          f"disk needed {need / 1e9:.1f} GB ({free / 1e9:.0f} GB free)", flush=True)
    started = time.perf_counter()
    build(root, shape, args.adapters, args.rank, tiled=True)
    build_s = time.perf_counter() - started
    print(f"inputs ready in {build_s:.0f} s", flush=True)
    peers = ensure_peers() if {"peft", "mergekit"} & set(args.tools) else None
    found = cases(root, args.tools, args.methods, args.adapters, peers)
    if args.merge_command:  # e.g. a pinned snapshot of the package, so edits made meanwhile change no run
        merge = str(Path(sys.executable).with_name("merge"))
        for command, _ in found.values():
            if command and command[0] == merge:
                command[:1] = args.merge_command.split()
    for variant in args.variant:  # another build of ours, run in the same rounds: before/after on equal terms
        name, _, runner = variant.partition("=")
        if not runner:
            raise SystemExit(f"shape_7b: --variant wants NAME=COMMAND, got {variant!r}")
        for label, (command, clear) in list(found.items()):
            if label.startswith("mergekit_lite ") and " [" not in label and "run" in command:
                at = command.index("run")  # [merge..., "run", config, flags...]
                out = WORK / "out" / f"{clear[0].name}_{name}"
                config = WORK / f"{Path(command[at + 1]).stem}_{name}.yaml"
                config.write_text(Path(command[at + 1]).read_text().replace(str(clear[0]), str(out)))
                found[f"{label} [{name}]"] = ([*runner.split(), "run", str(config), *command[at + 2:]], [out])
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {label: [] for label in found}
    ours = [label for label in found if label.startswith("mergekit_lite ")]
    for repeat in range(args.rounds):
        # the floor first, then ours rotated by one each round: no build of ours always runs right after the floor
        turn = repeat % len(ours) if ours else 0
        order = [label for label in found if label not in ours] + ours[turn:] + ours[:turn]
        for label in order:
            command, clear = found[label]
            peer = label.startswith(("PEFT ", "mergekit "))
            if peer and repeat >= args.peer_rounds:
                continue
            # every case's output (one 12 GB output on disk at a time; each case starts from the same page cache:
            # the base as the previous case left it, no output of another case)
            for folder in {f for _, others in found.values() for f in others}:
                shutil.rmtree(folder, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            load = os.getloadavg()[0]
            slug = "7b_" + label.replace(" ", "_").replace("/", "_")
            try:
                result = timed(command, logs / f"{slug}.{repeat}.log", timeout=args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                print(f"[{repeat}] {label}: {error}", flush=True)
                runs[label].append({"failed": str(error), "load_before": load})
                continue
            result["load_before"] = load
            result["load_after"] = os.getloadavg()[0]
            runs[label].append(result)
            print(f"[{repeat}] {label}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
                  f"{result['peak_rss_bytes'] / 1e9:.2f} GB (load {load:.1f})", flush=True)
    for folder in {f for _, clear in found.values() for f in clear}:
        shutil.rmtree(folder, ignore_errors=True)
    floor = next((r for label, r in runs.items() if label.startswith("I/O floor")), [])
    summary = {}
    for label, results in runs.items():
        done = [r for r in results if "wall_s" in r]
        if not done:
            summary[label] = {"failed": [r.get("failed") for r in results]}
            continue
        paired = [r["wall_s"] / f["wall_s"] for r, f in zip(results, floor) if "wall_s" in r and "wall_s" in f]
        summary[label] = {
            "median_wall_s": statistics.median(r["wall_s"] for r in done),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in done),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
            "paired_ratios": paired, "median_paired_ratio": statistics.median(paired) if paired else None,
            "runs": results,
        }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"shape": vars(shape) | {"parameters": shape.parameters()}, "adapters": args.adapters, "rank": args.rank,
            "rounds": args.rounds, "peer_rounds": args.peer_rounds, "machine": machine(), "disk_needed_bytes": need,
            "build_s": build_s, "merge_command": args.merge_command, "variants": args.variant, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": summary}


def table(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"# {s['parameters'] / 1e9:.2f}B-parameter bf16 Llama-shaped base (hidden {s['hidden']}, MLP "
        f"{s['intermediate']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads, vocab "
        f"{s['vocab']}), {report['adapters']} rank-{report['rank']} adapters on all linear layers",
        "",
        f"{report['machine']}; {report['date']}; {report['rounds']} paired round(s) (peers: {report['peer_rounds']}); "
        f"disk needed {report['disk_needed_bytes'] / 1e9:.1f} GB. × floor: median of wall / the floor's wall in the "
        "same round. Load: the 1-minute load average when each case started (2 cores).",
        *([""] + [f"Ours run as `{report['merge_command']}`."] if report.get("merge_command") else []),
        *([f"Variant [{v.partition('=')[0]}]: `{v.partition('=')[2]}`." for v in report.get("variants", [])]),
        "",
        "| tool, method | wall | × floor | per round | CPU s | peak RSS | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, value in report["results"].items():
        if "failed" in value:
            lines.append(f"| {label} | failed: {value['failed'][0]} | | | | | |")
            continue
        ratio = value["median_paired_ratio"]
        loads = [r["load_before"] for r in value["runs"] if "load_before" in r]
        rounds = " ".join(f"{r:.2f}" for r in value["paired_ratios"])
        lines.append(f"| {label} | {value['median_wall_s']:.1f} s | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{rounds} | {value['median_cpu_s']:.1f} | {value['peak_rss_bytes'] / 1e9:.2f} GB | "
                     f"{min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer-rounds", type=int, default=1)
    parser.add_argument("--tools", type=lambda s: s.split(","), default=["io", "ours"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["task_arithmetic", "ties"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is killed")
    parser.add_argument("--merge-command", default=None,
                        help="command run in place of the venv's `merge` (e.g. 'python pinned_merge.py')")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=COMMAND",
                        help="also run each method of ours with COMMAND in place of `merge` (e.g. a snapshot of the "
                             "package before a change), labelled [NAME], in the same rounds; repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs (deleted by default)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    report = run(args)
    stem = args.name or ("shape_7b" if args.layers == 32 else f"shape_7b_l{args.layers}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{stem}.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
