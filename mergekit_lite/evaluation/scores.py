"""Scores from lm-eval's results: each task's headline metric, the answer log-likelihood, retention, means.

Pure functions of lm-eval's results dict and of the score tables built from it: `merge eval`'s report and
`merge sweep`'s ranking read the same numbers the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tasks import LL_SUFFIX

#: Metrics of a task's own results, in the order tried for its headline score.
_PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")


@dataclass(frozen=True)
class RetentionRef:
    """What a merge is measured against: its base row and its adapters' rows (by name, in config order)."""

    base: str
    adapters: tuple[str, ...]


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


def mean(values: Sequence[float | None], *, finite: bool = False) -> float | None:
    """The mean of a row's values over tasks; None when any is missing (a mean over some tasks would not compare
    with one over all).

    `finite`: NaN or inf counts as missing too. The sweep ranks points by these means and `max` over a NaN is
    meaningless, so a point with a non-finite score gets none; the eval report shows the NaN instead (`nan`).
    """
    present = [v for v in values if v is not None and (not finite or math.isfinite(v))]
    return sum(present) / len(present) if present and len(present) == len(values) else None
