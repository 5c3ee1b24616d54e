"""Score a merge with lm-eval, offline: the base, each adapter alone (through PEFT) and the merged checkpoint.

A merge is worth publishing only if it keeps what each adapter learned. `evaluate_models` runs EleutherAI's
lm-evaluation-harness on every model over the same tasks and writes a report folder:

* ``results/<model>.json`` — lm-eval's results dict for that model; ``lm_eval/<model>/`` — the same in
  lm-eval's own output format (``results_<date>.json``, and ``samples_<task>_<date>.jsonl`` with
  ``--log-samples``), written by lm-eval's EvaluationTracker;
* ``report.md`` — tables (rows: models; columns: tasks and their average), with a normalized-retention column
  per task for each merge: ``(merged − base) / (adapter alone − base)``;
* ``scores.json`` — the same numbers, machine-readable; ``chart.png`` — grouped bars (needs matplotlib).

Tasks (``tasks.py``) default to the offline suite, which ships inside the package (``suite/`` beside this module: ``tasks/``,
``data/``, the tiny ``base/`` and its ``adapters/``; built by ``evals/build_suite.py`` in a checkout), so an
installed wheel has it too. A suite task ``T`` has a companion ``T_ll`` (log-likelihood of the correct answer),
reported as a second, smooth score.
lm-eval's built-in benchmarks (arc_easy, the mmlu group, …) and users' task files run too; their datasets are
fetched as lm-eval fetches them, under the user's Hugging Face settings, once, before any model loads.
Models never download: they load offline (the Hub switches set, and patched where a library read them
already) from absolute paths. lm_eval is imported lazily, so ``import mergekit_lite`` stays light.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvalError
from .options import EvalOptions, check_eval_section
from .tasks import LL_SUFFIX, TaskSelection, select_tasks

if TYPE_CHECKING:
    from ..api import MergeResult
    from ..config import MergeConfig

logger = logging.getLogger(__name__)

#: The offline suite, package data: tasks/ (lm-eval YAMLs), data/<task>/, base/, adapters/<task>/, scores.json.
SUITE_DIR = Path(__file__).resolve().parent / "suite"
#: The suite's lm-eval task YAMLs (overridable with MERGEKIT_LITE_EVAL_TASKS).
SUITE_TASKS_DIR = SUITE_DIR / "tasks"
#: The report's files, relative to its folder.
REPORT_MD, SCORES_JSON, CHART_PNG, RESULTS_DIR = "report.md", "scores.json", "chart.png", "results"
#: lm-eval's own output files (results_<date>.json, samples_*.jsonl), one folder per model.
LM_EVAL_DIR = "lm_eval"
#: The folder `merge run` writes the report into, inside the merged checkpoint.
RUN_REPORT_DIR = "eval"
#: Bootstrap draws for the stderr of perplexity (lm-eval's default, 100 000, takes seconds per task).
BOOTSTRAP_ITERS = 1000
#: Metrics of a task's own results, in the order tried for its headline score.
_PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")
#: Headline metrics that live in [0, 1] (the chart's axis is fixed to that range when every task's is one).
_BOUNDED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "em", "bleu_acc", "rouge1_acc")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_METRIC_TITLES = {
    "acc": ("Accuracy", "Headline metric of each task (multiple-choice `acc` for the suite); higher is better."),
    "answer_ll": (
        "Answer log-likelihood",
        (
            "Mean log-probability of the correct answer in nats, −ln(perplexity) of each `<task>_ll`; higher is "
            "better. A smooth score: it moves before accuracy does."
        ),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report: a checkpoint folder, optionally with a PEFT adapter applied on top (unmerged)."""

    name: str
    kind: str  # "base", "adapter", "merge" or "model"
    path: Path
    adapter: Path | None = None

    def model_args(self, device: str, dtype: str = "auto") -> dict[str, Any]:
        """lm-eval `hf` model arguments: absolute paths only (a relative one looks like a Hub repo id)."""
        args: dict[str, Any] = {"pretrained": str(self.path.resolve()), "device": device, "dtype": dtype}
        if self.adapter is not None:
            args["peft"] = str(self.adapter.resolve())
        return args

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"name": self.name, "kind": self.kind, "path": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None}


@dataclass(frozen=True)
class RetentionRef:
    """What a merge is measured against: its base row and its adapters' rows (by name, in config order)."""

    base: str
    adapters: tuple[str, ...]


@dataclass
class EvalReport:
    """Scores of every model on every task, retention of each merge, and where the files went."""

    out_dir: Path
    tasks: list[str]
    models: list[ModelSpec]
    scores: dict[str, dict[str, dict[str, float]]]
    retention: dict[str, dict[str, dict[str, float | None]]]
    limit: int | float | None
    metrics: list[str]
    lm_eval_version: str
    files: list[Path] = field(default_factory=list)
    chart_note: str | None = None
    headlines: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: EvalOptions | None = None
    origins: list[str] = field(default_factory=list)

    def metric_title(self, metric: str) -> tuple[str, str]:
        """A table's title and note: `acc` is each task's headline metric (accuracy for the suite's tasks)."""
        if metric != "acc" or all(h.get("metric") in (None, "acc") for h in self.headlines.values()):
            return _METRIC_TITLES[metric]
        named = "; ".join(f"{task}: {describe_headline(h)}" for task, h in self.headlines.items())
        return ("Headline metric", f"Each task's own headline metric ({named}).")

    def markdown(self, heading: str = "##") -> str:
        """The tables as markdown (one per metric), each with per-task retention columns for the merges."""
        options = self.options or EvalOptions(limit=self.limit, num_fewshot=0)
        parts = [
            (
                f"lm-eval {self.lm_eval_version}, {options.describe()}. `adapter` rows: the base with that adapter "
                "applied through PEFT (unmerged). Retention = (merged − base) / (adapter alone − base) per task: "
                "1 keeps the adapter's gain, 0 is the base."
            ),
            "",
        ]
        if self.origins:
            parts += ["Tasks from files: " + "; ".join(self.origins) + ".", ""]
        for metric in self.metrics:
            title, note = self.metric_title(metric)
            parts += [f"{heading} {title}", "", note, "", markdown_table(self, metric), ""]
        return "\n".join(parts).rstrip() + "\n"

    def move_to(self, folder: Path) -> None:
        """Record that the report folder now lives at `folder` (it was written elsewhere, then moved there)."""
        old, folder = self.out_dir, Path(folder)
        self.files = [folder / f.relative_to(old) if f.is_relative_to(old) else f for f in self.files]
        self.out_dir = folder

    def summary(self) -> str:
        """What `merge eval` prints: the tables and where the files are."""
        lines = [markdown_table(self, metric) for metric in self.metrics]
        where = f"report: {self.out_dir / REPORT_MD}"
        if self.chart_note:
            where += f" ({self.chart_note})"
        return "\n\n".join([*lines, where])


# ----------------------------------------------------------------------------------------------- offline


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Keep every Hugging Face client offline inside the block, restoring the previous state afterwards.

    The switches are environment variables read at import; huggingface_hub (and datasets) may have been
    imported already (mergekit_lite imports huggingface_hub), so their module constants are patched too.
    """
    saved_env = {var: os.environ.get(var) for var in _OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        module = sys.modules.get(module_name)
        for attr in attrs if module is not None else ():
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _lm_eval() -> Any:
    """Import lm_eval lazily (datasets then reads the user's HF settings); a missing install is one readable error."""
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError as error:
        raise EvalError(
            f"lm-eval is not installed ({error}): pip install 'mergekit_lite[eval]' "
            "(or: pip install torch==2.13.0 'lm-eval[hf]' matplotlib)"
        ) from None
    return lm_eval


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Hide lm-eval's chatter while it runs: its logs, prints, per-request bars and `git` calls' stderr.

    Output is silenced at the file-descriptor level (subprocesses write there); our own progress bar writes to
    a duplicate of the original stderr, made before. lm-eval's bootstrap of perplexity errors runs in-process
    (DISABLE_MULTIPROC) instead of forking a pool per task.
    """
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    saved_multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    devnull_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull_fd, 1)
        os.dup2(devnull_fd, 2)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            yield
    finally:
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in (*saved_fds, devnull_fd):
            os.close(fd)
        if saved_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved_multiproc
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _keep_global_rngs() -> Iterator[None]:
    """lm-eval's simple_evaluate reseeds random, numpy and torch; give the caller its RNG states back."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ------------------------------------------------------------------------------------------------- tasks


def suite_tasks_dir() -> Path:
    """The folder of the offline suite's task YAMLs (env MERGEKIT_LITE_EVAL_TASKS overrides the package's)."""
    override = os.environ.get("MERGEKIT_LITE_EVAL_TASKS")
    return Path(override).expanduser().resolve() if override else SUITE_TASKS_DIR


def select_suite_or_tasks(tasks: Sequence[str] | None, *, build: bool = True,
                         note: Any = None) -> TaskSelection:
    """The tasks to run: the offline suite by default, else `--tasks` names, files and folders (tasks.py)."""
    return select_tasks(tasks, suite_tasks_dir(), build=build, note=note)


# --------------------------------------------------------------------------------------------- running


def load_lm(model: ModelSpec, options: EvalOptions) -> Any:
    """lm-eval's `hf` model for a row: loaded offline from absolute local paths (never a Hub download)."""
    _lm_eval()
    from lm_eval.api.registry import get_model

    for folder in (model.path, model.adapter):
        if folder is not None and not folder.is_dir():
            raise EvalError(f"{model.name}: {folder} is not a folder")
    with offline(), quiet_lm_eval():
        return get_model("hf").create_from_arg_obj(
            {**model.model_args(options.device), "batch_size": options.batch_size})


def evaluate_lm(lm: Any, selection: TaskSelection, options: EvalOptions, *, name: str = "model",
                model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `lm_eval.simple_evaluate` of a loaded model (a row, or a sweep's patched model) on the built tasks.

    The caller's RNG states survive (lm-eval reseeds the global RNGs); nothing is downloaded (the tasks were
    built before, the model is in memory).
    """
    lm_eval = _lm_eval()
    with offline(), _keep_global_rngs(), quiet_lm_eval():
        results = lm_eval.evaluator.simple_evaluate(
            model=lm,
            tasks=list(selection.built) or list(selection.run_tasks),
            task_manager=selection.manager,
            bootstrap_iters=BOOTSTRAP_ITERS,
            **options.simple_evaluate_kwargs(),
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise EvalError(f"{name}: lm-eval returned no results")
    results.setdefault("config", {}).update({"model": "hf", "model_args": model_args or {}})
    return results


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
    tracker.general_config_tracker.model_name_sanitized = _file_stem(model.name)
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
) -> EvalReport:
    """Run lm-eval on every model over the same tasks and write the report folder; return the report.

    `tasks` are names/files (resolved and built here first: a bad name or a missing dataset fails before anything
    is loaded or written) or a TaskSelection built already; then each model is loaded, evaluated and released.
    """
    from tqdm.auto import tqdm

    from ..engine.device import resolve_device

    options = options or EvalOptions()
    options = replace(options, device=str(resolve_device(options.device)))
    out_dir = Path(out_dir).resolve()
    _check_unique_names(models)
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
            files += save_lm_eval_format(results, out_dir / LM_EVAL_DIR / _file_stem(model.name), model)
            path = out_dir / RESULTS_DIR / f"{_file_stem(model.name)}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_dump_results(results))
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
        limit=options.limit, metrics=metrics, lm_eval_version=_lm_eval_version(), files=files,
        headlines=headlines, options=options, origins=selection.describe(),
    )
    _write_report(report)
    return report


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _check_unique_names(models: Sequence[ModelSpec]) -> None:
    seen: set[str] = set()
    for model in models:
        stem = _file_stem(model.name)
        if stem in seen:
            raise EvalError(f"two models are both named '{model.name}': their result files would collide")
        seen.add(stem)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _dump_results(results: dict[str, Any]) -> str:
    """lm-eval's results as JSON (they hold a torch.dtype and other non-JSON values)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------- scoring


def headline_metric(results: dict[str, Any], task: str) -> dict[str, Any]:
    """A task's headline metric in lm-eval's results: its key (`metric,filter`), name, and direction.

    Preference: acc, exact_match, acc_norm, f1, mcc, then the first numeric metric; the `none` filter first,
    else the task's first filter (gsm8k reports `exact_match,strict-match`). Direction from lm-eval's
    `higher_is_better` (perplexities are lower-is-better).
    """
    own = results.get("results", {}).get(task, {})
    keys = [k for k, v in own.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    ranked = sorted(keys, key=lambda k: (_metric_rank(k.split(",", 1)[0]), k.split(",", 1)[1] != "none"))
    if not ranked:
        return {"key": None, "metric": None, "filter": None, "higher_is_better": True}
    key = ranked[0]
    metric, filter_name = key.split(",", 1)
    higher = results.get("higher_is_better", {}).get(task, {}).get(metric)
    if higher is None:
        higher = not any(word in metric for word in ("perplexity", "bits_per_byte", "loss"))
    return {"key": key, "metric": metric, "filter": filter_name, "higher_is_better": bool(higher)}


def _metric_rank(metric: str) -> int:
    return _PRIMARY_METRICS.index(metric) if metric in _PRIMARY_METRICS else len(_PRIMARY_METRICS)


def table_columns(results: dict[str, Any], requested: Sequence[str]) -> list[str]:
    """The table's tasks: each requested task or group; a group without an aggregate score shows its members."""
    table = results.get("results", {})
    subtasks = results.get("group_subtasks", {})
    columns: list[str] = []
    for name in requested:
        if name.endswith(LL_SUFFIX) and name[: -len(LL_SUFFIX)] in requested:
            continue
        if name in table and headline_metric(results, name)["key"] is not None or name not in subtasks:
            columns.append(name)
        else:
            columns += [t for t in table_columns(results, subtasks[name]) if t not in columns]
    return list(dict.fromkeys(columns))


def extract_scores(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task: `acc` (the task's headline metric), and from the `_ll` companion `answer_ll` and `exact`."""
    per_task: dict[str, dict[str, float]] = {}
    table = results.get("results", {})
    for task in tasks:
        entry: dict[str, float] = {}
        key = headline_metric(results, task)["key"]
        if key is not None:
            entry["acc"] = float(table[task][key])
        companion = table.get(task + LL_SUFFIX)
        if companion is not None and "perplexity,none" in companion:
            entry["answer_ll"] = answer_loglikelihood(float(companion["perplexity,none"]))
            if "acc,none" in companion:
                entry["exact"] = float(companion["acc,none"])
        per_task[task] = entry
    return per_task


def answer_loglikelihood(perplexity: float) -> float:
    """lm-eval's `perplexity` of a loglikelihood task is exp(−mean log p(answer)); give back that mean."""
    return -math.log(perplexity)


def retention_value(merged: float, base: float, adapter: float) -> float | None:
    """(merged − base) / (adapter − base): 1 keeps the adapter's gain, 0 is the base; None when no gain to keep."""
    gain = adapter - base
    if not math.isfinite(gain) or abs(gain) < 1e-9:
        return None
    return (merged - base) / gain


def compute_retention(scores: dict[str, dict[str, dict[str, float]]], tasks: Sequence[str], metrics: Sequence[str],
                      references: dict[str, RetentionRef], headlines: dict[str, dict[str, Any]] | None = None,
                      ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per merge, metric and task: retention against the adapter named like the task, else its best adapter
    (best in the metric's direction: the lowest perplexity). The ratio itself needs no direction: a gain and
    its kept part have the same sign either way."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for merged, ref in references.items():
        if merged not in scores or ref.base not in scores:
            continue
        per_metric: dict[str, dict[str, float | None]] = {}
        for metric in metrics:
            values: dict[str, float | None] = {}
            for task in tasks:
                higher = metric != "acc" or (headlines or {}).get(task, {}).get("higher_is_better", True)
                adapter = reference_adapter(scores, ref, task, metric, higher_is_better=higher)
                m = scores[merged].get(task, {}).get(metric)
                b = scores[ref.base].get(task, {}).get(metric)
                a = scores.get(adapter, {}).get(task, {}).get(metric) if adapter else None
                values[task] = None if None in (m, b, a) else retention_value(m, b, a)  # type: ignore[arg-type]
            per_metric[metric] = values
        out[merged] = per_metric
    return out


def reference_adapter(scores: dict[str, dict[str, dict[str, float]]], ref: RetentionRef, task: str,
                      metric: str, higher_is_better: bool = True) -> str | None:
    """The adapter a task's retention is measured against: one named like the task, else the best on it."""
    if task in ref.adapters:
        return task
    scored = [(scores.get(a, {}).get(task, {}).get(metric), a) for a in ref.adapters]
    scored = [(value if higher_is_better else -value, a) for value, a in scored if value is not None]
    return max(scored)[1] if scored else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


# ---------------------------------------------------------------------------------------------- report


def markdown_table(report: EvalReport, metric: str) -> str:
    """Rows: models; columns: tasks, their average, then one retention column per task and their mean."""
    tasks = report.tasks
    with_retention = any(metric in per for per in report.retention.values())
    header = ["model", "kind", *tasks, "average"]
    if with_retention:
        header += [f"{t} ret." for t in tasks] + ["mean ret."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for model in report.models:
        values = [report.scores[model.name].get(t, {}).get(metric) for t in tasks]
        cells = [model.name, model.kind, *(_fmt(v) for v in values), _fmt(_mean(values))]
        if with_retention:
            kept = report.retention.get(model.name, {}).get(metric)
            ret = [kept.get(t) if kept else None for t in tasks]
            cells += [_fmt(r, 2) if kept else "" for r in ret] + [_fmt(_mean(ret), 2) if kept else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_headline(headline: dict[str, Any]) -> str:
    """`exact_match (strict-match filter, lower is better)`-style label of a task's headline metric."""
    if not headline.get("metric"):
        return "no metric"
    notes = [f"{headline['filter']} filter"] if headline.get("filter") not in (None, "none") else []
    if not headline.get("higher_is_better", True):
        notes.append("lower is better")
    return headline["metric"] + (f" ({', '.join(notes)})" if notes else "")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _write_report(report: EvalReport) -> None:
    """report.md, scores.json and chart.png into the report folder."""
    title = "# lm-eval report\n\n"
    files = ", ".join(f"`{RESULTS_DIR}/{_file_stem(m.name)}.json`" for m in report.models)
    body = report.markdown("##") + (f"\nlm-eval's results per model: {files}; in lm-eval's own output format "
                                    f"(results_<date>.json, samples): `{LM_EVAL_DIR}/<model>/`. Chart: `{CHART_PNG}`.\n")
    (report.out_dir / REPORT_MD).write_text(title + body)
    data = {
        "tasks": report.tasks,
        "headline_metrics": report.headlines,
        "options": report.options.to_dict() if report.options else None,
        "task_files": report.origins,
        "limit": report.limit,
        "lm_eval_version": report.lm_eval_version,
        "metrics": report.metrics,
        "models": [m.to_dict() for m in report.models],
        "scores": report.scores,
        "retention": report.retention,
    }
    (report.out_dir / SCORES_JSON).write_text(json.dumps(data, indent=2) + "\n")
    report.files += [report.out_dir / REPORT_MD, report.out_dir / SCORES_JSON]
    try:
        write_chart(report, report.out_dir / CHART_PNG)
        report.files.append(report.out_dir / CHART_PNG)
    except ImportError:
        report.chart_note = "no chart: matplotlib is not installed (pip install 'mergekit_lite[eval]')"


_KIND_COLORS = {"base": ["#8c8c8c"], "adapter": ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c"],
                "merge": ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#74c476", "#31a354"],
                "model": ["#bcbddc", "#9e9ac8", "#807dba", "#6a51a3"]}


def write_chart(report: EvalReport, path: Path) -> Path:
    """Grouped bars: one panel per metric, tasks on the x axis, one bar per model (greys/blues/oranges by kind)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = report.metrics or ["acc"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 4.2), squeeze=False)
    used: dict[str, int] = {}
    colors = []
    for model in report.models:
        palette = _KIND_COLORS.get(model.kind, _KIND_COLORS["model"])
        colors.append(palette[used.get(model.kind, 0) % len(palette)])
        used[model.kind] = used.get(model.kind, 0) + 1
    width = 0.8 / max(1, len(report.models))
    for ax, metric in zip(axes[0], panels):
        for index, (model, color) in enumerate(zip(report.models, colors)):
            values = [report.scores[model.name].get(t, {}).get(metric, math.nan) for t in report.tasks]
            xs = [i - 0.4 + width * (index + 0.5) for i in range(len(report.tasks))]
            ax.bar(xs, values, width=width, color=color, label=f"{model.name} ({model.kind})", edgecolor="white",
                   linewidth=0.5)
        ax.set_xticks(range(len(report.tasks)))
        labels = report.tasks
        if metric == "acc" and report.headlines:
            labels = [t + ("\n(lower is better)" if not report.headlines.get(t, {}).get("higher_is_better", True)
                           else "") for t in report.tasks]
        ax.set_xticklabels(labels)
        ax.set_title(report.metric_title(metric)[0] + (" (nats)" if metric == "answer_ll" else ""))
        bounded = all(report.headlines.get(t, {}).get("metric", "acc") in _BOUNDED_METRICS for t in report.tasks)
        if metric == "acc" and bounded:
            ax.set_ylim(0, 1.0)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle("lm-eval" + (f" (limit {report.limit})" if report.limit else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------- configs → models


def local_model_dir(config: MergeConfig, reference: str, kind: str) -> Path:
    """A base or adapter folder without any download (local, or already in the Hub cache), else an error."""
    from ..hub.resolve import cached_model_dir

    with offline():
        folder = cached_model_dir(config, reference, kind)
    if folder is None:
        raise EvalError(f"{kind} '{reference}' is not available locally: merge eval never downloads; run "
                        "`merge run` (which fetches Hub references) first")
    return folder


def plan_models(configs: Sequence[MergeConfig], merged_dirs: Sequence[Path],
                model_dirs: Sequence[Path] = ()) -> tuple[list[ModelSpec], dict[str, RetentionRef]]:
    """Rows for configs (base, each adapter alone through PEFT, the merge) and plain model folders."""
    models: list[ModelSpec] = []
    by_key: dict[tuple[str, str | None], str] = {}
    taken: set[str] = set()

    def add(name: str, kind: str, path: Path, adapter: Path | None = None) -> str:
        key = (str(path.resolve()), str(adapter.resolve()) if adapter else None)
        if key in by_key:
            return by_key[key]
        unique, n = name, 2
        while _file_stem(unique) in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(_file_stem(unique))
        by_key[key] = unique
        models.append(ModelSpec(unique, kind, path.resolve(), adapter.resolve() if adapter else None))
        return unique

    references: dict[str, RetentionRef] = {}
    bases = {str(local_model_dir(c, c.base_model, "base").resolve()) for c in configs}
    for config, merged in zip(configs, merged_dirs):
        base_dir = local_model_dir(config, config.base_model, "base")
        base_name = add("base" if len(bases) == 1 else f"base:{base_dir.name}", "base", base_dir)
        adapter_names = tuple(
            add(spec.label, "adapter", base_dir, local_model_dir(config, spec.path, "adapter"))
            for spec in config.adapters
        )
        if is_adapter_output(Path(merged)):  # format: peft: the base with the merged adapter, unmerged
            merged_name = add(Path(merged).name, "merge", base_dir, Path(merged))
        else:
            merged_name = add(Path(merged).name, "merge", Path(merged))
        references[merged_name] = RetentionRef(base_name, adapter_names)
    for folder in model_dirs:
        if is_adapter_output(Path(folder)):
            add(Path(folder).resolve().name, "model", adapter_base(Path(folder)), Path(folder))
        else:
            add(Path(folder).resolve().name, "model", Path(folder))
    return models, references


def is_adapter_output(folder: Path) -> bool:
    """True for a PEFT adapter folder (a `format: peft` merge): adapter_config.json and no config.json."""
    from ..formats.peft import is_adapter_folder

    return is_adapter_folder(folder)


def adapter_base(folder: Path) -> Path:
    """The local base folder an adapter folder names (base_model_name_or_path), for evaluating it through PEFT."""
    recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    candidate = Path(recorded) if Path(recorded).is_absolute() else (folder / recorded)
    if not candidate.is_dir():
        raise EvalError(f"{folder}: its base '{recorded}' is not a local folder; evaluate the merge config instead, "
                        "which names the base")
    return candidate.resolve()


def eval_selection(config: MergeConfig, note: Any = None) -> TaskSelection:
    """The tasks a config's `eval:` section names, resolved and built (call before merging: fail fast)."""
    check_eval_section(config.eval)  # an empty task list would run the whole suite
    tasks = list(config.eval.tasks) if config.eval and config.eval.tasks else None
    return select_suite_or_tasks(tasks, note=note)


def evaluate_after_merge(result: MergeResult, progress: bool = True, selection: TaskSelection | None = None) -> str:
    """Evaluate a finished merge as its config's `eval:` section asks; put the tables in its card; return them.

    The merged folder changes only in two atomic steps, like the merge itself: the report is built in a staging
    folder beside `eval/` and swapped into place when complete (atomic_directory), then the new card, rendered
    before that swap, replaces README.md with os.replace (writers.card.replace_card). A failure or a kill at any
    point leaves the card complete, old or new, and `eval/` absent or complete; a killed run's staging folder is
    removed by the next one.
    """
    from ..writers.atomic import atomic_directory
    from ..writers.card import render_card, replace_card
    from ..writers.staging import remove_stale

    config = result.config
    if result.output_dir is None:
        raise EvalError("nothing to evaluate: the merge was a dry run")
    tasks = selection or (list(config.eval.tasks) if config.eval and config.eval.tasks else None)
    options = EvalOptions.from_spec(config.eval, device=result.device)
    models, references = plan_models([config], [result.output_dir])
    report_dir = (result.output_dir / RUN_REPORT_DIR).resolve()
    remove_stale(report_dir)
    with atomic_directory(report_dir, overwrite=True) as staging:
        report = evaluate_models(models, staging, tasks=tasks, options=options, references=references,
                                 progress=progress)
        section = card_section(report)
        merged = next((m.name for m in report.models if m.kind == "merge"), None)
        eval_results = report.scores.get(merged) if merged else None  # the merge's own scores -> model-index
        adapter = is_adapter_output(result.output_dir)
        sections = [*_own_sections(result.output_dir / "README.md", "## Adapter"), section] if adapter else [section]
        card = render_card(config, extra_sections=sections, eval_results=eval_results,
                           relation="adapter" if adapter else "merge")
    report.move_to(report_dir)
    replace_card(result.output_dir, card)
    return report.summary()


def _own_sections(card: Path, heading: str) -> list[str]:
    """The `heading` section of an existing card (an adapter output's ranks and kept energy), to keep it."""
    if not card.is_file():
        return []
    text = card.read_text()
    start = text.find(f"\n{heading}\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + len(heading) + 2)
    return [text[start + 1: end if end > 0 else len(text)]]


def card_section(report: EvalReport) -> str:
    """The model card's `## Evaluation` section: the tables, and where the full results are."""
    return (
        "## Evaluation\n\n" + report.markdown("###")
        + f"\nFull lm-eval results: `{RUN_REPORT_DIR}/{RESULTS_DIR}/`; chart: `{RUN_REPORT_DIR}/{CHART_PNG}`.\n"
    )
