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

from ..errors import MergeConfigError
from ._common import DENSITY, LAMBDA, NORMALIZE_TIES, RESCALE, SIGN, SPACE, core_space_phase, sum_consensus, ties_consensus
from .registry import ElementwisePhase, MergeMethod, Param, register
from .sparsifiers import MAGPRUNE

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


DELLA_LINEAR = register(
    MergeMethod(
        name="della_linear",
        core_phase=core_space_phase("della_linear"),
        display_name="DELLA (linear)",
        paper_url=PAPER,
        summary="tᵢ = MagPrune(τᵢ): keep-prob density ± epsilon by magnitude rank within each row, kept entries / "
                "their keep-prob; τ = λ · Σ wᵢtᵢ",
        params=(DENSITY, EPSILON, RESCALE_Q, LAMBDA, SPACE),
        phase=ElementwisePhase(sum_consensus, sparsifier=MAGPRUNE, kernel="sum"),
        validate=_validate,
    )
)

DELLA = register(
    MergeMethod(
        name="della",
        core_phase=core_space_phase("della"),
        display_name="DELLA",
        paper_url=PAPER,
        summary="the MagPrune tᵢ, then TIES sign election and disjoint mean of agreeing wᵢtᵢ",
        params=(DENSITY, EPSILON, RESCALE_Q, SIGN, NORMALIZE_TIES, LAMBDA, SPACE),
        phase=ElementwisePhase(ties_consensus, sparsifier=MAGPRUNE, kernel="ties"),
        validate=_validate,
    )
)
