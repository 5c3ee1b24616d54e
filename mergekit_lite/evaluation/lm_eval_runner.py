"""Score models with lm-eval, offline, and write the report folder: the base, each adapter alone (through PEFT)
and each merge, over the same tasks.

A merge is worth publishing only if it keeps what each adapter learned. `evaluate_models` runs EleutherAI's
lm-evaluation-harness on every row (rows.py) over the same tasks (tasks.py) and writes a report folder
(report.py):

* ``results/<model>.json`` — lm-eval's results dict for that model; ``lm_eval/<model>/`` — the same in
  lm-eval's own output format (``results_<date>.json``, and ``samples_<task>_<date>.jsonl`` with
  ``--log-samples``), written by lm-eval's EvaluationTracker;
* ``report.md`` — tables (rows: models; columns: tasks and their average), with a normalized-retention column
  per task for each merge: ``(merged − base) / (adapter alone − base)`` (scores.py);
* ``scores.json`` — the same numbers, machine-readable; ``chart.png`` — grouped bars (needs matplotlib).

Tasks default to the offline suite, which ships inside the package (``suite/`` beside this module: ``tasks/``,
``data/``, the tiny ``base/`` and its ``adapters/``; built by ``evals/build_suite.py`` in a checkout), so an
installed wheel has it too. A suite task ``T`` has a companion ``T_ll`` (log-likelihood of the correct answer),
reported as a second, smooth score.
lm-eval's built-in benchmarks (arc_easy, the mmlu group, …) and users' task files run too; their datasets are
fetched as lm-eval fetches them, under the user's Hugging Face settings, once, before any model loads.
Models never download (harness.py).

Each row's model is loaded through this module's `load_lm` (harness.load_lm), looked up at each row, so that
`merge eval --quantize` (quantize.model.QuantizedRows) can swap in a loader that quantizes what it loaded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .harness import evaluate_lm, lm_eval_version, load_lm, quiet_lm_eval
from .options import EvalOptions
from .report import LM_EVAL_DIR, RESULTS_DIR, EvalReport, write_report
from .rows import ModelSpec, check_unique_names, file_stem
from .scores import RetentionRef, compute_retention, extract_scores, headline_metric, table_columns
from .tasks import SUITE_DIR, SUITE_TASKS_DIR, TaskSelection, select_suite_or_tasks

#: SUITE_DIR and SUITE_TASKS_DIR (their home: tasks.py) stay importable here for scripts in evals/
__all__ = ["SUITE_DIR", "SUITE_TASKS_DIR", "EvalOptions", "ModelSpec", "evaluate_models", "load_lm", "run_lm_eval"]


def run_lm_eval(model: ModelSpec, selection: TaskSelection, options: EvalOptions) -> dict[str, Any]:
    """Load one row's model and evaluate it; the model is released afterwards."""
    lm = load_lm(model, options)
    try:
        return evaluate_lm(lm, selection, options, name=model.name, model_args=model.model_args(options.device))
    finally:
        del lm


def save_lm_eval_format(results: dict[str, Any], folder: Path, model: ModelSpec) -> list[Path]:
    """lm-eval's own output files for one model (results_<date>.json, samples_<task>_<date>.jsonl), written by
    lm-eval's EvaluationTracker so that tools reading `lm-eval run --output_path` read these too."""
    from lm_eval.loggers import EvaluationTracker

    folder.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(folder / "results.json"))
    tracker.general_config_tracker.model_source = "hf"
    tracker.general_config_tracker.model_name = str(model.path)
    tracker.general_config_tracker.model_name_sanitized = file_stem(model.name)
    samples = results.pop("samples", None)
    with quiet_lm_eval():
        tracker.save_results_aggregated(results=dict(results), samples=samples)
        for task_name in results.get("configs", {}) if samples else ():
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return sorted(folder.iterdir())


def evaluate_models(
    models: Sequence[ModelSpec],
    out_dir: str | Path,
    *,
    tasks: Sequence[str] | TaskSelection | None = None,
    options: EvalOptions | None = None,
    references: dict[str, RetentionRef] | None = None,
    progress: bool = True,
    note: Any = None,
    quantize: Callable[[], dict[str, Any] | None] | None = None,
) -> EvalReport:
    """Run lm-eval on every model over the same tasks and write the report folder; return the report.

    `tasks` are names/files (resolved and built here first: a bad name or a missing dataset fails before anything
    is loaded or written) or a TaskSelection built already; then each model is loaded, evaluated and released.
    `quantize` (merge eval --quantize: QuantizedRows.record) says, once every row has loaded, what the rows were
    scored as; the report records it.
    """
    from tqdm.auto import tqdm

    from ..engine.device import resolve_device

    options = options or EvalOptions()
    options = replace(options, device=str(resolve_device(options.device)))
    out_dir = Path(out_dir).resolve()
    check_unique_names(models)
    selection = tasks if isinstance(tasks, TaskSelection) else select_suite_or_tasks(tasks, note=note)
    # The bar writes to its own copy of stderr: lm-eval's output is silenced at the descriptor level.
    bar_stream = os.fdopen(os.dup(sys.stderr.fileno()), "w") if progress and _has_fileno(sys.stderr) else None
    bar = tqdm(total=len(models), desc="lm-eval", unit="model", disable=not progress, dynamic_ncols=True,
               file=bar_stream or sys.stderr)
    raw: dict[str, dict[str, Any]] = {}
    files: list[Path] = []
    try:
        for model in models:
            bar.set_postfix_str(model.name)
            results = run_lm_eval(model, selection, options)
            files += save_lm_eval_format(results, out_dir / LM_EVAL_DIR / file_stem(model.name), model)
            path = out_dir / RESULTS_DIR / f"{file_stem(model.name)}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_results(results))
            files.append(path)
            raw[model.name] = results
            bar.update(1)
    finally:
        bar.close()
        if bar_stream is not None:
            bar_stream.close()
    first = next(iter(raw.values()), {})
    table_tasks = table_columns(first, selection.table_tasks)
    headlines = {task: headline_metric(first, task) for task in table_tasks}
    scores = {name: extract_scores(results, table_tasks) for name, results in raw.items()}
    metrics = [m for m in ("acc", "answer_ll") if any(m in per.get(t, {}) for per in scores.values() for t in table_tasks)]
    report = EvalReport(
        out_dir=out_dir, tasks=table_tasks, models=list(models), scores=scores,
        retention=compute_retention(scores, table_tasks, metrics, references or {}, headlines),
        limit=options.limit, metrics=metrics, lm_eval_version=lm_eval_version(), files=files,
        headlines=headlines, options=options, origins=selection.describe(),
        quantize=quantize() if quantize is not None else None,
    )
    write_report(report)
    return report


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def dump_results(results: dict[str, Any]) -> str:
    """lm-eval's results as JSON (they hold a torch.dtype and other non-JSON values)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"

