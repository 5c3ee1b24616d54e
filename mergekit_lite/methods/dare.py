"""dare_linear and dare_ties: drop entries of each τᵢ at random (keep-prob density), rescale, combine."""

from __future__ import annotations

from .registry import ElementwisePhase, MergeMethod, register
from .sparsifiers import DARE
from .sparsifying import (
    DENSITY,
    LAMBDA,
    NORMALIZE_TIES,
    RESCALE,
    SIGN,
    SPACE,
    core_space_phase,
    sum_consensus,
    ties_consensus,
)

PAPER = "https://arxiv.org/abs/2311.03099"

DARE_LINEAR = register(
    MergeMethod(
        name="dare_linear",
        core_phase=core_space_phase("dare_linear"),
        display_name="DARE (linear)",
        paper_url=PAPER,
        summary="tᵢ = mᵢ ⊙ τᵢ / density with a counter-based Bernoulli keep-mask mᵢ; τ = λ · Σ wᵢtᵢ",
        params=(DENSITY, RESCALE, LAMBDA, SPACE),
        phase=ElementwisePhase(sum_consensus, sparsifier=DARE, kernel="sum"),
    )
)

DARE_TIES = register(
    MergeMethod(
        name="dare_ties",
        core_phase=core_space_phase("dare_ties"),
        display_name="DARE + TIES",
        paper_url=PAPER,
        summary="the DARE tᵢ, then TIES sign election and disjoint mean of agreeing wᵢtᵢ",
        params=(DENSITY, RESCALE, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
        phase=ElementwisePhase(ties_consensus, sparsifier=DARE, kernel="ties"),
    )
)
