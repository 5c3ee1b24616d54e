"""ramplus_tl: mergekit's RAM+ (tensor-local), RAM with each input's unique changes amplified (§3b).

As `ram`, with changed entries [|uᵢ| > ε] (uᵢ = wᵢτᵢ, wᵢ = 1 by default): per tensor, for input i, ρᵢ = (its
changed entries that other inputs change too) / max(its changed entries no other input changes, ε) and
λᵢ = 1 + r · clamp(ρᵢ, 0, alpha); then τ = Σ [changed] uᵢ · (λᵢ where it alone changes the entry, 1/count where
several do). The counts need the whole tensor: a statistics pass first (per-row float64 counts added in row order),
then entry by entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._spherical import rows_of
from .registry import InterpolationPhase, MergeMethod, Param, register


def _changes(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], epsilon: float
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The uᵢ rows, their changed-entry masks and each entry's count of inputs changing it."""
    flat = rows_of(base_rows)
    taus = [torch.zeros_like(flat) if u is None else u.reshape(flat.shape) for u in updates]
    changed = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros_like(flat)
    for mask in changed:
        count += mask.to(flat.dtype)
    return taus, changed, count


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], params: Mapping[str, Any]
                ) -> torch.Tensor:
    """Per row, for each input: its changed entries others change too, and those it alone changes (float64)."""
    _, changed, count = _changes(base_rows, updates, params["epsilon"])
    shared, unique = count > 1, count == 1
    columns = [(mask & shared).sum(dim=1) for mask in changed] + [(mask & unique).sum(dim=1) for mask in changed]
    return torch.stack(columns, dim=1).to(torch.float64)


def ramplus_factors(shared: Sequence[float], unique: Sequence[float], r: float, alpha: float, epsilon: float
                    ) -> list[float]:
    """λᵢ = 1 + r · clamp(shared / max(unique, ε), 0, alpha) per input."""
    return [1.0 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique)]


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> list[float]:
    values = totals.tolist()
    n = len(values) // 2
    return ramplus_factors(values[:n], values[n:], params["r"], params["alpha"], params["epsilon"])


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], factors: list[float],
             params: Mapping[str, Any]) -> torch.Tensor:
    """W + Σ [changed] uᵢ · (λᵢ alone, 1/count shared)."""
    taus, changed, count = _changes(base_rows, updates, params["epsilon"])
    unique = count == 1
    shared_scale = 1.0 / count.clamp(min=1.0)
    merged = rows_of(base_rows).clone()
    for tau, mask, factor in zip(taus, changed, factors):
        scale = torch.where(unique, torch.full_like(tau, factor), shared_scale)
        merged += tau * mask.to(tau.dtype) * scale
    return merged.reshape(base_rows.shape)


RAMPLUS = register(
    MergeMethod(
        name="ramplus_tl",
        display_name="RAM+ (tensor-local)",
        paper_url="https://arxiv.org/abs/2601.13572",
        summary="mergekit's RAM+: RAM with each input's unique changes scaled by 1 + r · clamp(shared/unique, 0, "
                "alpha), per tensor",
        params=(
            Param("epsilon", 1e-5, float, "a change of at most this is no change", interval=(0.0, math.inf),
                  closed=True),
            Param("r", 0.1, float, "strength of the rescaling of unique changes"),
            Param("alpha", 0.2, float, "bound of the shared/unique ratio"),
        ),
        phase=InterpolationPhase(_statistics, _finish, _combine),
    )
)
