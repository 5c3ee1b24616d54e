"""task_arithmetic: λ times the signed sum of the adapters' task vectors (SEMANTICS §3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .registry import LinearPhase, MergeMethod, Param, register


def task_arithmetic_coefficients(weights: Sequence[float], params: Mapping[str, Any]) -> list[float]:
    """cᵢ = λ · wᵢ; a negative weight subtracts a skill."""
    return [params["lambda"] * float(w) for w in weights]


TASK_ARITHMETIC = register(
    MergeMethod(
        name="task_arithmetic",
        display_name="Task Arithmetic",
        paper_url="https://arxiv.org/abs/2212.04089",
        summary="τ = λ · Σ wᵢτᵢ",
        params=(Param("lambda", 1.0, float, "global scale of the summed task vectors"),),
        phase=LinearPhase(task_arithmetic_coefficients),
    )
)
