"""Honest tuning of the subspace merges on the offline suite: pick the strength on a validation half, report on the other.

For each method below, the merge strength (``alpha`` for tsv_m / iso_c / iso_cts, ``lambda`` for knots, TIES in
core space and, for comparison, task_arithmetic and full-space TIES) is chosen from a small grid
(default 0.5, 1, 1.5, 2, 3) by the mean answer log-likelihood retention on a VALIDATION split, and the chosen
merge is then scored once on a disjoint HELD-OUT split. Nothing measured on the held-out split feeds back into
any choice. The default strength (1.0) is scored on the held-out split too, so the table shows what tuning bought.

Splits. The adapters were trained on ``data/<task>/train.jsonl``, so both splits come from the test files: the
first half of each ``data/<task>/test.jsonl`` (⌊n/2⌋ rows: capitals 24, add/reverse/sentiment 75) is validation,
the rest is held-out (the rows are in random order). How: the suite's task YAMLs are copied into one temporary
folder per split, each task's ``dataset_kwargs`` gains ``half: first|second``, and the copied ``suite_data.py``
is replaced by a loader that reads the package's test file and keeps that half. ``MERGEKIT_LITE_EVAL_TASKS``
points ``merge eval``'s machinery at the copy, so task names, metrics, scores and retention are exactly those of
``merge eval`` (``mergekit_lite.evaluation.lm_eval_runner.evaluate_models``); base and adapter rows are
scored on each split, so each split's retention is measured against its own base/adapter scores.

Selection metric: "LL ret.", the mean over the four tasks of (merged − base) / (adapter alone − base) on the
answer log-likelihood (``answer_ll``, −ln perplexity of ``<task>_ll``), as in the README's table. Ties on the
validation score go to the strength closer to 1.

Merges are made with the project's API (``mergekit_lite.load_config`` on ``merge_configs/eval_*.yaml``, the
strength overridden, ``mergekit_lite.merge``) into a temporary folder; everything runs on the CPU, offline.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python evals/subspace_grid.py --out evals/results/subspace_grid
    # writes evals/results/subspace_grid.md and .json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "merge_configs"

#: method label -> (config file, strength parameter). Extra parameters come from the config file itself.
METHODS: dict[str, tuple[str, str]] = {
    "tsv_m": ("eval_tsv_m.yaml", "alpha"),
    "iso_c": ("eval_iso_c.yaml", "alpha"),
    "iso_cts": ("eval_iso_cts.yaml", "alpha"),
    "knots": ("eval_knots.yaml", "lambda"),
    "ties_core": ("eval_ties_core.yaml", "lambda"),
    "task_arithmetic": ("eval_task_arithmetic.yaml", "lambda"),
    "ties": ("eval_ties.yaml", "lambda"),
}
DEFAULT_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_STRENGTH = 1.0
SPLITS = {"validation": "first", "heldout": "second"}

LOADER = '''"""subspace_grid.py's data hook: one half of the suite's test file (first = validation, second = held-out)."""

import json
from pathlib import Path

DATA = Path({data!r})


def load(suite_task, half, **_):
    import datasets

    rows = [json.loads(line) for line in (DATA / suite_task / "test.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    cut = len(rows) // 2
    rows = rows[:cut] if half == "first" else rows[cut:]
    return {{"test": datasets.Dataset.from_list(rows)}}
'''


def make_split_tasks(root: Path, half: str) -> Path:
    """A copy of the suite's task YAMLs whose data hook keeps `half` ("first" or "second") of each test file."""
    from mergekit_lite.evaluation.tasks import SUITE_DIR, SUITE_TASKS_DIR

    folder = root / f"tasks_{half}"
    folder.mkdir(parents=True)
    for src in SUITE_TASKS_DIR.iterdir():
        if src.name == "suite_data.py" or src.is_dir():
            continue
        text = src.read_text(encoding="utf-8")
        if src.suffix == ".yaml" and not src.name.startswith("_"):
            data = yaml.safe_load(text)
            data["dataset_kwargs"] = {**data.get("dataset_kwargs", {}), "half": half}
            text = yaml.safe_dump(data, sort_keys=False)
        (folder / src.name).write_text(text, encoding="utf-8")
    (folder / "suite_data.py").write_text(LOADER.format(data=str((SUITE_DIR / "data").resolve())), encoding="utf-8")
    return folder


def fmt_strength(value: float) -> str:
    return f"{value:g}"


def merge_variant(method: str, strength: float, out_root: Path) -> tuple[Any, Path]:
    """Merge `method` at `strength` into out_root/<method>@<strength>; return (config, merged folder)."""
    import mergekit_lite

    filename, key = METHODS[method]
    mergekit_lite.load_config(CONFIGS / filename)  # the file as `merge eval` reads it must be valid
    raw = yaml.safe_load((CONFIGS / filename).read_text(encoding="utf-8"))
    raw["parameters"] = {**(raw.get("parameters") or {}), key: float(strength)}
    target = out_root / f"{method}@{fmt_strength(strength)}"
    raw["output"] = {**raw["output"], "path": str(target)}
    raw.pop("eval", None)
    config = mergekit_lite.MergeConfig.from_dict(raw, base_dir=CONFIGS)
    if not target.exists():
        mergekit_lite.merge(config, out=target, device="cpu", progress=False)
    return config, target


def evaluate(configs: list[Any], merged: list[Path], tasks_dir: Path, out_dir: Path, batch_size: int) -> Any:
    """`merge eval`'s own pipeline (plan_models + evaluate_models) over one split's task copy."""
    from mergekit_lite.evaluation.lm_eval_runner import evaluate_models
    from mergekit_lite.evaluation.rows import plan_models
    from mergekit_lite.evaluation.options import EvalOptions

    models, references = plan_models(configs, merged)
    previous = os.environ.get("MERGEKIT_LITE_EVAL_TASKS")
    os.environ["MERGEKIT_LITE_EVAL_TASKS"] = str(tasks_dir)
    try:
        return evaluate_models(models, out_dir, tasks=None, options=EvalOptions(batch_size=batch_size, device="cpu"),
                               references=references, progress=True)
    finally:
        if previous is None:
            os.environ.pop("MERGEKIT_LITE_EVAL_TASKS", None)
        else:
            os.environ["MERGEKIT_LITE_EVAL_TASKS"] = previous


def mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def summary(report: Any, name: str) -> dict[str, Any]:
    """Per-task acc / answer_ll and retention of one merge row, with the means the README reports."""
    scores, kept = report.scores[name], report.retention[name]
    tasks = report.tasks
    return {
        "acc": {t: scores[t].get("acc") for t in tasks},
        "answer_ll": {t: scores[t].get("answer_ll") for t in tasks},
        "ll_retention": {t: kept["answer_ll"][t] for t in tasks},
        "acc_retention": {t: kept["acc"][t] for t in tasks},
        "avg_acc": mean([scores[t].get("acc") for t in tasks]),
        "ll_ret": mean([kept["answer_ll"][t] for t in tasks]),
    }


def f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "evals" / "results" / "subspace_grid"),
                        help="writes OUT.md and OUT.json (default evals/results/subspace_grid)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--grid", default=",".join(fmt_strength(g) for g in DEFAULT_GRID))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", default=None, help="keep the merges and lm-eval reports in this folder")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only rewrite JSON's markdown table (JSON with .md) from its numbers, then exit")
    args = parser.parse_args(argv)
    if args.render:
        source = Path(args.render)
        source.with_suffix(".md").write_text(render_markdown(json.loads(source.read_text())), encoding="utf-8")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    grid = sorted({float(g) for g in args.grid.split(",")})

    started = time.perf_counter()
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="subspace_grid_"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        tasks = {split: make_split_tasks(work, half) if not (work / f"tasks_{half}").exists() else work / f"tasks_{half}"
                 for split, half in SPLITS.items()}

        t0 = time.perf_counter()
        variants: dict[tuple[str, float], tuple[Any, Path]] = {
            (m, s): merge_variant(m, s, work / "merges") for m in methods for s in grid
        }
        timings["merges_s"] = time.perf_counter() - t0

        # Validation: every grid point (plus base and adapters, shared), one lm-eval pass each.
        t0 = time.perf_counter()
        keys = list(variants)
        val = evaluate([variants[k][0] for k in keys], [variants[k][1] for k in keys], tasks["validation"],
                       work / "report_validation", args.batch_size)
        timings["validation_eval_s"] = time.perf_counter() - t0
        val_rows = {k: summary(val, variants[k][1].name) for k in keys}

        chosen: dict[str, float] = {}
        for m in methods:
            candidates = [(val_rows[(m, s)]["ll_ret"], -abs(s - DEFAULT_STRENGTH), s) for s in grid
                          if val_rows[(m, s)]["ll_ret"] is not None]
            chosen[m] = max(candidates)[2]

        # Held-out: the chosen strength and the default, per method (deduplicated), base and adapters again.
        t0 = time.perf_counter()
        held_keys = list(dict.fromkeys([(m, chosen[m]) for m in methods] + [(m, DEFAULT_STRENGTH) for m in methods]))
        for k in held_keys:
            if k not in variants:
                variants[k] = merge_variant(k[0], k[1], work / "merges")
        held = evaluate([variants[k][0] for k in held_keys], [variants[k][1] for k in held_keys], tasks["heldout"],
                        work / "report_heldout", args.batch_size)
        timings["heldout_eval_s"] = time.perf_counter() - t0
        held_rows = {k: summary(held, variants[k][1].name) for k in held_keys}
        timings["total_s"] = time.perf_counter() - started

        refs = {split: {name: report.scores[name] for name in report.scores
                        if any(mm.name == name and mm.kind in ("base", "adapter") for mm in report.models)}
                for split, report in (("validation", val), ("heldout", held))}
        result = {
            "grid": grid,
            "selection": "max validation mean answer-LL retention; ties -> strength closest to 1",
            "splits": {"validation": "first floor(n/2) rows of each data/<task>/test.jsonl",
                       "heldout": "remaining rows"},
            "lm_eval_version": val.lm_eval_version,
            "tasks": val.tasks,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "cpu_count": os.cpu_count(),
            "reference_scores": refs,
            "methods": {
                m: {
                    "parameter": METHODS[m][1],
                    "config": f"merge_configs/{METHODS[m][0]}",
                    "chosen": chosen[m],
                    "validation": {fmt_strength(s): val_rows[(m, s)] for s in grid},
                    "heldout_chosen": held_rows[(m, chosen[m])],
                    "heldout_default": held_rows[(m, DEFAULT_STRENGTH)],
                }
                for m in methods
            },
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(render_markdown(result), encoding="utf-8")
        print(render_markdown(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def render_markdown(result: dict[str, Any]) -> str:
    grid = result["grid"]
    tasks = result["tasks"]
    t = result["timings_s"]
    lines = [
        "# Strength chosen on a validation half, reported on a held-out half",
        "",
        ("Produced by `evals/subspace_grid.py` (see its docstring). Validation = the first ⌊n/2⌋ rows of each "
        "suite test file (capitals 24, add/reverse/sentiment 75), held-out = the rest. The strength (`alpha`, or "
        f"`lambda` for knots, ties, task_arithmetic) is picked from {{{', '.join(fmt_strength(g) for g in grid)}}} "
        "by validation \"LL ret.\" (mean over tasks of (merged − base) / (adapter − base) on the answer "
        "log-likelihood; ties go to the value closer to 1), then scored once on the held-out half, where base and "
        "adapters are scored again. Other parameters as in `merge_configs/eval_<method>.yaml`. "
        f"lm-eval {result['lm_eval_version']}, 0-shot, CPU, float32 merges. A chosen value marked * is at the "
        "edge of the grid: the optimum may lie beyond it."),
        "",
        ("| method | param | chosen | val. LL ret. | held-out LL ret. | held-out avg acc | held-out LL ret. at 1.0 "
         "| held-out avg acc at 1.0 |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, row in result["methods"].items():
        c = fmt_strength(row["chosen"])
        edge = "*" if row["chosen"] in (grid[0], grid[-1]) and len(grid) > 1 else ""
        lines.append(
            f"| {m} | {row['parameter']} | {c}{edge} | {f(row['validation'][c]['ll_ret'])} | "
            f"{f(row['heldout_chosen']['ll_ret'])} | {f(row['heldout_chosen']['avg_acc'], 3)} | "
            f"{f(row['heldout_default']['ll_ret'])} | {f(row['heldout_default']['avg_acc'], 3)} |"
        )
    lines += ["", "Validation LL ret. over the whole grid:", "",
              "| method | " + " | ".join(fmt_strength(g) for g in grid) + " |",
              "|---|" + "---:|" * len(grid)]
    for m, row in result["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f(row["validation"][fmt_strength(g)]["ll_ret"]) for g in grid) + " |")
    lines += ["", "Held-out, chosen strength, per task (acc / answer LL in nats; LL retention):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m, row in result["methods"].items():
        h = row["heldout_chosen"]
        cells = [f"{f(h['acc'][x], 3)} / {f(h['answer_ll'][x])} ({f(h['ll_retention'][x])})" for x in tasks]
        lines.append(f"| {m} @ {fmt_strength(row['chosen'])} | " + " | ".join(cells) + " |")
    runtime = (f"Runtime: {t['total_s']:.0f} s in all (merges {t['merges_s']:.0f} s, validation lm-eval "
               f"{t['validation_eval_s']:.0f} s, held-out lm-eval {t['heldout_eval_s']:.0f} s), {result.get('cpu_count') or '?'} CPU cores.")
    lines += ["", runtime, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
