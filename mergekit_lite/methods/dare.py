"""dare_linear and dare_ties: drop entries of each τᵢ at random (keep-prob density), rescale, combine."""

from __future__ import annotations

from .sparsifiers import DARE
from .sparsifying import (
    DENSITY,
    LAMBDA,
    NORMALIZE_TIES,
    RESCALE,
    SIGN,
    SPACE,
    register_sparse,
)

PAPER = "https://arxiv.org/abs/2311.03099"

DARE_LINEAR = register_sparse(
    "dare_linear", sparsifier=DARE, ties=False,
    display_name="DARE (linear)",
    paper_url=PAPER,
    summary="tᵢ = mᵢ ⊙ τᵢ / density with a counter-based Bernoulli keep-mask mᵢ; τ = λ · Σ wᵢtᵢ",
    params=(DENSITY, RESCALE, LAMBDA, SPACE),
)

DARE_TIES = register_sparse(
    "dare_ties", sparsifier=DARE, ties=True,
    display_name="DARE + TIES",
    paper_url=PAPER,
    summary="the DARE tᵢ, then TIES sign election and disjoint mean of agreeing wᵢtᵢ",
    params=(DENSITY, RESCALE, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
)
