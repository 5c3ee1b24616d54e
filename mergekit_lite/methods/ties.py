"""ties: trim each τᵢ to its top-k magnitudes, elect a sign per entry, average the agreeing values."""

from __future__ import annotations

from .registry import ElementwisePhase, MergeMethod, register
from .sparsifiers import MAGNITUDE
from .sparsifying import DENSITY, LAMBDA, NORMALIZE_TIES, SIGN, SPACE, core_space_phase, ties_consensus

TIES = register(
    MergeMethod(
        name="ties",
        core_phase=core_space_phase("ties"),
        display_name="TIES",
        paper_url="https://arxiv.org/abs/2306.01708",
        summary="trim each τᵢ to its ⌊density·numel⌋ largest magnitudes, elect the sign, disjoint mean of agreeing wᵢtᵢ",
        params=(DENSITY, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
        phase=ElementwisePhase(ties_consensus, sparsifier=MAGNITUDE, kernel="ties"),
    )
)
