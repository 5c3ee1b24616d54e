"""Cost of `method: learned` on the offline suite, end to end (`merge run`, a fresh process each time).

Two runs: with an empty teacher cache (prompts, model load, teacher pass, fit, write), then with the teachers
cached (what a rerun or a sweep over `learned` points pays). Reports wall and CPU seconds and peak RSS of the
process (/usr/bin/time), and the phases the merge records in coefficients.json. The machine is shared: report
its load beside the numbers.

    python benchmarks/learned_bench.py [--threads N] [--set steps=50] [--out benchmarks/results/learned.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run import timed  # noqa: E402


def config(folder: Path, overrides: dict) -> Path:
    data = yaml.safe_load((REPO / "merge_configs" / "learned_suite.yaml").read_text())
    data.pop("eval", None)
    data["base_model"] = str((REPO / "merge_configs" / data["base_model"]).resolve())
    for entry in data["adapters"]:
        entry["path"] = str((REPO / "merge_configs" / entry["path"]).resolve())
        entry["calibration"] = str((REPO / "merge_configs" / entry["calibration"]).resolve())
    data["parameters"].update(overrides)
    data["output"] = {"path": str(folder / "merged"), "dtype": "float32"}
    path = folder / "learned.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="parameter=value (YAML value)")
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    report: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "overrides": overrides, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = config(folder, overrides)
        os.environ["MERGEKIT_LITE_CACHE"] = str(folder / "cache")
        for label in ("teachers computed", "teachers cached"):
            stats = timed([sys.executable, "-m", "mergekit_lite.cli", "run", str(path), "--overwrite", "--device",
                           "cpu", "--no-progress"], folder / "log.txt")
            record = json.loads((folder / "merged" / "coefficients.json").read_text())
            report["runs"].append({"run": label, **stats, "phases": record["timings"],
                                   "held_out_loss": record["held_out_loss"]})
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
