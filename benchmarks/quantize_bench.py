"""`merge verify --quantize q4_0` beside our task_arithmetic `merge run` on the 492M synthetic base (3 rank-16 adapters).

    python benchmarks/quantize_bench.py                      # 3 rounds, q4_0
    python benchmarks/quantize_bench.py --rounds 1 --layers 4 --formats q8_0,q4_0

Each case is its own process under /usr/bin/time (wall, CPU seconds, peak RSS), as benchmarks/run.py measures.
Every round merges first (the output is removed before, outside the timing) and then measures that output, so
"× task_arithmetic" is the median over rounds of each round's wall (and CPU) over that round's merge. The
machine is shared: read CPU seconds before wall seconds. `--layers` builds a shallower base (same widths) when
the 8-layer one is too heavy for the moment. Configs and outputs live in work/quantize_bench/; results:
benchmarks/results/quantize_<size>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic base (8: 492M)")
    parser.add_argument("--formats", default="q4_0", help="what `merge verify --quantize` measures")
    args = parser.parse_args()
    shape = Shape(2048, 5632, args.layers, 32000)
    size = f"{round(shape.parameters() / 1e6)}M"
    root = build(WORK / f"synthetic_h2048_l{args.layers}_v32000", shape, 3, 16)  # reused when present
    merge = str(Path(sys.executable).with_name("merge"))
    work = WORK / "quantize_bench"
    out = work / "out" / "task_arithmetic"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config = work / "task_arithmetic.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(root / "base"), "method": "task_arithmetic",
        "adapters": [{"path": str(root / f"adapter_{i}")} for i in range(3)],
        "output": {"path": str(out)}, "seed": 0}))
    verify = f"merge verify --quantize {args.formats}"
    cases = {
        BASELINE: [merge, "run", str(config), "--no-progress", "--device", "cpu"],
        verify: [merge, "verify", str(out), "--quantize", args.formats, "--base", str(root / "base"),
                 "--no-progress"],
    }
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    for round_ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        for label, command in cases.items():
            log = logs / f"{label.replace(' ', '_').replace(',', '+')}.{round_}.log"
            result = timed(command, log)
            result["round"] = round_
            runs[label].append(result)
            print_run(round_, label, result)
        if round_ == 0:
            print(log.read_text(), flush=True)
    summary = paired_summary(runs, BASELINE, "task_arithmetic")
    report = {"shape": vars(shape) | {"parameters": shape.parameters()}, "adapters": 3, "rank": 16,
              "formats": args.formats, "rounds": args.rounds, "machine": machine(),
              "load_average": os.getloadavg(), "results": summary,
              "verify_output": (logs / f"{verify.replace(' ', '_').replace(',', '+')}.0.log").read_text()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quantize_{size}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"{size}-parameter bf16 Llama-shaped base ({args.layers} layers), 3 rank-16 adapters on all linear layers; "
             f"{machine()}, shared with other jobs (load average at the end {os.getloadavg()[0]:.1f}); "
             f"{args.rounds} round(s), each merging and then measuring; medians, and × task_arithmetic as the median "
             "of each round's ratio.", "",
             "| case | wall | × task_arithmetic (wall) | CPU | × task_arithmetic (CPU) | peak RSS |",
             "|---|---|---|---|---|---|"]
    for label, row in summary.items():
        lines.append(f"| {label} | {row['median_wall_s']:.1f} s | {row['vs_task_arithmetic']:.2f} | "
                     f"{row['median_cpu_s']:.1f} s | {row['cpu_vs_task_arithmetic']:.2f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} GB |")
    (RESULTS / f"quantize_{size}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
