"""RegMean's cost on the offline suite: `merge run merge_configs/regmean_suite.yaml` (no eval) end to end.

    python benchmarks/regmean_bench.py                 # 3 rounds, statistics in one round of passes
    python benchmarks/regmean_bench.py --repeats 5

Each round runs, in alternation, the shipped config as is and with `statistics_memory` so small that every
distinct module input is gathered in its own round of passes (the worst case of the grouping), and
task_arithmetic on the same adapters (no calibration: the streamed write alone), each its own process under
/usr/bin/time. The merged checkpoints of the two regmean runs must be the same bytes. Results:
benchmarks/results/regmean_suite.md and .json (medians; the machine is shared, so read them as rough).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work" / "regmean"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from run import timed  # noqa: E402

SUMMARY = re.compile(r"Gram statistics of (\d+) module input\(s\) \(([\d.]+ \w+) float64, (\d+) round")


def config(case: str) -> Path:
    """The shipped suite config with absolute paths, no eval, adjusted for `case`."""
    data = yaml.safe_load((REPO / "merge_configs" / "regmean_suite.yaml").read_text())
    base = REPO / "merge_configs"
    data["base_model"] = str((base / data["base_model"]).resolve())
    for entry in data["adapters"]:
        entry["path"] = str((base / entry["path"]).resolve())
        entry["calibration"] = str((base / entry["calibration"]).resolve())
    data.pop("eval", None)
    data["output"] = {"path": str(WORK / f"out_{case}"), "dtype": "float32"}
    if case == "regmean_grouped":
        data["parameters"]["statistics_memory"] = "1B"
    if case == "task_arithmetic":
        data["method"], data["parameters"] = "task_arithmetic", {"lambda": 0.5}
        for entry in data["adapters"]:
            entry.pop("calibration")
    path = WORK / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    merge = str(Path(sys.executable).with_name("merge"))
    cases = ["regmean", "regmean_grouped", "task_arithmetic"]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    notes: dict[str, dict] = {}
    for _ in range(args.repeats):
        for case in cases:
            shutil.rmtree(WORK / f"out_{case}", ignore_errors=True)
            log = WORK / f"{case}.log"
            runs[case].append(timed([merge, "run", str(config(case)), "--no-progress", "--device", "cpu"], log))
            found = SUMMARY.search(log.read_text())
            if found:
                notes[case] = {"inputs": int(found.group(1)), "statistics": found.group(2), "rounds": int(found.group(3))}
    same = ((WORK / "out_regmean" / "model.safetensors").read_bytes()
            == (WORK / "out_regmean_grouped" / "model.safetensors").read_bytes())
    table = {case: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "cpu_s", "peak_rss_bytes")}
             for case, rs in runs.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regmean_suite.json").write_text(json.dumps({"runs": runs, "median": table, "notes": notes,
                                                             "grouped_same_bytes": same}, indent=1) + "\n")
    lines = [f"# RegMean on the suite ({args.repeats} rounds, medians; shared 2-core machine)", "",
             "| case | wall s | CPU s | peak RSS GB | statistics |", "|---|---:|---:|---:|---|"]
    for case in cases:
        m, n = table[case], notes.get(case)
        what = f"{n['inputs']} inputs, {n['statistics']}, {n['rounds']} round(s)" if n else "none"
        lines.append(f"| {case} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_bytes'] / 1e9:.2f} | {what} |")
    lines += ["", f"regmean and regmean_grouped wrote the same bytes: {same}"]
    (RESULTS / "regmean_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
