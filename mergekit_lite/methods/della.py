"""della and della_linear: MagPrune each τᵢ (keep probability by magnitude rank within each row), rescale, combine.

DELLA (Deep et al., 2024): within a row of n entries, the entry of magnitude rank d (0 = the largest) is kept
with probability q = density + ε − 2ε·d/(n − 1), so larger entries survive more often around the mean density,
and a kept entry is divided by q (the paper's 1/(1 − p)). The draws are the counter-based uniforms of DARE
(randomness.py): the same for any chunking, worker count or order. `della` adds TIES' sign election,
`della_linear` sums (SEMANTICS §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from .registry import Param
from .sparsifiers import Cut, Sparsifier
from .sparsifying import DENSITY, LAMBDA, NORMALIZE_TIES, SIGN, SPACE, register_sparse


class MagPrune(Sparsifier):
    """DELLA's MagPrune: within each row, the entry of magnitude rank d (0 = largest; equal magnitudes: lower flat
    index first) of n is kept with probability qᵢ(d) = densityᵢ + εᵢ − 2εᵢ·d/(n − 1) (densityᵢ for n = 1), when
    its uniform u < q; kept entries × 1/q (`rescale`). Rows are whole in every chunk, so no selection pass.
    q and τ/q are float64, rounded once into the chunk's dtype (SEMANTICS §3 fixes the precision: TIES' vote
    can be exactly 0 in float32 where float64 would tip it)."""

    name = "magprune"
    whole_rows = True

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        out = tau.clone(memory_format=torch.contiguous_format)
        self._apply(out, flat_start, cut)
        return out

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        self._apply(tau, flat_start, cut)
        return -1.0

    @staticmethod
    def _apply(tau: torch.Tensor, flat_start: int, cut: Cut) -> None:
        assert cut.stream is not None and tau.is_contiguous()
        count = tau.numel()
        if count == 0:
            return
        length = cut.row_length
        rows = tau.view(-1, length)
        q = keep_probabilities(rows, cut.own["density"], cut.own["epsilon"])
        u = cut.stream.uniforms(flat_start, count).view(rows.shape).to(torch.float64)
        kept = rows.to(torch.float64) / q if cut.own["rescale"] else rows.to(torch.float64)
        rows.copy_(torch.where(u.to(rows.device) < q, kept, torch.zeros_like(kept)))


def keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """qᵢ per entry (float64, rows' shape): linear in the magnitude rank within the row, from density + ε (the
    largest) down to density − ε (the smallest); a stable sort gives equal magnitudes lower flat index first.
    Evaluated as (density + ε) − (2ε/(n − 1))·d, the order SEMANTICS §3 fixes (the reference uses it too)."""
    length = rows.shape[1]
    if length == 1 or epsilon == 0.0:
        return torch.full(rows.shape, float(density), dtype=torch.float64, device=rows.device)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=rows.device).expand_as(order).contiguous())
    return (density + epsilon) - (2.0 * epsilon / (length - 1)) * rank.to(torch.float64)


MAGPRUNE = MagPrune()
PAPER = "https://arxiv.org/abs/2406.11617"
EPSILON = Param("epsilon", 0.15, float, "half-width of the keep probabilities around density: the largest entry of "
                "a row is kept with density + epsilon, the smallest with density − epsilon (mergekit's default 0.15)",
                per_adapter=True)
RESCALE_Q = Param("rescale", True, bool, "divide each kept entry by its keep probability", per_adapter=True)


def _validate(_weights: Sequence[float], _params: Mapping[str, Any], own: Sequence[Mapping[str, Any]]) -> None:
    """density ± ε must be probabilities: 0 ≤ ε ≤ min(density, 1 − density)."""
    for index, entry in enumerate(own):
        density, epsilon = entry["density"], entry["epsilon"]
        if density is None or epsilon is None:
            continue
        high = min(density, 1.0 - density)
        if not 0.0 <= epsilon <= high + 1e-12:
            raise MergeConfigError(f"adapters[{index}]: 'epsilon' must be in [0, min(density, 1 − density)] = "
                                   f"[0, {high:g}] so that density ± epsilon are probabilities, got {epsilon!r}")


DELLA_LINEAR = register_sparse(
    "della_linear", sparsifier=MAGPRUNE, ties=False,
    display_name="DELLA (linear)",
    paper_url=PAPER,
    summary="tᵢ = MagPrune(τᵢ): keep-prob density ± epsilon by magnitude rank within each row, kept entries / "
            "their keep-prob; τ = λ · Σ wᵢtᵢ",
    params=(DENSITY, EPSILON, RESCALE_Q, LAMBDA, SPACE),
    validate=_validate,
)

DELLA = register_sparse(
    "della", sparsifier=MAGPRUNE, ties=True,
    display_name="DELLA",
    paper_url=PAPER,
    summary="the MagPrune tᵢ, then TIES sign election and disjoint mean of agreeing wᵢtᵢ",
    params=(DENSITY, EPSILON, RESCALE_Q, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
    validate=_validate,
)
