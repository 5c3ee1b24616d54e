"""`merge inspect` beside our task_arithmetic `merge run` on the 492M synthetic base with 3 rank-16 adapters.

    python benchmarks/inspect_bench.py                 # 3 rounds
    python benchmarks/inspect_bench.py --rounds 5

Each case is its own process under /usr/bin/time (wall, CPU seconds, peak RSS), as benchmarks/run.py measures.
The cases run in rounds, each round in a rotated order, so that a busy stretch of a shared machine falls on
different cases; "× task_arithmetic" is the median over rounds of each round's wall over the task_arithmetic
run of the same round (paired). The conflict share is conflicts_s over the measured parts of inspect.json's
timings (seconds summed over inspect's worker threads). Configs and outputs live in work/inspect_bench/, apart
from benchmarks/run.py's. Results: benchmarks/results/inspect_492M.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import RESULTS, WORK, machine, paired_summary, print_run, timed  # noqa: E402
from synthetic import Shape, build  # noqa: E402

BASELINE = "merge run task_arithmetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", type=int, default=1_000_000, help="entries per tensor for the sampled case")
    args = parser.parse_args()
    shape = Shape(2048, 5632, 8, 32000)
    root = build(WORK / "synthetic_h2048_l8_v32000", shape, 3, 16)  # reused when present
    merge = str(Path(sys.executable).with_name("merge"))
    work = WORK / "inspect_bench"
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    adapters = [{"path": str(root / f"adapter_{i}")} for i in range(3)]
    inspect_config = work / "inspect_492M.yaml"
    inspect_config.write_text(yaml.safe_dump({"base_model": str(root / "base"), "adapters": adapters}))
    merge_config = work / "task_arithmetic.yaml"
    merge_config.write_text(yaml.safe_dump({"base_model": str(root / "base"), "method": "task_arithmetic",
                                            "adapters": adapters, "output": {"path": str(out / "task_arithmetic")},
                                            "seed": 0}))

    def inspect(folder: str, *extra: str) -> tuple[list[str], Path]:
        return ([merge, "inspect", str(inspect_config), "--out", str(out / folder), "--no-progress", "--device", "cpu",
                 *extra], out / folder)

    cases = {
        BASELINE: ([merge, "run", str(merge_config), "--no-progress", "--device", "cpu"], out / "task_arithmetic"),
        "merge inspect (exact)": inspect("inspect_exact"),
        "merge inspect --no-plots (exact)": inspect("inspect_noplots", "--no-plots"),
        f"merge inspect --sample {args.sample}": inspect("inspect_sampled", "--sample", str(args.sample)),
    }
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    labels = list(cases)
    for round_ in range(args.rounds):
        order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]
        for label in order:
            command, folder = cases[label]
            if label == BASELINE:
                shutil.rmtree(folder, ignore_errors=True)
            result = timed(command, logs / f"{label.replace(' ', '_').replace('/', '_')}.{round_}.log")
            result["round"] = round_
            if label != BASELINE:
                report = json.loads((folder / "inspect.json").read_text())
                timings = report["timings"]
                parts = timings["geometry_s"] + timings["base_norms_s"] + timings["conflicts_s"]
                result["timings"] = timings
                result["conflict_share"] = timings["conflicts_s"] / parts if parts else None
                result["conflict_rate"] = report["conflicts"]["rate"]
            runs[label].append(result)
            print_run(round_, label, result)
    summary = paired_summary(runs, BASELINE, "task_arithmetic")
    for label, results in runs.items():
        shares = [r["conflict_share"] for r in results if r.get("conflict_share") is not None]
        if shares:
            summary[label]["conflict_share"] = statistics.median(shares)
            summary[label]["conflict_rate"] = results[-1]["conflict_rate"]
    report = {"shape": vars(shape) | {"parameters": shape.parameters()}, "adapters": 3, "rank": 16,
              "rounds": args.rounds, "machine": machine(), "load_average": os.getloadavg(), "results": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inspect_492M.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"492M-parameter bf16 Llama-shaped base, 3 rank-16 adapters on all linear layers; {machine()}, shared "
             f"with other jobs (load average at the end {os.getloadavg()[0]:.1f}); {args.rounds} rounds, each in a "
             "rotated order; medians, and × task_arithmetic as the median of each round's ratio.", "",
             "| case | wall | × task_arithmetic (wall) | CPU | × task_arithmetic (CPU) | peak RSS "
             "| conflict share of inspect's work | conflict rate |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in summary.items():
        share = f"{row['conflict_share']:.0%}" if "conflict_share" in row else ""
        rate = f"{row['conflict_rate']:.1%}" if row.get("conflict_rate") is not None else ""
        lines.append(f"| {label} | {row['median_wall_s']:.1f} s | {row['vs_task_arithmetic']:.2f} | "
                     f"{row['median_cpu_s']:.1f} s | {row['cpu_vs_task_arithmetic']:.2f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} GB | {share} | {rate} |")
    (RESULTS / "inspect_492M.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
