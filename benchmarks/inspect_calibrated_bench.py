"""`merge inspect` with calibration prompts on the eval suite, beside one `merge eval` of one merge.

    python benchmarks/inspect_calibrated_bench.py              # 3 rounds
    python benchmarks/inspect_calibrated_bench.py --rounds 5

Cases (each its own process under /usr/bin/time, as benchmarks/run.py measures; rounds in rotated order, so a
busy stretch of a shared machine falls on different cases; "× merge eval" is the median of each round's ratio):
- `merge eval` of the one merge merge inspect suggests (base, four adapters and the merge scored on the suite's
  test split; the merge made first, as merge eval does when it is missing);
- `merge inspect merge_configs/inspect_calibrated_suite.yaml` with an empty teacher cache (generation included),
  and with the cache the previous round left (a rerun);
- `merge inspect` of the same adapters without calibration data (what the matrix adds to).
Configs, caches and outputs live in work/inspect_calibrated_bench/. Results:
benchmarks/results/inspect_calibrated_suite.{md,json}.
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
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from run import RESULTS, WORK, machine, paired_summary, print_run, timed  # noqa: E402

BASELINE = "merge eval (one merge)"
CONFIG = REPO / "merge_configs" / "inspect_calibrated_suite.yaml"


def absolute(config: Path) -> dict:
    """The suite config with every path absolute (it is written elsewhere)."""
    data = yaml.safe_load(config.read_text())
    data["base_model"] = str((config.parent / data["base_model"]).resolve())
    for entry in data["adapters"]:
        entry["path"] = str((config.parent / entry["path"]).resolve())
        if "calibration" in entry:
            entry["calibration"] = str((config.parent / entry["calibration"]).resolve())
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    merge = str(Path(sys.executable).with_name("merge"))
    work = WORK / "inspect_calibrated_bench"
    out, logs = work / "out", work / "logs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    calibrated = absolute(CONFIG)
    (work / "calibrated.yaml").write_text(yaml.safe_dump(calibrated, sort_keys=False))
    plain = {key: value for key, value in calibrated.items() if key != "parameters"}
    plain["adapters"] = [{"path": a["path"]} for a in calibrated["adapters"]]
    (work / "plain.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    # the suggested merge as a config of its own (weights from a first calibrated run)
    first = out / "first"
    timed([merge, "inspect", str(work / "calibrated.yaml"), "--out", str(first), "--no-progress", "--no-plots",
           "--device", "cpu"], logs / "first.log", env={"MERGEKIT_LITE_CACHE": str(work / "cache_first")})
    weights = json.loads((first / "inspect.json").read_text())["interference"]["suggested"]["weights"]
    suggested = {"base_model": calibrated["base_model"], "method": "task_arithmetic", "parameters": {"lambda": 1.0},
                 "adapters": [{"path": a["path"], "weight": w} for a, w in zip(calibrated["adapters"], weights.values())],
                 "output": {"path": str(out / "suggested_merge"), "dtype": "float32"}, "eval": calibrated["eval"]}
    (work / "suggested.yaml").write_text(yaml.safe_dump(suggested, sort_keys=False))
    warm = work / "cache_warm"

    def inspect(config: str, folder: str) -> list[str]:
        return [merge, "inspect", str(work / config), "--out", str(out / folder), "--no-progress", "--device", "cpu"]

    cases = {
        BASELINE: ([merge, "eval", str(work / "suggested.yaml"), "--out", str(out / "eval"), "--device", "cpu"], None),
        "merge inspect, calibrated (empty teacher cache)": (inspect("calibrated.yaml", "cold"), "cold"),
        "merge inspect, calibrated (teachers cached)": (inspect("calibrated.yaml", "warm"), "warm"),
        "merge inspect, no calibration": (inspect("plain.yaml", "plain"), None),
    }
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    labels = list(cases)
    for round_ in range(args.rounds):
        order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]
        for label in order:
            command, cache = cases[label]
            env = {}
            if cache == "cold":
                shutil.rmtree(work / "cache_cold", ignore_errors=True)
                env["MERGEKIT_LITE_CACHE"] = str(work / "cache_cold")
            elif cache == "warm":
                env["MERGEKIT_LITE_CACHE"] = str(warm)
                if not warm.exists():  # filled once, outside the timings
                    shutil.copytree(work / "cache_first", warm)
            if label == BASELINE:
                shutil.rmtree(out / "suggested_merge", ignore_errors=True)
            result = timed(command, logs / f"{label.split(',')[0].replace(' ', '_')}_{cache}.{round_}.log", env=env)
            result["round"] = round_
            if cache is not None:
                block = json.loads((out / cache / "inspect.json").read_text())["interference"]
                result["timings"] = block["timings"]
            runs[label].append(result)
            print_run(round_, label, result)
    summary = paired_summary(runs, BASELINE, "merge_eval")
    for label, results in runs.items():
        timings = [r["timings"] for r in results if "timings" in r]
        if timings:
            summary[label]["timings"] = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    report = {"config": str(CONFIG.relative_to(REPO)), "rounds": args.rounds, "machine": machine(),
              "load_average": os.getloadavg(), "results": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inspect_calibrated_suite.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"The eval suite (0.88M-parameter base, 4 rank-8 adapters, up to 64 calibration prompts each); {machine()}, "
             f"shared with other jobs (load average at the end {os.getloadavg()[0]:.1f}); {args.rounds} rounds, each "
             "in a rotated order; medians, and × merge eval as the median of each round's ratio.", "",
             "| case | wall | × merge eval (wall) | CPU | × merge eval (CPU) | peak RSS | measuring (load / teachers / "
             "matrix / weight grid) |", "|---|---|---|---|---|---|---|"]
    for label, row in summary.items():
        t = row.get("timings")
        parts = (f"{t['total_s']:.1f} s ({t['load_s']:.1f} / {t['teachers_s']:.1f} / {t['matrix_s']:.1f} / "
                 f"{t['weights_s']:.1f})") if t else ""
        lines.append(f"| {label} | {row['median_wall_s']:.1f} s | {row['vs_merge_eval']:.2f} | "
                     f"{row['median_cpu_s']:.1f} s | {row['cpu_vs_merge_eval']:.2f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} GB | {parts} |")
    (RESULTS / "inspect_calibrated_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
