"""The PNG figures of `merge inspect` (matplotlib, Agg backend, imported only when figures are asked for).

- heatmaps.png: adapters × adapters cosine, column-space overlap and row-space overlap;
- layers.png: per layer, ‖τᵢ‖/‖W‖ of each adapter and the sign-conflict rate;
- spectra.png: singular values of the summed delta Σ wᵢτᵢ for a few tensors (largest in the first, middle
  and last layer);
- interference.png (with calibration data): what adding each adapter costs each other, as a share of its gain.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

HEATMAPS, LAYERS, SPECTRA, INTERFERENCE = "heatmaps.png", "layers.png", "spectra.png", "interference.png"
#: at most this many tensors in spectra.png
SPECTRA_TENSORS = 4


def write_figures(data: dict[str, Any], folder: Path) -> list[str]:
    """Write every figure the data supports into `folder`; return their file names."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    written = []
    if len(data["adapters"]) >= 2:
        _heatmaps(data, folder / HEATMAPS)
        written.append(HEATMAPS)
    if data["layers"]:
        _layers(data, folder / LAYERS)
        written.append(LAYERS)
    chosen = chosen_spectra(data)
    if chosen:
        _spectra(chosen, folder / SPECTRA)
        written.append(SPECTRA)
    block = data.get("interference")
    if block is not None and len(block["adapters"]) >= 2:
        from .interference import draw_matrix

        draw_matrix(block, folder / INTERFERENCE)
        written.append(INTERFERENCE)
    return written


def pair_matrix(data: dict[str, Any], key: str) -> list[list[float]]:
    """An adapters × adapters matrix of a pair quantity (1 on the diagonal, NaN where undefined)."""
    names = [a["name"] for a in data["adapters"]]
    matrix = [[1.0 if i == j else math.nan for j in range(len(names))] for i in range(len(names))]
    for pair in data["pairs"]:
        i, j = names.index(pair["a"]), names.index(pair["b"])
        value = pair[key] if pair[key] is not None else math.nan
        matrix[i][j] = matrix[j][i] = value
    return matrix


def chosen_spectra(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The tensors whose summed-delta spectra are drawn: the largest ‖Σ wᵢτᵢ‖ of the first, middle and last
    layer (or of the whole model when names carry no layer), at most SPECTRA_TENSORS."""
    with_spectrum = [t for t in data["tensors"] if t["sum_spectrum"]]
    if not with_spectrum:
        return []

    def size(t: dict[str, Any]) -> float:
        return math.sqrt(sum(s * s for s in t["sum_spectrum"]))

    layers = sorted({t["layer"] for t in with_spectrum if t["layer"] is not None})
    chosen = []
    if layers:
        for layer in dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]):
            chosen.append(max((t for t in with_spectrum if t["layer"] == layer), key=size))
    for t in sorted(with_spectrum, key=size, reverse=True):
        if len(chosen) >= min(SPECTRA_TENSORS, len(with_spectrum)):
            break
        if t not in chosen:
            chosen.append(t)
    return chosen[:SPECTRA_TENSORS]


def _heatmaps(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [a["name"] for a in data["adapters"]]
    panels = [("cosine", "cosine of τᵢ, τⱼ", -1.0, 1.0, "RdBu_r"),
              ("overlap_columns", "column-space overlap", 0.0, 1.0, "viridis"),
              ("overlap_rows", "row-space overlap", 0.0, 1.0, "viridis")]
    size = max(3.2, 0.55 * len(names) + 1.8)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (key, title, low, high, cmap) in zip(axes[0], panels):
        matrix = pair_matrix(data, key)
        image = ax.imshow(matrix, vmin=low, vmax=high, cmap=cmap)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if (key != "cosine" and value < 0.5) or abs(value) > 0.7 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("adapters compared (exact, from the LoRA factors)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layers(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [layer for layer in data["layers"] if layer["layer"] is not None]
    if not rows:
        rows = data["layers"]
    xs = list(range(len(rows)))
    labels = [str(layer["layer"]) if layer["layer"] is not None else "other" for layer in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    left, right = axes[0]
    for adapter in data["adapters"]:
        values = [layer["relative_norm"][adapter["name"]] for layer in rows]
        left.plot(xs, [math.nan if v is None else v for v in values], marker="o", label=adapter["name"])
    left.set_title("‖τᵢ‖ / ‖W‖ per layer", fontsize=10)
    left.legend(fontsize=8, frameon=False)
    rates = [math.nan if layer["conflict_rate"] is None else layer["conflict_rate"] for layer in rows]
    right.plot(xs, rates, marker="o", color="#e6550d", label="measured")
    right.plot(xs, [math.nan if layer["independent_rate"] is None else layer["independent_rate"] for layer in rows],
               color="grey", linewidth=0.8, linestyle="--", label="independent signs, same kept entries")
    right.set_ylim(0, 1)
    settings = data["settings"]
    densities = sorted(set(settings["densities"]))
    density = f"d={densities[0]:g}" if len(densities) == 1 else "per-adapter d"
    right.set_title(f"sign-conflict rate among entries TIES keeps ({density}"
                    f"{', sampled' if settings['sampled'] else ''})", fontsize=10)
    right.legend(fontsize=8, frameon=False)
    for ax in (left, right):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spectra(chosen: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for t in chosen:
        values = t["sum_spectrum"]
        ax.semilogy(range(1, len(values) + 1), [v / values[0] for v in values], marker=".", label=t["name"])
    ax.set_xlabel("index")
    ax.set_ylabel("σₖ / σ₁ of Σ wᵢτᵢ")
    ax.set_title("spectra of the summed delta (exact, from the core)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
