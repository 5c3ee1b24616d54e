"""slerp: spherical interpolation of two models or two task vectors, each tensor flattened (SEMANTICS §3).

With one input, the two endpoints are the models themselves, v₀ = W (the base) and v₁ = W + u₁ (mergekit's SLERP,
whose base is one of the two models). With two inputs, they are the task vectors v₀ = u₀ and v₁ = u₁ and the
result is W + slerp(u₀, u₁). uᵢ = wᵢτᵢ. The angle needs the norms and the dot product of the whole tensor, so the
engine gathers them in a first pass over the chunks (per row, in float64, summed over rows in order: the same
for every chunk size) and writes in a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from ._spherical import points
from .registry import InterpolationPhase, MergeMethod, Param, register

#: mergekit's threshold: |cos θ| above it interpolates linearly (nearly colinear or antipodal endpoints)
DOT_THRESHOLD = 0.9995
#: mergekit's: a norm at or below this is taken as 1 (a zero endpoint)
EPS = 1e-8


def slerp_coefficients(norm0_sq: float, norm1_sq: float, dot: float, t: float) -> tuple[float, float]:
    """(c₀, c₁) with slerp(t, v₀, v₁) = c₀v₀ + c₁v₁, from ‖v₀‖², ‖v₁‖² and v₀·v₁ (mergekit's rule, in float64)."""
    norm0, norm1 = math.sqrt(norm0_sq), math.sqrt(norm1_sq)
    norm0 = norm0 if norm0 > EPS else 1.0
    norm1 = norm1 if norm1 > EPS else 1.0
    cos = min(1.0, max(-1.0, dot / norm0 / norm1))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _endpoints(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(v₀, v₁) rows, flattened per row: W and W + u₁ for one input, u₀ and u₁ for two (absent: zeros)."""
    v0, v1 = points(base_rows, updates, with_base=len(updates) == 1)
    return v0, v1


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], _params: Mapping[str, Any]
                ) -> torch.Tensor:
    """Per row: ‖v₀‖², ‖v₁‖², v₀·v₁ in float64 (rows × 3)."""
    v0, v1 = (v.to(torch.float64) for v in _endpoints(base_rows, updates))
    return torch.stack([(v0 * v0).sum(dim=1), (v1 * v1).sum(dim=1), (v0 * v1).sum(dim=1)], dim=1)


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> tuple[float, float]:
    norm0_sq, norm1_sq, dot = (float(x) for x in totals.tolist())
    return slerp_coefficients(norm0_sq, norm1_sq, dot, float(params["t"]))


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], state: tuple[float, float],
             _params: Mapping[str, Any]) -> torch.Tensor:
    """W' rows: c₀v₀ + c₁v₁ (models), or W + c₀u₀ + c₁u₁ (task vectors)."""
    c0, c1 = state
    v0, v1 = _endpoints(base_rows, updates)
    merged = v0 * c0 + v1 * c1
    if len(updates) == 2:
        merged = merged + base_rows.reshape(merged.shape)
    return merged.reshape(base_rows.shape)


def _validate(weights: Sequence[float], _params: Mapping[str, Any], _per_input: Sequence[Mapping[str, Any]]) -> None:
    if len(weights) not in (1, 2):
        raise MergeConfigError(f"slerp interpolates between two endpoints: give one input (base → model) or two "
                               f"(between their task vectors), not {len(weights)}")


SLERP = register(
    MergeMethod(
        name="slerp",
        display_name="SLERP",
        paper_url="https://en.wikipedia.org/wiki/Slerp",
        summary="spherical interpolation c₀v₀ + c₁v₁ of two flattened tensors (the base and one model, or two task "
                "vectors); linear where |cos θ| > 0.9995",
        params=(Param("t", None, float, "interpolation factor: 0 gives the first endpoint, 1 the second; "
                      "SEMANTICS §3 defines SLERP for t in [0, 1] only", required=True, interval=(0.0, 1.0),
                      closed=True),),
        phase=InterpolationPhase(_statistics, _finish, _combine),
        validate=_validate,
        input_count=(1, 2),
    )
)
