"""merge sweep's per-point cost against the loop it replaces (`merge run` + `merge eval` per point).

1. Suite: a 3×3 ties grid (λ ∈ {0.5, 1, 1.5} × density ∈ {0.2, 0.5, 0.8}) on the offline suite's four tasks, every
   validation example. In memory: `merge sweep`'s per-point wall (merge of the touched tensors + patch + lm-eval on
   the loaded model + restore), from its leaderboard. The old loop: `merge run CONFIG` then `merge eval OUT_DIR`,
   two processes per point, timed on `--loop-points` of the grid's points.
2. 492M synthetic base (benchmarks/synthetic.py, built into benchmarks/work/ when missing): the merge part alone,
   ties density 0.5 of three rank-16 adapters: the touched tensors merged into memory (what a sweep point does)
   against `merge()` writing the checkpoint, both in this process, warm, median of --repeats.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep_bench.py --out benchmarks/results/sweep_bench
    # writes OUT.md and OUT.json; --skip-492m for the suite part only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE = REPO / "mergekit_lite" / "evaluation" / "suite"
TASKS = ["capitals", "add", "reverse", "sentiment"]
LAMBDAS, DENSITIES = [0.5, 1.0, 1.5], [0.2, 0.5, 0.8]


def _merge_cli() -> list[str]:
    return [sys.executable, "-m", "mergekit_lite.cli"]


def suite_part(work: Path, loop_points: int, batch_size: int, limit: int | None) -> dict[str, Any]:
    """Per-point walls: the sweep in memory vs merge run + merge eval (processes) on the same points."""
    base = {"base_model": str(SUITE / "base"),
            "adapters": [{"path": str(SUITE / "adapters" / t)} for t in TASKS],
            "eval": {"tasks": TASKS, "batch_size": batch_size, **({"limit": limit} if limit else {})}}
    sweep_config = work / "sweep.yaml"
    sweep_config.write_text(yaml.safe_dump({**base, "sweep": {"method": ["ties"], "parameters": {
        "lambda": LAMBDAS, "density": DENSITIES}}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run([*_merge_cli(), "sweep", str(sweep_config), "--out", str(work / "sweep"), "--no-progress",
                    "--device", "cpu"], check=True, env=env, stdout=subprocess.DEVNULL)
    sweep_wall = time.perf_counter() - started
    board = json.loads((work / "sweep" / "leaderboard.json").read_text())
    per_point = [p["merge_s"] + p["eval_s"] for p in board["points"]]
    merge_part = [p["merge_s"] for p in board["points"]]
    loop = []
    for index, (lam, density) in enumerate([(lam, d) for lam in LAMBDAS for d in DENSITIES][:loop_points]):
        config = work / f"point_{index}.yaml"
        out = work / f"point_{index}"
        merge_only = {k: v for k, v in base.items() if k != "eval"}  # merge run alone; merge eval scores it next
        config.write_text(yaml.safe_dump({**merge_only, "method": "ties", "parameters": {"lambda": lam, "density": density},
                                          "output": {"path": str(out)}}))
        started = time.perf_counter()
        subprocess.run([*_merge_cli(), "run", str(config), "--no-progress", "--device", "cpu"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        merged = time.perf_counter()
        subprocess.run([*_merge_cli(), "eval", str(out), "--tasks", ",".join(TASKS), "--out", str(work / f"eval_{index}"),
                        "--batch-size", str(batch_size), "--device", "cpu", *(["--limit", str(limit)] if limit else [])],
                       check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loop.append({"run_s": merged - started, "eval_s": time.perf_counter() - merged})
    loop_point = statistics.median(p["run_s"] + p["eval_s"] for p in loop)
    return {"points": len(per_point), "limit": limit, "sweep_wall_s": sweep_wall,
            "in_memory_per_point_s": statistics.median(per_point),
            "in_memory_merge_part_s": statistics.median(merge_part),
            "loop_per_point_s": loop_point, "loop": loop,
            "speedup": loop_point / statistics.median(per_point)}


def synthetic_part(repeats: int) -> dict[str, Any]:
    """The merge part alone on the 492M base: touched tensors into memory vs a written checkpoint."""
    import torch

    sys.path.insert(0, str(HERE))
    from synthetic import Shape, build

    from mergekit_lite import MergeConfig, merge
    from mergekit_lite.api import prepare
    from mergekit_lite.sweep.memory import merged_tensors

    shape = Shape()
    root = build(HERE / "work" / f"synthetic_h{shape.hidden}_l{shape.layers}_v{shape.vocab}", shape)
    out = Path(tempfile.mkdtemp(prefix="sweep_bench_ckpt_"))
    config = MergeConfig(base_model=str(root / "base"), method="ties", parameters={"density": 0.5},
                         adapters=[{"path": str(root / f"adapter_{i}")} for i in range(3)], output=str(out / "m"))
    memory, written = [], []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            with prepare(config) as prepared:
                tensors = merged_tensors(prepared, torch.device("cpu"))
            memory.append(time.perf_counter() - started)
            touched = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            started = time.perf_counter()
            merge(config, device="cpu", overwrite=True, progress=False)
            written.append(time.perf_counter() - started)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"parameters": shape.parameters(), "touched_bytes": touched, "in_memory_s": statistics.median(memory),
            "checkpoint_s": statistics.median(written), "repeats": repeats,
            "ratio": statistics.median(written) / statistics.median(memory)}


def render(result: dict[str, Any]) -> str:
    lines = ["# merge sweep: per-point cost", "",
             f"{result['date']}, {result['cpu_count']} CPU cores, CPU only, load average {result['load_average']:.1f} "
             "at the start (a shared machine: compare side by side only); `benchmarks/sweep_bench.py`.", ""]
    suite = result.get("suite")
    if suite:
        examples = f"first {suite['limit']} examples of each task" if suite.get("limit") else "every validation example"
        lines += [
             f"Suite, 3×3 ties grid ({suite['points']} points, four tasks, {examples}):", "",
             "| per point | wall |", "|---|---:|",
             f"| merge sweep, in memory (merge + patch + lm-eval + restore; median) | {suite['in_memory_per_point_s']:.2f} s |",
             f"| … of which the merge of the touched tensors | {suite['in_memory_merge_part_s']:.3f} s |",
             f"| `merge run` + `merge eval` (two processes; median of {len(suite['loop'])}) | {suite['loop_per_point_s']:.2f} s |",
             f"| speed-up per point | {suite['speedup']:.1f}× |", "",
             f"The whole sweep (start-up, references on validation, 9 points, the test-split table) took "
             f"{suite['sweep_wall_s']:.0f} s.", ""]
    synthetic = result.get("synthetic")
    if synthetic:
        lines += [f"492M synthetic base, ties density 0.5, three rank-16 adapters: the merge alone "
                  f"(median of {synthetic['repeats']}, in process, warm):", "",
                  "| merge of | wall |", "|---|---:|",
                  f"| touched tensors into memory ({synthetic['touched_bytes'] / 1e9:.2f} GB) | {synthetic['in_memory_s']:.2f} s |",
                  f"| the whole checkpoint written (`merge()`) | {synthetic['checkpoint_s']:.2f} s |",
                  f"| ratio | {synthetic['ratio']:.2f}× |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "sweep_bench"))
    parser.add_argument("--loop-points", type=int, default=3, help="grid points timed with merge run + merge eval")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=50, help="examples per task (0: every validation example)")
    parser.add_argument("--skip-492m", action="store_true")
    parser.add_argument("--skip-suite", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    try:
        result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                                  "load_average": os.getloadavg()[0]}
        if not args.skip_suite:
            result["suite"] = suite_part(work, args.loop_points, args.batch_size, args.limit or None)
        if not args.skip_492m:
            result["synthetic"] = synthetic_part(args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
