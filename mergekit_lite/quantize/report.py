"""The quantization report of a merge: per-layer and per-module summaries, the worst tensors, a verdict per format,
and the files (`quantize.md`, `quantize.json`, `quantize.png`) that `merge verify --quantize --report DIR` writes.

Groups add up their tensors' sums before dividing, so a group's share is ⟨·,·⟩ / ‖ΔW‖² over the group: large
changes weigh more, as they do in the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .measure import ZERO, Figures
from .merged import MergeQuantization, TensorResult

MARKDOWN, JSON, FIGURE = "quantize.md", "quantize.json", "quantize.png"
#: a format keeps the change when both its share and its cosine reach this
KEEPS = 0.95
#: below this share the change is erased, whatever the cosine
ERASED = 0.9
#: below this cosine what arrives is mostly rounding noise, not the change
NOISE = 0.5
#: tensors listed as the worst, per format
WORST = 5


def _sum(items: list[Figures]) -> Figures:
    total = ZERO
    for item in items:
        total = total + item
    return total


def grouped(result: MergeQuantization, fmt: str, key: str) -> dict[Any, Figures]:
    """Figures per layer (key "layer") or per module (key "module") for one format, summed over tensors."""
    groups: dict[Any, list[Figures]] = {}
    for tensor in result.tensors:
        if fmt in tensor.figures:
            groups.setdefault(getattr(tensor, key), []).append(tensor.figures[fmt])
    return {group: _sum(items) for group, items in groups.items()}


def overall(result: MergeQuantization, fmt: str) -> Figures:
    """One format's figures over every measured tensor."""
    return _sum([t.figures[fmt] for t in result.tensors if fmt in t.figures])


def worst(result: MergeQuantization, fmt: str, count: int = WORST) -> list[TensorResult]:
    """The tensors that keep least of their change (lowest cosine first: share near 1 with a low cosine is noise)."""
    measured = [t for t in result.tensors if fmt in t.figures]
    return sorted(measured, key=lambda t: (_nan_low(t.figures[fmt].cosine), _nan_low(t.figures[fmt].share)))[:count]


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def layer_ranges(layers: list[int]) -> str:
    """'20–31' or '3, 7–9' from sorted layer indices."""
    parts: list[str] = []
    start = previous = None
    for layer in sorted(set(layers)):
        if previous is not None and layer == previous + 1:
            previous = layer
            continue
        if start is not None:
            parts.append(f"{start}–{previous}" if previous != start else f"{start}")
        start = previous = layer
    if start is not None:
        parts.append(f"{start}–{previous}" if previous != start else f"{start}")
    return ", ".join(parts)


def _kept(figures: Figures) -> bool:
    return figures.share >= KEEPS and figures.cosine >= KEEPS


def _losing(result: MergeQuantization, fmt: str) -> tuple[str, list[TensorResult]] | None:
    """The module whose tensors that do not keep their change carry the most of it, with those tensors."""
    losing: dict[str, list[TensorResult]] = {}
    for tensor in result.tensors:
        if fmt in tensor.figures and not _kept(tensor.figures[fmt]):
            losing.setdefault(tensor.module, []).append(tensor)
    if not losing:
        return None
    module = max(losing, key=lambda m: (sum(t.figures[fmt].delta_sq for t in losing[m]), m))
    return module, losing[module]


def verdict(result: MergeQuantization, fmt: str) -> str:
    """One sentence per format: keeps the change, erases part of it (where), or delivers it only as noise.

    Judged tensor by tensor, so a module that loses its change is named even when larger changes elsewhere
    dominate the sums: the sentence names the module whose losing tensors carry the most of ‖ΔW‖², their layers,
    and the figures over those tensors.
    """
    total = overall(result, fmt)
    if total.delta_sq == 0:
        return f"{fmt}: no tensor of this merge fits its blocks; nothing measured"
    found = _losing(result, fmt)
    if found is None:
        return (f"{fmt} keeps the merge's change: {total.share:.0%} arrives, cosine {total.cosine:.3f}, rounding "
                f"error {total.error:.2g}× ‖ΔW‖; safe to quantize")
    module, tensors = found
    part = _sum([t.figures[fmt] for t in tensors])
    layers = [t.layer for t in tensors if t.layer is not None]
    where = f"{module} layers {layer_ranges(layers)}" if layers else module
    fraction = part.delta_sq / total.delta_sq
    stake = f"{fraction:.0%} of the merge's ‖ΔW‖²" if fraction >= 0.01 else "under 1% of the merge's ‖ΔW‖²"
    safer = _safer(result, fmt)
    if part.share < ERASED:
        return (f"{fmt} keeps {part.share:.0%} of the merge's change in {where} ({stake}; {total.share:.0%} "
                f"overall): serve the merged adapter on a quantized base, or use {safer}")
    how = "only as rounding noise" if part.cosine < NOISE else "blurred"
    return (f"{fmt} delivers the merge's change {how} in {where} ({stake}): {part.share:.0%} arrives on average "
            f"but at cosine {part.cosine:.2f}, with a rounding error {part.error:.2g}× ‖ΔW‖ (overall cosine "
            f"{total.cosine:.2f}); check the quantized model with `merge eval --quantize {fmt}`, serve the merged "
            f"adapter on a quantized base, or use {safer}")


def _safer(result: MergeQuantization, fmt: str) -> str:
    """A measured format that keeps the change in every module, else q8_0 (the finest the gguf package makes)."""
    for other in result.formats:
        if other.name != fmt and overall(result, other.name).delta_sq and _losing(result, other.name) is None:
            return other.name
    q8_measured = any(f.name == "q8_0" for f in result.formats)
    return "q8_0" if fmt != "q8_0" and not q8_measured else "a 16-bit model"


def to_json(result: MergeQuantization) -> dict[str, Any]:
    """Everything the report shows, machine-readable (NaN written as null)."""
    formats = [f.name for f in result.formats]
    data: dict[str, Any] = {
        "output": str(result.output), "base": str(result.base), "kind": result.kind,
        "formats": {f.name: {"library": f.library, "block": f.block} for f in result.formats},
        "definitions": {
            "share": "<Q(W+dW) - Q(W), dW> / |dW|^2", "cosine": "cos(Q(W+dW) - Q(W), dW)",
            "error": "|Q(W+dW) - (W+dW)| / |dW|", "relative_norm": "|dW| / |W|"},
        "overall": {f: overall(result, f).as_dict() for f in formats},
        "verdicts": {f: verdict(result, f) for f in formats},
        "layers": {f: [{"layer": layer, **fig.as_dict()} for layer, fig in sorted(
            (k, v) for k, v in grouped(result, f, "layer").items() if k is not None)] for f in formats},
        "modules": {f: [{"module": m, **fig.as_dict()} for m, fig in sorted(grouped(result, f, "module").items())]
                    for f in formats},
        "worst": {f: [t.name for t in worst(result, f)] for f in formats},
        "tensors": [{"name": t.name, "shape": list(t.shape), "layer": t.layer, "module": t.module,
                     "figures": {f: fig.as_dict() for f, fig in t.figures.items()}} for t in result.tensors],
        "skipped": [{"tensor": name, "why": why} for name, why in result.skipped],
    }
    return _finite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _cell(value: float, spec: str) -> str:
    return "–" if math.isnan(value) else format(value, spec)


def summary_lines(result: MergeQuantization) -> list[str]:
    """The console report: one line per format, then the verdicts."""
    lines = [f"{result.output}: {len(result.tensors)} merged tensor(s) against {result.base}"
             f" ({result.kind} output)"]
    for fmt in result.formats:
        total = overall(result, fmt.name)
        lines.append(f"  {fmt.name:6s} share {_cell(total.share, '.4f')}  cosine {_cell(total.cosine, '.4f')}  "
                     f"error {_cell(total.error, '.3g')}x|dW|   (|dW|/|W| {_cell(total.relative, '.3g')}, "
                     f"{fmt.library})")
    lines += [f"verdict: {verdict(result, f.name)}" for f in result.formats]
    if result.skipped:
        lines.append(f"  {len(result.skipped)} tensor/format pair(s) not measured (see the report's 'Not measured')")
    return lines


def markdown(result: MergeQuantization, figure: str | None) -> str:
    """The human report: verdicts, overall, per module, per layer, worst tensors, what was not measured."""
    names = [f.name for f in result.formats]
    out = [f"# Will the merge survive quantization?\n",
           f"Output `{result.output}` ({result.kind}), base `{result.base}`, {len(result.tensors)} merged tensors.",
           "share = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖², cosine = cos(Q(W+ΔW) − Q(W), ΔW), "
           "error = ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖; Q is each format's own library (gguf, bitsandbytes).\n",
           "## Verdict\n"]
    out += [f"- {verdict(result, n)}" for n in names]
    out += ["", "## Overall\n", "| format | share | cosine | error | ‖ΔW‖/‖W‖ |", "|---|---|---|---|---|"]
    for n in names:
        t = overall(result, n)
        out.append(f"| {n} | {_cell(t.share, '.4f')} | {_cell(t.cosine, '.4f')} | {_cell(t.error, '.3g')} | "
                   f"{_cell(t.relative, '.3g')} |")
    if figure:
        out += ["", f"![share surviving per layer]({figure})"]
    for title, key in (("Per module", "module"), ("Per layer", "layer")):
        out += ["", f"## {title} (share / cosine)\n", f"| {key} | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        groups = {n: grouped(result, n, key) for n in names}
        keys = sorted({k for g in groups.values() for k in g}, key=lambda k: (k is None, k if k is not None else 0))
        for k in keys:
            cells = [f"{_cell(groups[n][k].share, '.3f')} / {_cell(groups[n][k].cosine, '.3f')}" if k in groups[n]
                     else "–" for n in names]
            out.append(f"| {'—' if k is None else k} | " + " | ".join(cells) + " |")
    out += ["", "## Worst tensors\n"]
    for n in names:
        out.append(f"- {n}: " + ", ".join(f"`{t.name}` ({_cell(t.figures[n].share, '.3f')} / "
                                             f"{_cell(t.figures[n].cosine, '.3f')})" for t in worst(result, n)))
    if result.skipped:
        out += ["", "## Not measured\n"] + [f"- `{name}`: {why}" for name, why in result.skipped]
    return "\n".join(out) + "\n"


def write_figure(result: MergeQuantization, path: Path) -> bool:
    """quantize.png: the share surviving per layer, one line per format (False when no tensor has a layer)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = {f.name: sorted((k, v) for k, v in grouped(result, f.name, "layer").items() if k is not None)
              for f in result.formats}
    if not any(series.values()):
        return False
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    for name, points in series.items():
        if points:
            (line,) = axis.plot([p[0] for p in points], [p[1].share for p in points], marker="o",
                                label=f"{name} share")
            axis.plot([p[0] for p in points], [p[1].cosine for p in points], linestyle="--", alpha=0.7,
                      color=line.get_color(), label=f"{name} cosine")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("layer")
    axis.set_ylabel("of the merge's change ΔW")
    axis.set_title("What of the merge survives quantization")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(result: MergeQuantization, folder: Path) -> list[str]:
    """Write quantize.md, quantize.json and (with matplotlib) quantize.png into `folder`; return their names."""
    written = []
    figure = None
    try:
        if write_figure(result, folder / FIGURE):
            figure = FIGURE
            written.append(FIGURE)
    except ImportError:
        pass
    (folder / JSON).write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (folder / MARKDOWN).write_text(markdown(result, figure), encoding="utf-8")
    return [MARKDOWN, JSON, *written]
