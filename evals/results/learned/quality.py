"""`method: learned` on the offline suite: merge with given parameters, score the merge on a split (test or
validation) with the project's lm-eval runner, print retention against the base and each adapter alone.

    python evals/results/learned/quality.py --split validation --set loss=kl --set steps=300
Base and adapter scores per split are computed once and kept in evals/results/learned/reference_<split>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SUITE = REPO / "mergekit_lite" / "evaluation" / "suite"
TASKS = ["capitals", "add", "reverse", "sentiment"]


def _selection(split: str):
    from mergekit_lite.evaluation.lm_eval_runner import SUITE_TASKS_DIR
    from mergekit_lite.evaluation.splits import validation_selection
    from mergekit_lite.evaluation.tasks import select_tasks

    selection = select_tasks(TASKS, SUITE_TASKS_DIR)
    return validation_selection(selection) if split == "validation" else selection


def _scores(models, split: str, out: Path) -> dict:
    from mergekit_lite.evaluation.lm_eval_runner import EvalOptions, evaluate_models

    report = evaluate_models(models, out, tasks=_selection(split), options=EvalOptions(batch_size=16), progress=False)
    return json.loads((out / "scores.json").read_text())["scores"] if (out / "scores.json").is_file() else report.scores


def reference(split: str) -> dict:
    from mergekit_lite.evaluation.lm_eval_runner import ModelSpec

    path = HERE / f"reference_{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    models = [ModelSpec("base", "base", SUITE / "base")]
    models += [ModelSpec(t, "adapter", SUITE / "base", SUITE / "adapters" / t) for t in TASKS]
    with tempfile.TemporaryDirectory() as tmp:
        scores = _scores(models, split, Path(tmp) / "report")
    path.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def config(overrides: dict, out: Path) -> dict:
    data = yaml.safe_load((REPO / "merge_configs" / "learned_suite.yaml").read_text())
    data.pop("eval", None)
    data["base_model"] = str(SUITE / "base")
    for entry in data["adapters"]:
        entry["path"] = str((REPO / "merge_configs" / entry["path"]).resolve())
        entry["calibration"] = str((REPO / "merge_configs" / entry["calibration"]).resolve())
    seed = overrides.pop("seed", None)
    if seed is not None:
        data["seed"] = int(seed)
    data["parameters"].update(overrides)
    data["output"] = {"path": str(out), "dtype": "float32"}
    return data


def retention(scores: dict, ref: dict) -> dict:
    result = {}
    for metric in ("answer_ll", "acc"):
        per = {t: (scores[t][metric] - ref["base"][t][metric]) / (ref[t][t][metric] - ref["base"][t][metric])
               for t in TASKS}
        result[metric] = {"mean": sum(per.values()) / len(per), **per}
    result["avg_acc"] = sum(scores[t]["acc"] for t in TASKS) / len(TASKS)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--set", action="append", default=[], help="parameter=value (YAML value); seed=N")
    parser.add_argument("--record", help="append the result to this JSONL file")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    from mergekit_lite.api import merge
    from mergekit_lite.config import MergeConfig
    from mergekit_lite.evaluation.lm_eval_runner import ModelSpec

    ref = reference(args.split)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        cfg = MergeConfig.from_dict(config(dict(overrides), out), REPO)
        started = time.perf_counter()
        result = merge(cfg, progress=False)
        seconds = time.perf_counter() - started
        coefficients = json.loads((out / "coefficients.json").read_text())
        scores = _scores([ModelSpec("learned", "merge", out)], args.split, Path(tmp) / "report")["learned"]
    row = {"split": args.split, "overrides": overrides, "retention": retention(scores, ref), "merge_seconds": seconds,
           "held_out_loss": coefficients["held_out_loss"], "summary": result.notes}
    print(json.dumps(row))
    if args.record:
        with open(args.record, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
