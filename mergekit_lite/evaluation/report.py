"""The report folder `merge eval` writes: report.md (tables with retention columns), scores.json, chart.png.

Layout of the folder: ``results/<model>.json`` (lm-eval's results dict), ``lm_eval/<model>/`` (the same in
lm-eval's own output format), ``report.md``, ``scores.json`` and ``chart.png`` (needs matplotlib).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import EvalOptions
from .rows import ModelSpec, file_stem
from .scores import mean

#: The report's files, relative to its folder.
REPORT_MD, SCORES_JSON, CHART_PNG, RESULTS_DIR = "report.md", "scores.json", "chart.png", "results"
#: lm-eval's own output files (results_<date>.json, samples_*.jsonl), one folder per model.
LM_EVAL_DIR = "lm_eval"
#: Headline metrics that live in [0, 1] (the chart's axis is fixed to that range when every task's is one).
_BOUNDED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "em", "bleu_acc", "rouge1_acc")
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
    #: `merge eval --quantize`: what every row was scored as (quantize.model.QuantizedRows.record), else None
    quantize: dict[str, Any] | None = None

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
        if self.quantize:
            parts += [describe_quantize(self.quantize), ""]
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
        if self.quantize:
            where = f"every row scored as its {self.quantize['format']} model; " + where
        if self.chart_note:
            where += f" ({self.chart_note})"
        return "\n\n".join([*lines, where])


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
        cells = [model.name, model.kind, *(_fmt(v) for v in values), _fmt(mean(values))]
        if with_retention:
            kept = report.retention.get(model.name, {}).get(metric)
            ret = [kept.get(t) if kept else None for t in tasks]
            cells += [_fmt(r, 2) if kept else "" for r in ret] + [_fmt(mean(ret), 2) if kept else ""]
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


def describe_quantize(quantize: dict[str, Any]) -> str:
    """report.md's line on `merge eval --quantize`: the format, its library and version, what was quantized, and
    how many Linear weights each row had quantized (and any left as they were, with why)."""
    library = quantize["library"] + (f" {quantize['version']}" if quantize.get("version") else "")
    rows = quantize.get("rows") or {}
    counts = ", ".join(f"{name} {row['quantized']}" for name, row in rows.items())
    line = (f"**Quantized: every row is scored as its `{quantize['format']}` model ({library})**: "
            f"{quantize['scope']}. Linear weights quantized per row: {counts or 'none loaded'}.")
    left = [(name, entry) for name, row in rows.items() for entry in row.get("left", [])]
    if left:
        name, entry = left[0]
        line += (f" Left as they were: {len(left)} (e.g. {name}: {entry['module']}, {entry['why']}); "
                 f"scores.json lists them.")
    return line


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(report: EvalReport) -> None:
    """report.md, scores.json and chart.png into the report folder."""
    title = "# lm-eval report\n\n"
    files = ", ".join(f"`{RESULTS_DIR}/{file_stem(m.name)}.json`" for m in report.models)
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
        "quantize": report.quantize,
    }
    (report.out_dir / SCORES_JSON).write_text(json.dumps(data, indent=2) + "\n")
    report.files += [report.out_dir / REPORT_MD, report.out_dir / SCORES_JSON]
    try:
        write_chart(report, report.out_dir / CHART_PNG)
        report.files.append(report.out_dir / CHART_PNG)
    except ImportError:
        report.chart_note = "no chart: matplotlib is not installed (pip install 'mergekit_lite[eval]')"
#: chart columns: a task name is wrapped to lines of this many characters and printed at this font size, side by
#: side for up to SIDE_BY_SIDE columns, else upright (wrapped twice as wide); a column is at least COLUMN_INCHES
LABEL_CHARS, LABEL_SIZE, SIDE_BY_SIDE, COLUMN_INCHES = 14, 8, 4, 0.6


def column_labels(names: Sequence[str], width: int = LABEL_CHARS) -> list[str]:
    """Task names wrapped onto lines of at most `width` characters, broken after `_ - . /` where possible, so
    that long lm-eval names (mmlu_high_school_macroeconomics) do not print on top of each other."""
    wrapped = []
    for name in names:
        lines = [""]
        for part in re.split(r"(?<=[_\-./])", name):
            if lines[-1] and len(lines[-1]) + len(part) > width:
                lines.append("")
            while len(part) > width:  # a part longer than a line is cut where the line is full
                lines[-1], part = part[:width], part[width:]
                lines.append("")
            lines[-1] += part
        wrapped.append("\n".join(line for line in lines if line))
    return wrapped


def set_column_labels(ax: Any, names: Sequence[str], notes: Sequence[str] | None = None) -> None:
    """One x tick per column, labelled with its name wrapped (column_labels) and its note appended: side by side
    when the columns are few, upright when more (a wrapped line is then wider than a column)."""
    upright = len(names) > SIDE_BY_SIDE
    labels = column_labels(names, LABEL_CHARS * (2 if upright else 1))
    if notes is not None:
        labels = [label + note for label, note in zip(labels, notes)]
    ax.set_xticks(range(len(names)), labels, fontsize=LABEL_SIZE, rotation=90 if upright else 0)


def panel_inches(columns: int, least: float = 5.5) -> float:
    """A chart panel's width: `least`, wider when its columns would be narrower than COLUMN_INCHES each."""
    return max(least, COLUMN_INCHES * columns)


_KIND_COLORS = {"base": ["#8c8c8c"], "adapter": ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c"],
                "merge": ["#fdae6b", "#fd8d3c", "#e6550d", "#a63603", "#74c476", "#31a354"],
                "model": ["#bcbddc", "#9e9ac8", "#807dba", "#6a51a3"]}


def chart_title(report: EvalReport) -> str:
    """The chart's title: lm-eval, the limit, and the format every row was quantized to (--quantize)."""
    quantized = f", every row quantized to {report.quantize['format']}" if report.quantize else ""
    return "lm-eval" + (f" (limit {report.limit})" if report.limit else "") + quantized


def write_chart(report: EvalReport, path: Path) -> Path:
    """Grouped bars: one panel per metric, tasks on the x axis, one bar per model (greys/blues/oranges by kind)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = report.metrics or ["acc"]
    panel = panel_inches(len(report.tasks))
    fig, axes = plt.subplots(1, len(panels), figsize=(panel * len(panels) + 1.5, 4.2), squeeze=False)
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
        notes = None
        if metric == "acc" and report.headlines:
            notes = ["\n(lower is better)" if not report.headlines.get(t, {}).get("higher_is_better", True) else ""
                     for t in report.tasks]
        set_column_labels(ax, report.tasks, notes)
        ax.set_title(report.metric_title(metric)[0] + (" (nats)" if metric == "answer_ll" else ""))
        bounded = all(report.headlines.get(t, {}).get("metric", "acc") in _BOUNDED_METRICS for t in report.tasks)
        if metric == "acc" and bounded:
            ax.set_ylim(0, 1.0)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(chart_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

