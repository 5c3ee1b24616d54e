"""sce: mergekit's SCE (FuseChat's select, calculate, erase), without its variance selection (SEMANTICS §3b).

Per tensor, over the inputs' uᵢ = wᵢτᵢ (wᵢ = 1 by default; mergekit's SCE has no weights): *calculate* — each
input's weight is the mean of its squared entries, normalised to sum 1 (1/n each when they sum below 10⁻⁶);
*erase* — TIES' sign election on the unweighted sum (γ = +1 where Σuᵢ ≥ 0), Mᵢ = [sign(uᵢ) = γ]; the result is
W + Σ aᵢMᵢuᵢ / max(Σ aᵢMᵢ, 10⁻⁶). The weights need every entry of the tensor, so a statistics pass (per-row float64
sums of squares, added in row order) comes first; the erase is per entry. *select* (`select_topk` < 1: keep only
the entries of highest variance across the inputs) needs an exact top-k over a quantity of all inputs together
and is refused, naming it: mergekit computes aᵢ and the election from the masked τᵢ, so it takes three passes per
tensor (that top-k, the masked sums of squares, the erase), where the engine's selection passes rank one input's
|τᵢ| and an InterpolationPhase has one statistics pass (SEMANTICS §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
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
    _validate((), params, ())  # a per-layer select_topk skips the config-time check
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


def _validate(_weights: Sequence[Any], params: Mapping[str, Any], _per_input: Sequence[Mapping[str, Any]]) -> None:
    if params["select_topk"] < 1.0:
        raise MergeConfigError(f"sce with select_topk {params['select_topk']:g} < 1 (keeping only the entries of "
                               "highest variance across the inputs) is not implemented in mergekit_lite; "
                               "select_topk: 1 runs SCE's calculate and erase steps")


SCE = register(
    MergeMethod(
        name="sce",
        display_name="SCE",
        paper_url="https://arxiv.org/abs/2408.07990",
        summary="mergekit's SCE: per-tensor weights from the inputs' mean squares, TIES' sign election, weighted "
                "mean of the agreeing task vectors (select_topk 1 only)",
        params=(Param("select_topk", 1.0, float, "share of entries kept by variance across the inputs (only 1)",
                      interval=(0.0, 1.0)),),
        phase=InterpolationPhase(_statistics, _finish, _combine),
        validate=_validate,
    )
)
