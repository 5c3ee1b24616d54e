"""breadcrumbs and breadcrumbs_ties: drop each τᵢ's largest outliers and its small entries, keep the band between.

Model Breadcrumbs (Davari & Belilovsky, 2023): of each τᵢ, the gᵢ = ⌊gammaᵢ·numel⌋ largest magnitudes are
outliers and the entries below the next kᵢ = ⌊densityᵢ·numel⌋ are noise; both are zeroed. Both cuts are exact
top-k sets (ties: lower flat index first, as TIES' trim), so the kept set never depends on the chunking.
`breadcrumbs` sums the weighted remainders, `breadcrumbs_ties` adds TIES' sign election (SEMANTICS §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from .registry import Param
from .sparsifiers import Cut, Sparsifier, kept_count
from .sparsifying import DENSITY, LAMBDA, NORMALIZE_TIES, SIGN, SPACE, register_sparse


def dropped_count(gamma: float, density: float, numel: int) -> int:
    """Breadcrumbs' gᵢ = ⌊gammaᵢ · numel⌋ largest magnitudes dropped (the same forgiving floor as kᵢ), at most
    numel − kᵢ so that kᵢ entries remain below them."""
    return min(kept_count(gamma, numel) if gamma > 0 else 0, numel - kept_count(density, numel))


class Breadcrumbs(Sparsifier):
    """Model Breadcrumbs: drop the gᵢ largest magnitudes (outliers) and keep the next kᵢ; the rest is zeroed.

    Two exact top sets: "keep" (the gᵢ + kᵢ largest) and "drop" (the gᵢ largest); kept = keep \\ drop. The cut
    trims to "keep" first, then zeroes "drop" (in that order: both may tie at one magnitude)."""

    name = "breadcrumbs"

    def ranks(self, own: Mapping[str, Any], numel: int) -> dict[str, int]:
        drop = dropped_count(own["gamma"], own["density"], numel)
        keep = drop + kept_count(own["density"], numel)
        return {**({"keep": keep} if keep < numel else {}), **({"drop": drop} if drop > 0 else {})}

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        keep, drop = cut.tops.get("keep"), cut.tops.get("drop")
        if keep is None and drop is None:
            return None
        out = keep.trim(tau, flat_start) if keep is not None else tau.clone(memory_format=torch.contiguous_format)
        if drop is not None:
            drop.drop_kept(out, flat_start)
        return out

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        keep, drop = cut.tops.get("keep"), cut.tops.get("drop")
        below = -1.0 if keep is None else keep.kernel_cut(tau, flat_start)
        if drop is not None:
            drop.drop_kept(tau, flat_start)
        return below


BREADCRUMBS = Breadcrumbs()
PAPER = "https://arxiv.org/abs/2312.06795"
GAMMA = Param("gamma", 0.01, float, "fraction of each task vector's largest magnitudes dropped as outliers, in "
              "[0, 1 − density]", per_adapter=True)


def _validate(_weights: Sequence[float], _params: Mapping[str, Any], own: Sequence[Mapping[str, Any]]) -> None:
    """The outliers dropped and the entries kept are disjoint: 0 ≤ gamma ≤ 1 − density."""
    for index, entry in enumerate(own):
        gamma, density = entry["gamma"], entry["density"]
        if gamma is None or density is None:
            continue
        if not 0.0 <= gamma <= 1.0 - density + 1e-12:
            raise MergeConfigError(f"adapters[{index}]: 'gamma' must be in [0, 1 − density] = [0, {1.0 - density:g}] "
                                   f"(the outliers dropped and the entries kept are disjoint), got {gamma!r}")


BREADCRUMBS_LINEAR = register_sparse(
    "breadcrumbs", sparsifier=BREADCRUMBS, ties=False,
    display_name="Model Breadcrumbs",
    paper_url=PAPER,
    summary="drop each τᵢ's ⌊gamma·numel⌋ largest magnitudes, keep the next ⌊density·numel⌋; τ = λ · Σ wᵢtᵢ",
    params=(DENSITY, GAMMA, LAMBDA, SPACE),
    validate=_validate,
)

BREADCRUMBS_TIES = register_sparse(
    "breadcrumbs_ties", sparsifier=BREADCRUMBS, ties=True,
    display_name="Model Breadcrumbs + TIES",
    paper_url=PAPER,
    summary="the Breadcrumbs tᵢ, then TIES sign election and disjoint mean of agreeing wᵢtᵢ",
    params=(DENSITY, GAMMA, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
    validate=_validate,
)
