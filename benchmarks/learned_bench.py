"""Cost of `method: learned` on the offline suite, end to end (`merge run`, a fresh process each time).

Two runs: with an empty teacher cache (prompts, model load, teacher pass, fit, write), then with the teachers
cached (what a rerun or a sweep over `learned` points pays). Reports wall and CPU seconds and peak RSS of the
process (/usr/bin/time), and the phases the merge records in coefficients.json. The machine is shared: report
its load beside the numbers.

    python benchmarks/learned_bench.py [--set steps=50] [--out benchmarks/results/learned_bench.json]
    python benchmarks/learned_bench.py --synthetic [--out ...]   # 492M synthetic Llama, 3 rank-16 adapters: the
        teacher pass, seconds per step and peak memory of a short fit (the suite's tokenizer lent to it: ids < 100)
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


def synthetic_config(folder: Path, overrides: dict) -> Path:
    """The 492M synthetic base with three rank-16 adapters, 16 suite prompts each (a short fit: cost, not quality)."""
    import shutil

    from synthetic import Shape, build

    root = build(folder / "synthetic", Shape(), adapters=3, rank=16)
    suite = REPO / "mergekit_lite" / "evaluation" / "suite"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(suite / "base" / name, root / "base" / name)
    adapters = sorted(p for p in root.iterdir() if p.name != "base")
    data = {"base_model": str(root / "base"), "method": "learned",
            "parameters": {"calibration_template": "Q: {{question}}\nA:", "calibration_size": 16, "steps": 5,
                           "batch_size": 4, "max_new_tokens": 8, **overrides},
            "adapters": [{"path": str(a), "calibration": str(suite / "data" / task / "train.jsonl")}
                         for a, task in zip(adapters, ("capitals", "add", "reverse"))],
            "output": {"path": str(folder / "merged")}}
    path = folder / "learned.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="parameter=value (YAML value)")
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    parser.add_argument("--synthetic", action="store_true", help="the 492M synthetic base instead of the suite")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    report: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "overrides": overrides, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = synthetic_config(folder, overrides) if args.synthetic else config(folder, overrides)
        report["case"] = "492M synthetic Llama, 3 rank-16 adapters" if args.synthetic else "suite, 4 adapters"
        os.environ["MERGEKIT_LITE_CACHE"] = str(folder / "cache")
        for label in ("teachers computed", "teachers cached"):
            stats = timed([sys.executable, "-m", "mergekit_lite.cli", "run", str(path), "--overwrite", "--device",
                           "cpu", "--no-progress"], folder / "log.txt")
            record = json.loads((folder / "merged" / "coefficients.json").read_text())
            report["runs"].append({"run": label, **stats, "phases": record["timings"],
                                   "held_out_loss": record["held_out_loss"]})
            if label == "teachers computed":
                lambdas = [v for row in record["coefficients"].values() for v in row.values()]
                report["lambda_range"] = [min(lambdas), max(lambdas)]
                report["lambda_mean_per_adapter"] = {a: sum(r[a] for r in record["coefficients"].values())
                                                     / len(record["coefficients"]) for a in record["adapters"]}
    report["load_average_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
