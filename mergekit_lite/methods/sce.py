"""sce: mergekit's SCE (FuseChat's select, calculate, erase) (SEMANTICS §3b).

Per tensor, over the inputs' uᵢ = wᵢτᵢ (wᵢ = 1 by default; mergekit's SCE has no weights): *select* (`select_topk`
s < 1) — the per-entry population variance of the uᵢ across the inputs ranks the entries; the k = ⌊s · #{nonzero
variance}⌋ largest are kept and every uᵢ is zeroed elsewhere (exact, streamed: the engine's k-th selection over
the score, lower flat index first on ties); *calculate* — each input's weight is the mean of its (selected)
squared entries, normalised to sum 1 (1/n each when they sum below 10⁻⁶); *erase* — TIES' sign election on the
unweighted sum (γ = +1 where Σuᵢ ≥ 0), Mᵢ = [sign(uᵢ) = γ]; the result is W + Σ aᵢMᵢuᵢ / max(Σ aᵢMᵢ, 10⁻⁶). The
weights need every entry of the tensor, so a statistics pass (per-row float64 sums of squares, added in row
order) comes first; the erase is per entry. The variance is computed per entry in float64 (inputs summed in
config order) and rounded to float32 for the ranking: a pure function of the entry, so any chunking ranks alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._spherical import rows_of
from .registry import InterpolationPhase, MergeMethod, Param, register


def _taus(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    flat = rows_of(base_rows)
    return [torch.zeros_like(flat) if u is None else u.reshape(flat.shape) for u in updates]


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], _params: Mapping[str, Any]
                ) -> torch.Tensor:
    """Per row: Σ uᵢ² for each input, then the row's entry count (float64)."""
    taus = _taus(base_rows, updates)
    sums = [(t.to(torch.float64) ** 2).sum(dim=1) for t in taus]
    counts = torch.full_like(sums[0], float(taus[0].shape[1]))
    return torch.stack([*sums, counts], dim=1)


def sce_weights(squares: Sequence[float], numel: float) -> list[float]:
    """mergekit's matrix-level weights: the mean squares, normalised (1/n each when they sum below 1e-6)."""
    means = [s / numel for s in squares]
    total = sum(means)
    if abs(total) < 1e-6:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> list[float]:
    values = totals.tolist()
    return sce_weights(values[:-1], values[-1])


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], weights: list[float],
             _params: Mapping[str, Any]) -> torch.Tensor:
    """W + Σ aᵢMᵢuᵢ / max(Σ aᵢMᵢ, 1e-6), entry by entry."""
    taus = _taus(base_rows, updates)
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    numerator = torch.zeros_like(total)
    denominator = torch.zeros_like(total)
    for tau, weight in zip(taus, weights):
        kept = (torch.sign(tau) == majority).to(tau.dtype) * weight
        numerator += tau * kept
        denominator += kept
    merged = rows_of(base_rows) + numerator / denominator.clamp(min=1e-6)
    return merged.reshape(base_rows.shape)


def variance_score(updates: Sequence[torch.Tensor | None], _params: Mapping[str, Any]) -> torch.Tensor:
    """Per entry, the population variance of the uᵢ across all inputs (an input that does not touch the tensor
    counts as 0), in float64 summed in input order, rounded to float32: the selection's score."""
    present = [u for u in updates if u is not None]
    if not present:
        raise ValueError("sce's score needs at least one input touching the tensor")
    mean = torch.zeros(present[0].shape, dtype=torch.float64, device=present[0].device)
    for u in present:  # one float64 copy at a time: mean, spread and one temporary held
        mean += u.to(torch.float64)
    mean /= len(updates)
    spread = mean.square() * (len(updates) - len(present))  # the inputs that do not touch the tensor: uᵢ = 0
    for u in present:
        spread += (u.to(torch.float64) - mean).square()
    return (spread / len(updates)).to(torch.float32)


def _select_share(params: Mapping[str, Any]) -> float | None:
    """select_topk below 1 selects (the share of the nonzero-variance entries kept); 1 selects nothing."""
    share = float(params["select_topk"])
    return share if share < 1.0 else None


SCE = register(
    MergeMethod(
        name="sce",
        display_name="SCE",
        paper_url="https://arxiv.org/abs/2408.07990",
        summary="mergekit's SCE: per-tensor weights from the inputs' mean squares, TIES' sign election, weighted "
                "mean of the agreeing task vectors, after keeping the entries of highest variance (select_topk)",
        params=(Param("select_topk", 1.0, float, "share of the nonzero-variance entries kept, by variance across "
                      "the inputs", interval=(0.0, 1.0)),),
        phase=InterpolationPhase(_statistics, _finish, _combine, select_share=_select_share,
                                 score=variance_score),
    )
)
