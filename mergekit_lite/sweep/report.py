"""A sweep's outputs: the leaderboard (md, json, csv), best.yaml, the test-split table, the figures, and with
`output:` the best merge written like `merge run` (its card carrying the sweep's summary)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..evaluation.report import panel_inches, set_column_labels
from ..evaluation.scores import mean
from .result import SweepResult

LEADERBOARD = "leaderboard"
BEST_YAML = "best.yaml"
TEST_MD, TEST_JSON = "test.md", "test.json"
FIGURES = "figures"
TEST_FIGURE = "test_comparison.png"
#: the columns every table shows, besides the selection metric
SHOWN = ("answer_ll_retention", "acc_retention", "answer_ll", "acc")
#: the test figure: the chosen merge stands out, each method's default merge in a muted colour
_CHOSEN_COLOR = "#d94801"
_DEFAULT_COLORS = ["#6baed6", "#74c476", "#9e9ac8", "#bdbdbd", "#fdd0a2", "#c7e9c0"]


def write_outputs(result: SweepResult, out: Path, overwrite: bool = False) -> list[Path]:
    """Every output: the report set staged beside `out` and swapped in whole (the cache carried over), so a kill
    at any moment leaves the previous set or the new one; then, with `output:`, the best merge (`overwrite`: the
    user's --overwrite, passed on as given)."""
    from ..writers.ownership import owned_folder
    from .result import CACHE_DIR

    out = Path(out).resolve()
    with owned_folder(out, "sweep", keep=[CACHE_DIR]) as staging:
        staged = [
            _write(staging / f"{LEADERBOARD}.json", json.dumps(leaderboard_data(result), indent=2) + "\n"),
            _write(staging / f"{LEADERBOARD}.csv", leaderboard_csv(result)),
            _write(staging / f"{LEADERBOARD}.md", leaderboard_markdown(result)),
            _write(staging / BEST_YAML, best_yaml(result, out)),
            _write(staging / TEST_MD, test_markdown(result)),
            _write(staging / TEST_JSON, json.dumps(test_data(result), indent=2) + "\n"),
        ]
        try:
            staged += write_figures(result, staging / FIGURES)
        except ImportError:  # matplotlib is in the eval extra; the tables do not need it
            pass
    files = [out / path.relative_to(staging) for path in staged]
    if result.config.writes_output:
        files.append(write_best_merge(result, overwrite))
    return files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def ranked(result: SweepResult) -> list[Any]:
    """Points best first by the selection metric (failed or unscored points last, in point order)."""
    metric = result.metric
    order = {id(row): index for index, row in enumerate(result.rows)}
    return sorted(result.rows, key=lambda r: (r.summary.get(metric) is None, -(r.summary.get(metric) or 0.0),
                                             order[id(r)]))


def _row_data(row: Any, rank: int | None = None) -> dict[str, Any]:
    point = row.point
    data: dict[str, Any] = {"name": row.name, "kind": row.kind}
    if rank is not None:
        data["rank"] = rank
    if point is not None:
        data.update(method=point.method, parameters=point.merge_parameters(), swept=point.parameters,
                    weights=point.weights)
    data.update(scores=row.result.get("scores"), summary=row.summary, error=row.error, cached=row.cached,
                merge_s=row.result.get("merge_s"), eval_s=row.result.get("eval_s"))
    return data


def leaderboard_data(result: SweepResult) -> dict[str, Any]:
    """leaderboard.json: the sweep, its settings and every point with its validation scores and times."""
    rows = ranked(result)
    return {
        "sweep": result.config.spec.to_dict(),
        "metric": result.metric,
        "split": "validation",
        "tasks": result.tasks,
        "eval": result.options.to_dict(),
        "backend": result.backend,
        "workers": result.workers,
        "evaluated": result.evaluated,
        "reused_from_cache": result.reused,
        "rejected_cache_entries": result.rejected,
        "best": result.best.name if result.best else None,
        "references": {name: _row_data(row) for name, row in result.references.get("validation", {}).items()},
        "points": [_row_data(row, rank) for rank, row in enumerate(rows, 1)],
    }


def leaderboard_csv(result: SweepResult) -> str:
    """leaderboard.csv: one line per point, best first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = list(dict.fromkeys([result.metric, *SHOWN]))
    per_task = [f"{t}:{m}" for t in result.tasks for m in ("acc", "answer_ll")]
    writer.writerow(["rank", "point", "method", "parameters", "weights", *columns, *per_task, "merge_s", "eval_s",
                     "error"])
    for rank, row in enumerate(ranked(result), 1):
        point = row.point
        writer.writerow([rank, row.name, point.method if point else "", json.dumps(point.merge_parameters()) if point
                         else "", json.dumps(point.weights) if point else "",
                         *(row.summary.get(c) for c in columns), *(row.summary.get(c) for c in per_task),
                         row.result.get("merge_s"), row.result.get("eval_s"), row.error or ""])
    return buffer.getvalue()


def leaderboard_markdown(result: SweepResult) -> str:
    """leaderboard.md: the settings, the validation references, every point best first."""
    spec = result.config.spec
    columns = list(dict.fromkeys([result.metric, *SHOWN]))
    lines = [
        "# Sweep leaderboard (validation split)",
        "",
        f"{len(result.rows)} point(s), search `{spec.search}`"
        + (f" ({spec.trials} trials, seed {spec.seed})" if spec.trials else "")
        + f", methods {', '.join(spec.methods)}; selected by `{result.metric}` (mean over tasks: "
        f"{', '.join(result.tasks)}) on each task's validation split; {result.options.describe()}. "
        f"Evaluated {result.evaluated}, reused from the cache {result.reused}"
        + (f", {result.rejected} cache entr(y/ies) failed their checksum and were evaluated again"
           if result.rejected else "") + f"; backend {result.backend} ({result.workers} worker(s)).",
        "",
        "Validation numbers only choose the point; the results are the test split's (`test.md`).",
        "",
        "| rank | point | " + " | ".join(columns) + " | merge s | eval s |",
        "|---:|---|" + "---:|" * (len(columns) + 2),
    ]
    for rank, row in enumerate(ranked(result), 1):
        if row.error:
            lines.append(f"| {rank} | {row.name} | " + " | ".join("" for _ in columns) +
                         f" | | | error: {row.error} |")
            continue
        mark = " **(best)**" if row is result.best else ""
        lines.append(f"| {rank} | {row.name}{mark} | " + " | ".join(_fmt(row.summary.get(c)) for c in columns)
                     + f" | {_fmt(row.result.get('merge_s'), 2)} | {_fmt(row.result.get('eval_s'), 2)} |")
    refs = result.references.get("validation", {})
    if refs:
        lines += ["", "References on the validation split (mean acc / answer log-likelihood over the tasks):", ""]
        for name, row in refs.items():
            scores = row.result.get("scores") or {}
            acc = mean([scores.get(t, {}).get("acc") for t in result.tasks])
            ll = mean([scores.get(t, {}).get("answer_ll") for t in result.tasks])
            lines.append(f"- {name} ({row.kind}): {_fmt(acc)} / {_fmt(ll)}")
    return "\n".join(lines) + "\n"


def best_config_data(result: SweepResult, folder: Path) -> dict[str, Any]:
    """The best point's merge config as a user would write it, its paths relative to `folder` (best.yaml's)."""
    from .result import point_config

    assert result.best is not None and result.best.point is not None
    config = point_config(result.config, result.best.point)
    data = config.to_dict()

    def relative(path: str) -> str:
        from ..hub.resolve import hub_reference

        if hub_reference(config, path) is not None:
            return path
        return os.path.relpath(config.resolve_path(path), folder)

    data["base_model"] = relative(data["base_model"])
    for section in ("adapters", "models"):
        for entry in data.get(section, []):
            entry["path"] = relative(entry["path"])
    # without `output:`, beside the report folder, never in it: the next sweep replaces that folder whole
    output = config.output_path if result.config.writes_output else folder.parent / f"{folder.name}_best_merge"
    data["output"]["path"] = os.path.relpath(output, folder)
    return data


def best_yaml(result: SweepResult, folder: Path) -> str:
    """best.yaml: a normal merge config (`merge run best.yaml` makes the chosen merge)."""
    best = result.best
    assert best is not None
    header = (f"# The best point of a merge sweep: {best.name}\n# {result.metric} {_fmt(best.summary.get(result.metric))}"
              f" on the validation split; test-split results in {TEST_MD}. Reproduce: merge run {BEST_YAML}\n")
    return header + yaml.safe_dump(best_config_data(result, folder), sort_keys=False, allow_unicode=True)


def test_data(result: SweepResult) -> dict[str, Any]:
    """test.json: the chosen merge, base, each adapter and each method's default merge on the test split."""
    return {"split": "test", "tasks": result.tasks, "metric": result.metric, "eval": result.options.to_dict(),
            "chosen": result.best.name if result.best else None,
            "rows": [_row_data(row) for row in result.test_rows]}


def test_markdown(result: SweepResult) -> str:
    """test.md: per model, acc / answer log-likelihood per task, their means and the retentions."""
    tasks = result.tasks
    lines = [
        "# The chosen merge on the test split",
        "",
        f"Chosen on validation by `{result.metric}`: **{result.best.name if result.best else 'none'}**. Every row "
        f"scored on each task's test split ({result.options.describe()}); `default` rows are each method at its "
        "defaults (λ = α = 1, density 0.5 where a method needs one), weights 1. Cells: accuracy / answer "
        "log-likelihood (nats). Retention = (merged − base) / (adapter alone − base), mean over tasks.",
        "",
        "| model | " + " | ".join(tasks) + " | avg acc | avg answer LL | LL ret. | acc ret. |",
        "|---|" + "---|" * len(tasks) + "---:|---:|---:|---:|",
    ]
    for row in result.test_rows:
        scores = row.result.get("scores") or {}
        cells = [f"{_fmt(scores.get(t, {}).get('acc'))} / {_fmt(scores.get(t, {}).get('answer_ll'), 2)}" for t in tasks]
        merged = row.kind == "merge"
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {_fmt(row.summary.get('acc'))} | "
                     f"{_fmt(row.summary.get('answer_ll'), 2)} | "
                     f"{_fmt(row.summary.get('answer_ll_retention'), 2) if merged else ''} | "
                     f"{_fmt(row.summary.get('acc_retention'), 2) if merged else ''} |")
    return "\n".join(lines) + "\n"


def write_figures(result: SweepResult, folder: Path) -> list[Path]:
    """Per method a heatmap of the metric over its two swept parameters (a line over one), and the test bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    metric = result.metric
    for method in result.config.spec.methods:
        rows = [r for r in result.rows if r.point is not None and r.point.method == method and not r.point.weights]
        swept = [name for name in result.config.spec.takes(method)
                 if len({repr(r.point.parameters.get(name)) for r in rows}) > 1]
        if not rows or not swept or len(swept) > 2 or not all(isinstance(r.point.parameters.get(n), (int, float))
                                                                for r in rows for n in swept):
            continue
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        if len(swept) == 1:
            pairs = sorted((r.point.parameters[swept[0]], r.summary.get(metric)) for r in rows
                           if r.summary.get(metric) is not None)
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o")
            ax.set_xlabel(swept[0])
            ax.set_ylabel(f"{metric} (validation)")
            ax.grid(alpha=0.3)
        else:
            xs = sorted({r.point.parameters[swept[0]] for r in rows})
            ys = sorted({r.point.parameters[swept[1]] for r in rows})
            grid = [[math.nan for _ in xs] for _ in ys]
            for r in rows:
                value = r.summary.get(metric)
                if value is not None:
                    grid[ys.index(r.point.parameters[swept[1]])][xs.index(r.point.parameters[swept[0]])] = value
            image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_xlabel(swept[0])
            ax.set_ylabel(swept[1])
            for j, line in enumerate(grid):
                for i, value in enumerate(line):
                    if math.isfinite(value):
                        ax.text(i, j, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
            fig.colorbar(image, ax=ax, label=f"{metric} (validation)")
        ax.set_title(f"{method}: {metric} on validation", fontsize=10)
        fig.tight_layout()
        path = folder / f"{method}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    files.append(_test_figure(result, folder / TEST_FIGURE, plt))
    return files


def _test_figure(result: SweepResult, path: Path, plt: Any) -> Path:
    """Bars per task of the answer log-likelihood retention (and accuracy) of the merges on the test split."""
    merges = [r for r in result.test_rows if r.kind == "merge"]
    metrics = [m for m in ("answer_ll_retention", "acc_retention") if any(r.summary.get(m) is not None for r in merges)]
    panel = panel_inches(len(result.tasks) + 1)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(panel * max(1, len(metrics)) + 1.5, 4.0), squeeze=False)
    width = 0.8 / max(1, len(merges))
    others = iter(_DEFAULT_COLORS * (1 + len(merges) // len(_DEFAULT_COLORS)))
    colors = [_CHOSEN_COLOR if row.name.startswith("chosen") else next(others) for row in merges]
    for ax, metric in zip(axes[0], metrics):
        for index, (row, color) in enumerate(zip(merges, colors)):
            values = [row.summary.get(f"{t}:{metric}") for t in result.tasks] + [row.summary.get(metric)]
            xs = [i - 0.4 + width * (index + 0.5) for i in range(len(values))]
            ax.bar(xs, [math.nan if v is None else v for v in values], width=width, label=row.name, color=color)
        set_column_labels(ax, [*result.tasks, "mean"])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(f"{metric.replace('_', ' ')} on the test split", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def card_section(result: SweepResult) -> str:
    """The model card's `## Sweep` section: how this merge was chosen, and its test-split table."""
    spec = result.config.spec
    return ("## Sweep\n\n"
            f"Chosen by `merge sweep` among {len(result.rows)} point(s) ({spec.search} search over "
            f"{', '.join(spec.methods)}) by `{result.metric}` on each task's validation split; reported on the test "
            "split:\n\n" + test_markdown(result).split("\n", 2)[2])


def write_best_merge(result: SweepResult, overwrite: bool) -> Path:
    """Merge the best point into `output:` like `merge run` (replacing an existing one only with `overwrite`),
    then add the sweep's summary to its card."""
    from ..api import merge
    from ..writers.card import render_card, replace_card
    from .result import point_config

    assert result.best is not None and result.best.point is not None
    config = point_config(result.config, result.best.point)
    merged = merge(config, overwrite=overwrite, progress=False)
    assert merged.output_dir is not None
    replace_card(merged.output_dir, render_card(config, extra_sections=[card_section(result)]))
    return merged.output_dir
