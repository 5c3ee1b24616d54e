"""linear: the weighted average of the adapters' task vectors (SEMANTICS §3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MergeConfigError
from .registry import LinearPhase, MergeMethod, Param, register


def linear_coefficients(weights: Sequence[float], params: Mapping[str, Any]) -> list[float]:
    """cᵢ = wᵢ / Σ w (normalize) or wᵢ; an adapter that misses a tensor still counts in Σ w."""
    if not params["normalize"]:
        return [float(w) for w in weights]
    total = sum(weights)
    return [float(w) / total for w in weights]


def _validate(weights: Sequence[float], params: Mapping[str, Any], _per_adapter: Sequence[Mapping[str, Any]]) -> None:
    if params["normalize"] and sum(weights) == 0:
        raise MergeConfigError(
            "linear with normalize: true divides by the sum of the adapter weights, which is 0; "
            "change the weights or set parameters: {normalize: false}"
        )


LINEAR = register(
    MergeMethod(
        name="linear",
        display_name="Linear (weighted average)",
        paper_url="https://arxiv.org/abs/2203.05482",
        summary="τ = Σ wᵢτᵢ / Σ wᵢ, or Σ wᵢτᵢ with normalize: false",
        params=(Param("normalize", True, bool, "divide by the sum of the weights"),),
        phase=LinearPhase(linear_coefficients),
        validate=_validate,
    )
)
