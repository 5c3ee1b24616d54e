"""inspect.json (schema below, documented in docs/INSPECT.md), report.md and the short text report.

Schema version 1. Top-level keys: `SCHEMA_KEYS`; each adapter: `ADAPTER_KEYS`; each pair: `PAIR_KEYS`;
`conflicts`: `CONFLICT_KEYS`; each layer: `LAYER_KEYS`; each tensor: `TENSOR_KEYS`. A change to any of these
lists is a schema change: bump SCHEMA_VERSION and update docs/INSPECT.md (a test holds the two together).
Numbers that cannot be defined (a cosine with a zero task vector, a conflict rate with no shared entry) are null.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

from ..version import tool_version
from .analyse import Inspection, TensorResult
from .geometry import cosine_of
from .verdict import Finding, density_text, interference_lines, verdict

SCHEMA = "mergekit_lite/inspect"
SCHEMA_VERSION = 2
SCHEMA_KEYS = ("schema", "schema_version", "tool_version", "base_model", "base_folder", "method", "settings",
               "adapters", "pairs", "conflicts", "layers", "tensors", "verdict", "interference", "figures", "timings")
SETTINGS_KEYS = ("weights", "densities", "sample", "sampled")
ADAPTER_KEYS = ("name", "path", "weight", "density", "modules", "tensors", "ranks", "alphas", "scales", "use_rslora",
                "norm", "relative_norm", "effective_rank_mean", "layers")
ADAPTER_LAYER_KEYS = ("layer", "norm", "relative_norm")
PAIR_KEYS = ("a", "b", "cosine", "overlap_columns", "overlap_rows", "conflict_rate", "kept_by_both", "shared_tensors")
CONFLICT_KEYS = ("densities", "rate", "independent_rate", "overlapping", "conflicting", "kept", "dropped", "dropped_share", "entries",
                 "sampled")
LAYER_KEYS = ("layer", "relative_norm", "conflict_rate", "independent_rate")
TENSOR_KEYS = ("name", "shape", "layer", "kind", "adapters", "base_norm", "norms", "relative_norms", "cosine",
               "ranks", "effective_ranks", "overlap_columns", "overlap_rows", "sum_spectrum", "conflicts")
TENSOR_CONFLICT_KEYS = ("adapters", "rate", "overlapping", "conflicting", "kept", "dropped", "entries")
VERDICT_KEYS = ("finding", "text", "figures")
TIMING_KEYS = ("total_s", "geometry_s", "base_norms_s", "conflicts_s")
#: `interference` (null without calibration data): interference.report_json
INTERFERENCE_KEYS = ("adapters", "calibration", "settings", "base_ll", "own_ll", "gain", "alone_ll", "pair_ll", "cost",
                     "cost_share", "offender", "suggested", "verdict", "timings")
INTERFERENCE_CALIBRATION_KEYS = ("adapter", "source", "prompts", "tokens")
INTERFERENCE_SETTINGS_KEYS = ("device", "dtype", "batch_size", "max_new_tokens")
SUGGESTED_KEYS = ("weights", "grid", "max_pair_loss", "mean_pair_loss", "pair_loss", "merged_kept", "config")


def _num(value: float | None) -> float | None:
    """A JSON-safe float: NaN and ±inf become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def build_json(result: Inspection, findings: list[Finding], figures: list[str],
               interference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report as plain JSON data, keys in the documented order."""
    n = len(result.labels)
    counts = result.conflicts()
    config = result.config
    layers = [*result.layers, *([None] if any(t.layer is None for t in result.tensors) else [])]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool_version": tool_version(),
        "base_model": config.base_model,
        "base_folder": result.base_folder,
        "method": config.method if result.method_given else None,
        "settings": {"weights": result.weights, "densities": result.densities, "sample": result.sample,
                     "sampled": result.sampled},
        "adapters": [_adapter(result, i, layers) for i in range(n)],
        "pairs": [_pair(result, i, j, counts) for i, j in combinations(range(n), 2)],
        "conflicts": {"densities": result.densities, "rate": _num(counts.rate),
                      "independent_rate": _num(counts.independent_rate), "overlapping": counts.overlapping,
                      "conflicting": counts.conflicting, "kept": counts.kept, "dropped": counts.dropped,
                      "dropped_share": _num(counts.dropped_share), "entries": counts.entries,
                      "sampled": result.sampled},
        "layers": [{"layer": layer,
                    "relative_norm": {result.labels[i]: _num(result.relative_norm(i, layer)) for i in range(n)},
                    "conflict_rate": _num(result.conflicts(layer).rate),
                    "independent_rate": _num(result.conflicts(layer).independent_rate)} for layer in layers],
        "tensors": [_tensor(result, t) for t in result.tensors],
        "verdict": [{"finding": f.key, "text": f.text,
                     "figures": {k: (_num(v) if isinstance(v, float) else v) for k, v in f.figures.items()}}
                    for f in findings],
        "interference": interference,
        "figures": figures,
        "timings": {key: round(result.timings.get(key, 0.0), 4) for key in TIMING_KEYS},
    }


def _adapter(result: Inspection, i: int, layers: list[int | None]) -> dict[str, Any]:
    modules = [m for m in result.adapter_modules[i] if not m.get("saved")]
    spec = result.config.inputs[i]
    effective = [t.geometry.effective_ranks[t.position(i)] for t in result.tensors  # type: ignore[index]
                 if t.geometry is not None and i in t.adapters]
    per_layer = []
    for layer in layers:
        tensors = [t for t in result.tensors if i in t.adapters and t.layer == layer]
        if tensors:
            norm = math.sqrt(sum(t.norm(i) ** 2 for t in tensors))  # type: ignore[operator]
            per_layer.append({"layer": layer, "norm": norm, "relative_norm": _num(result.relative_norm(i, layer))})
    return {
        "name": result.labels[i],
        "path": spec.path,
        "weight": spec.weight,
        "density": result.densities[i],
        "modules": sorted({m["module"].rsplit(".", 1)[-1] for m in result.adapter_modules[i]}),
        "tensors": sum(1 for t in result.tensors if i in t.adapters),
        "ranks": sorted({m["rank"] for m in modules}),
        "alphas": sorted({m["alpha"] for m in modules}),
        "scales": sorted({round(m["scale"], 10) for m in modules}),
        "use_rslora": any(m["rslora"] for m in modules),
        "norm": math.sqrt(result.square_norm(i)),
        "relative_norm": _num(result.relative_norm(i)),
        "effective_rank_mean": sum(effective) / len(effective) if effective else None,
        "layers": per_layer,
    }


def _pair(result: Inspection, i: int, j: int, counts: Any) -> dict[str, Any]:
    return {
        "a": result.labels[i], "b": result.labels[j],
        "cosine": _num(result.cosine(i, j)),
        "overlap_columns": _num(result.overlap(i, j, "column")),
        "overlap_rows": _num(result.overlap(i, j, "row")),
        "conflict_rate": _num(counts.pair_rate(i, j)),
        "kept_by_both": counts.pair_both[i][j],
        "shared_tensors": result.shared_tensors(i, j),
    }


def _tensor(result: Inspection, t: TensorResult) -> dict[str, Any]:
    g = t.geometry
    count = len(t.adapters)
    norms = [t.norm(i) for i in t.adapters]
    cosine = [[_num(_cos(t, a, b)) for b in range(count)] for a in range(count)]
    conflicts = None
    if t.conflicts is not None:
        c = t.conflicts
        conflicts = {"adapters": [result.labels[i] for i in t.conflict_adapters], "rate": _num(c.rate),
                     "overlapping": c.overlapping, "conflicting": c.conflicting, "kept": c.kept, "dropped": c.dropped,
                     "entries": c.entries}
    return {
        "name": t.name,
        "shape": list(t.shape),
        "layer": t.layer,
        "kind": t.kind,
        "adapters": [result.labels[i] for i in t.adapters],
        "base_norm": t.base_norm,
        "norms": norms,
        "relative_norms": [_num(x / t.base_norm) if t.base_norm > 0 else None for x in norms],  # type: ignore[operator]
        "cosine": cosine,
        "ranks": g.ranks if g else None,
        "effective_ranks": g.effective_ranks if g else None,
        "overlap_columns": g.column_overlap if g else None,
        "overlap_rows": g.row_overlap if g else None,
        "sum_spectrum": g.sum_spectrum if g else None,
        "conflicts": conflicts,
    }


def _cos(t: TensorResult, a: int, b: int) -> float | None:
    return cosine_of(float(t.inner[a, b]), float(t.inner[a, a]), float(t.inner[b, b]))


# -- human-readable renderings -----------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def text_report(data: dict[str, Any]) -> str:
    """The short report `merge inspect` prints (from the JSON data, so both always agree)."""
    settings = data["settings"]
    c = data["conflicts"]
    lines = [f"merge inspect: {len(data['adapters'])} adapter(s) on {data['base_model']}"
             + (f" (config method {data['method']})" if data["method"] else "")]
    width = max([len(a["name"]) for a in data["adapters"]] + [7])
    lines.append(f"  {'adapter':{width}s}  weight  tensors  ranks    ‖τ‖       ‖τ‖/‖W‖  eff. rank")
    for a in data["adapters"]:
        ranks = "/".join(map(str, a["ranks"])) or "–"
        lines.append(f"  {a['name']:{width}s}  {a['weight']:6g}  {a['tensors']:7d}  {ranks:7s}  {a['norm']:8.4g}  "
                     f"{_f(a['relative_norm']):>7s}  {_f(a['effective_rank_mean'], 2):>9s}")
    if data["pairs"]:
        pair_width = max(len(f"{p['a']} × {p['b']}") for p in data["pairs"])
        lines.append(f"  {'pair':{pair_width}s}  cosine   overlap col/row  conflicts")
        for p in data["pairs"]:
            lines.append(f"  {p['a'] + ' × ' + p['b']:{pair_width}s}  {_f(p['cosine']):>6s}   "
                         f"{_f(p['overlap_columns'], 2):>5s} / {_f(p['overlap_rows'], 2):5s}     {_pct(p['conflict_rate']):>6s}")
        sampled = f", estimated from a sample of ≤ {settings['sample']} entries per tensor" if settings["sampled"] else ""
        lines.append(f"  sign conflicts at TIES {density_text(settings['densities'])}: {_pct(c['rate'])} of the "
                     f"{c['overlapping']:,} entries kept by two or more adapters (independent signs: "
                     f"{_pct(c['independent_rate'])}){sampled}; the sign election would "
                     f"drop {_pct(c['dropped_share'])} of the {c['kept']:,} kept entries")
    lines.append("verdict (heuristics):")
    lines += [f"  - {v['text']}" for v in data["verdict"]]
    lines += interference_text(data)
    return "\n".join(lines)


def markdown_report(data: dict[str, Any]) -> str:
    """report.md: the tables, the per-layer view, the verdict and the figures."""
    settings = data["settings"]
    lines = ["# merge inspect", "",
             f"Base `{data['base_model']}`, {len(data['adapters'])} adapter(s)"
             + (f", config method `{data['method']}`" if data["method"] else "")
             + f"; mergekit_lite {data['tool_version']}. Definitions: docs/INSPECT.md.", "", "## Verdict", ""]
    lines += [f"- {v['text']}" for v in data["verdict"]]
    lines += ["", "## Adapters", "",
              "| adapter | weight | modules | tensors | ranks | scales | ‖τ‖_F | ‖τ‖/‖W‖ | mean effective rank |",
              "|---|---|---|---|---|---|---|---|---|"]
    for a in data["adapters"]:
        lines.append(f"| {a['name']} | {a['weight']:g} | {', '.join(a['modules'])} | {a['tensors']} | "
                     f"{'/'.join(map(str, a['ranks']))} | {'/'.join(f'{s:.4g}' for s in a['scales'])}"
                     f"{' (rsLoRA)' if a['use_rslora'] else ''} | {a['norm']:.4g} | {_f(a['relative_norm'])} | "
                     f"{_f(a['effective_rank_mean'], 2)} |")
    if data["pairs"]:
        c = data["conflicts"]
        lines += ["", "## Pairs", "", "| pair | cosine | overlap (columns) | overlap (rows) | sign conflicts | "
                  "kept by both | shared tensors |", "|---|---|---|---|---|---|---|"]
        for p in data["pairs"]:
            lines.append(f"| {p['a']} × {p['b']} | {_f(p['cosine'])} | {_f(p['overlap_columns'])} | "
                         f"{_f(p['overlap_rows'])} | {_pct(p['conflict_rate'])} | {p['kept_by_both']:,} | "
                         f"{p['shared_tensors']} |")
        sampled = (f" Estimated from a sample of at most {settings['sample']} entries per tensor."
                   if settings["sampled"] else " Exact: every entry of every tensor.")
        lines += ["", f"Sign conflicts at TIES {density_text(settings['densities'])}: {_pct(c['rate'])} of the "
                  f"{c['overlapping']:,} entries kept by two or more adapters hold both signs; TIES' sign election "
                  f"would drop {_pct(c['dropped_share'])} of the {c['kept']:,} kept entries.{sampled} Independent "
                  f"fair signs on the same kept entries would give {_pct(c['independent_rate'])} (50% per pair)."]
    lines += ["", "## Layers", "", "| layer | " + " | ".join(f"‖τ‖/‖W‖ {a['name']}" for a in data["adapters"])
              + " | sign conflicts |", "|---" * (len(data["adapters"]) + 2) + "|"]
    for layer in data["layers"]:
        name = "other" if layer["layer"] is None else str(layer["layer"])
        values = " | ".join(_f(layer["relative_norm"][a["name"]]) for a in data["adapters"])
        lines.append(f"| {name} | {values} | {_pct(layer['conflict_rate'])} |")
    lines += interference_markdown(data)
    if data["figures"]:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in data["figures"]]
    t = data["timings"]
    lines += ["", f"Took {t['total_s']:.2f} s (conflicts {t['conflicts_s']:.2f} s, geometry {t['geometry_s']:.2f} s, "
              f"base norms {t['base_norms_s']:.2f} s). Per-tensor numbers: inspect.json.", ""]
    return "\n".join(lines)


def report_data(result: Inspection, figures: list[str], interference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON data with its verdict (and the measured interference, when calibration data was given)."""
    return build_json(result, verdict(result), figures, interference)


# -- the measured interference (calibration prompts) --------------------------------------------------------


def _share_cell(share: float | None, cost: float | None) -> str:
    return "–" if cost is None else (f"{share:.0%} ({cost:+.3f})" if share is not None else f"({cost:+.3f})")


def interference_text(data: dict[str, Any]) -> list[str]:
    """The interference section of the short report (a one-line hint without calibration data)."""
    block = data.get("interference")
    if block is None:
        return [f"  - {line}" for line in interference_lines(None, len(data["adapters"]))]
    names = block["adapters"]
    width = max([len(n) for n in names] + [7])
    lines = ["interference (measured: each adapter's own greedy continuations of its calibration prompts, "
             "log-likelihood in nats/token):",
             f"  {'adapter':{width}s}  prompts  tokens  base LL  own LL   gain"]
    for i, name in enumerate(names):
        c = block["calibration"][i]
        lines.append(f"  {name:{width}s}  {c['prompts']:7d}  {c['tokens']:6d}  {_f(block['base_ll'][i]):>7s}  "
                     f"{_f(block['own_ll'][i]):>6s}  {_f(block['gain'][i]):>5s}")
    if len(names) >= 2:
        cell = max(14, width)
        lines.append("  what adding the column's adapter costs the row's, as a share of the row's gain (nats/token):")
        lines.append(f"  {'':{width}s}  " + "  ".join(f"{n:>{cell}s}" for n in names))
        for i, name in enumerate(names):
            cells = ["·" if i == j else _share_cell(block["cost_share"][i][j], block["cost"][i][j])
                     for j in range(len(names))]
            lines.append(f"  {name:{width}s}  " + "  ".join(f"{c:>{cell}s}" for c in cells))
    lines.append("verdict (measured):")
    lines += [f"  - {text}" for text in interference_lines(block, len(names))]
    return lines


def interference_markdown(data: dict[str, Any]) -> list[str]:
    """report.md's interference section (a one-line hint without calibration data)."""
    block = data.get("interference")
    if block is None:
        return ["", *[f"- {line}" for line in interference_lines(None, len(data["adapters"]))]]
    names = block["adapters"]
    s = block["settings"]
    lines = ["", "## Interference (measured on calibration prompts)", "",
             f"Each adapter continues its own calibration prompts greedily (up to {s['max_new_tokens']} tokens); "
             "those continuations are scored (log-likelihood per token, nats, teacher-forced as `merge eval` scores "
             "an answer) under the base, the adapter alone, each other adapter alone, and every pairwise merge "
             f"base + τᵢ + τⱼ, on the base loaded once with the adapters as branches ({s['device']}, {s['dtype']}). "
             "Definitions: docs/INSPECT.md.", "",
             "| adapter | calibration | prompts | tokens | LL base | LL alone | gain |", "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        c = block["calibration"][i]
        lines.append(f"| {name} | {c['source']} | {c['prompts']} | {c['tokens']} | {_f(block['base_ll'][i])} | "
                     f"{_f(block['own_ll'][i])} | {_f(block['gain'][i])} |")
    if len(names) >= 2:
        lines += ["", "What adding the column's adapter costs the row's: share of the row's gain (nats per token).", "",
                  "| costs → | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, name in enumerate(names):
            cells = ["·" if i == j else _share_cell(block["cost_share"][i][j], block["cost"][i][j])
                     for j in range(len(names))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Log-likelihood of the row's continuations under base + the column's adapter alone "
                  "(the diagonal: the row's own):", "", "| on ↓ / model → | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for i, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(_f(v) for v in block["alone_ll"][i]) + " |")
        suggested = block.get("suggested")
        if suggested:
            kept = suggested["merged_kept"]
            lines += ["", f"Suggested starting weights (grid {', '.join(f'{g:g}' for g in suggested['grid'])} per "
                      f"adapter, chosen to minimize the largest pairwise loss; `{suggested['config']}`):", "",
                      "| adapter | weight | kept by the merge at weights 1 | kept at these weights |",
                      "|---|---|---|---|"]
            for i, name in enumerate(names):
                lines.append(f"| {name} | {suggested['weights'][name]:g} | {_pct((kept.get('ones') or [None] * len(names))[i])}"
                             f" | {_pct((kept.get('suggested') or [None] * len(names))[i])} |")
    lines += ["", "### Verdict (measured)", ""] + [f"- {text}" for text in interference_lines(block, len(names))]
    t = block["timings"]
    lines += ["", "Took " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in t.items()) + "."]
    return lines
