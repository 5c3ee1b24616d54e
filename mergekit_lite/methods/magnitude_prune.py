"""magnitude_prune: TIES' trim of each τᵢ, then a plain weighted sum (no sign election)."""

from __future__ import annotations

from .registry import ElementwisePhase, MergeMethod, register
from .sparsifiers import MAGNITUDE
from .sparsifying import DENSITY, LAMBDA, SPACE, core_space_phase, sum_consensus

MAGNITUDE_PRUNE = register(
    MergeMethod(
        name="magnitude_prune",
        core_phase=core_space_phase("magnitude_prune"),
        display_name="Magnitude pruning",
        paper_url="https://arxiv.org/abs/2306.01708",
        summary="keep each τᵢ's ⌊density·numel⌋ largest magnitudes; τ = λ · Σ wᵢtᵢ",
        params=(DENSITY, LAMBDA, SPACE),
        phase=ElementwisePhase(sum_consensus, sparsifier=MAGNITUDE, kernel="sum"),
    )
)
