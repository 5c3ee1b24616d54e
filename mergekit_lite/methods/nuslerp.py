"""nuslerp: mergekit's NuSLERP, spherical interpolation whose t comes from the two inputs' weights (SEMANTICS §3b).

t = w₂/(w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6); the weights do not scale the endpoints. Two inputs: the endpoints
are their task vectors τ₁, τ₂ and the result W + slerp(t, τ₁, τ₂) (mergekit with a base_model). One input with
`base_weight`: the endpoints are the models W and W + τ₁ with weights (base_weight, w₁) (mergekit without a
base_model, its first model being our base). By default each tensor is one flattened vector, as in `slerp`;
`nuslerp_flatten: false` interpolates each row (each vector along the last dimension) on its own, and with
`nuslerp_row_wise: true` each column (each vector along the first dimension). Endpoints are normalised with
norms clamped at 1e-7 and interpolated linearly where 1 − cos²θ ≤ 1e-16 (mergekit's rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from ._spherical import rows_of, weights_of
from .registry import InterpolationPhase, MergeMethod, Param, register
from .slerp import _combine as slerp_combine
from .slerp import _endpoints as slerp_endpoints

#: mergekit's: a norm below this is taken as this (a zero endpoint keeps a finite direction)
NORM_FLOOR = 1e-7
#: mergekit's eps: endpoints with 1 − cos² ≤ eps² are colinear and interpolated linearly
EPS = 1e-8


def nuslerp_t(weights: Sequence[float]) -> float:
    """mergekit's t from the two weights: w₂/(w₁ + w₂), 0.5 when they cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_coefficients(norm0_sq: float, norm1_sq: float, dot: float, t: float) -> tuple[float, float]:
    """(c₀, c₁) with nuslerp(t, v₀, v₁) = c₀v₀ + c₁v₁, from ‖v₀‖², ‖v₁‖² and v₀·v₁, in float64."""
    norm0 = max(math.sqrt(norm0_sq), NORM_FLOOR)
    norm1 = max(math.sqrt(norm1_sq), NORM_FLOOR)
    cos = min(1.0, max(-1.0, dot / norm0 / norm1))
    if 1.0 - cos * cos <= EPS * EPS:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _vector_coefficients(norm0_sq: torch.Tensor, norm1_sq: torch.Tensor, dot: torch.Tensor, t: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nuslerp_coefficients` for many vectors at once (float64 tensors)."""
    norm0 = torch.sqrt(norm0_sq).clamp(min=NORM_FLOOR)
    norm1 = torch.sqrt(norm1_sq).clamp(min=NORM_FLOOR)
    cos = (dot / norm0 / norm1).clamp(-1.0, 1.0)
    colinear = 1.0 - cos * cos <= EPS * EPS
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return c0, c1


def _t(updates: Sequence[Any], params: Mapping[str, Any]) -> float:
    weights = weights_of(params, len(updates))
    _validate(weights, params, ())  # per-layer weights skip the config-time check
    return nuslerp_t([params["base_weight"], weights[0]] if len(updates) == 1 else weights)


def _mode(base_rows: torch.Tensor, params: Mapping[str, Any]) -> str:
    """"flat" (the whole tensor one vector: the default, and any 1-D tensor), "rows" or "columns"."""
    if params["nuslerp_flatten"] or base_rows.dim() <= 1:
        return "flat"
    return "columns" if params["nuslerp_row_wise"] else "rows"


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], params: Mapping[str, Any]
                ) -> torch.Tensor:
    """Per row: ‖v₀‖², ‖v₁‖², v₀·v₁ (flattened), the same per column (column-wise), or nothing (row-wise: each
    row is interpolated from its own statistics when written)."""
    mode = _mode(base_rows, params)
    if mode == "rows":
        return torch.zeros(rows_of(base_rows).shape[0], 0, dtype=torch.float64)
    v0, v1 = (v.to(torch.float64) for v in slerp_endpoints(base_rows, updates))
    if mode == "flat":
        return torch.stack([(v0 * v0).sum(dim=1), (v1 * v1).sum(dim=1), (v0 * v1).sum(dim=1)], dim=1)
    columns = v0.shape[1]
    out = torch.empty(v0.shape[0], 3 * columns, dtype=torch.float64)  # one buffer: within the schedule's budget
    torch.mul(v0, v0, out=out[:, :columns])
    torch.mul(v1, v1, out=out[:, columns:2 * columns])
    torch.mul(v0, v1, out=out[:, 2 * columns:])
    return out


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> Any:
    return totals  # the coefficients need t, known per chunk call from the weights in params: made in _combine


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], totals: torch.Tensor,
             params: Mapping[str, Any]) -> torch.Tensor:
    """W' rows: c₀v₀ + c₁v₁ (models), or W + c₀τ₁ + c₁τ₂ (task vectors), with c per tensor, row or column."""
    t = _t(updates, params)
    mode = _mode(base_rows, params)
    if mode == "flat":
        norm0_sq, norm1_sq, dot = (float(x) for x in totals.tolist())
        return slerp_combine(base_rows, updates, nuslerp_coefficients(norm0_sq, norm1_sq, dot, t), params)
    v0, v1 = slerp_endpoints(base_rows, updates)
    if mode == "columns":
        columns = v0.shape[1]
        c0, c1 = _vector_coefficients(totals[:columns], totals[columns:2 * columns], totals[2 * columns:], t)
        merged = v0 * c0.reshape(1, -1).to(v0.dtype) + v1 * c1.reshape(1, -1).to(v1.dtype)
    else:  # each vector along the last dimension, whole inside its row
        last = base_rows.shape[-1]
        r0, r1 = v0.reshape(-1, last), v1.reshape(-1, last)
        w0, w1 = r0.to(torch.float64), r1.to(torch.float64)
        c0, c1 = _vector_coefficients((w0 * w0).sum(dim=1), (w1 * w1).sum(dim=1), (w0 * w1).sum(dim=1), t)
        merged = (r0 * c0.reshape(-1, 1).to(r0.dtype) + r1 * c1.reshape(-1, 1).to(r1.dtype)).reshape(v0.shape)
    return _finished(merged, base_rows, updates)


def _finished(merged: torch.Tensor, base_rows: torch.Tensor, updates: Sequence[Any]) -> torch.Tensor:
    if len(updates) == 2:
        merged = merged + base_rows.reshape(merged.shape)
    return merged.reshape(base_rows.shape)


def _validate(weights: Sequence[Any], params: Mapping[str, Any], _per_input: Sequence[Mapping[str, Any]]) -> None:
    if len(weights) == 1 and params["base_weight"] is None:
        raise MergeConfigError("nuslerp with one input interpolates from the base to it: set parameters.base_weight "
                               "(the base's weight; t = w₁/(base_weight + w₁)), or give two inputs")
    if len(weights) == 2 and params["base_weight"] is not None:
        raise MergeConfigError("nuslerp with two inputs interpolates their task vectors; base_weight is for one "
                               "input (the base being the other endpoint): drop it")


NUSLERP = register(
    MergeMethod(
        name="nuslerp",
        display_name="NuSLERP",
        paper_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
        summary="mergekit's NuSLERP: spherical interpolation at t = w₂/(w₁+w₂) of two task vectors (or of the base "
                "and one model), per tensor, row or column",
        params=(
            Param("base_weight", None, float, "the base's weight when it is one of the two endpoints (one input)"),
            Param("nuslerp_flatten", True, bool, "interpolate each tensor as one flattened vector"),
            Param("nuslerp_row_wise", False, bool, "with nuslerp_flatten: false, interpolate columns instead of rows "
                  "(mergekit's name)"),
        ),
        phase=InterpolationPhase(_statistics, _finish, _combine, weights_apart=True),
        validate=_validate,
        input_count=(1, 2),
        weight_meaning="what sets the interpolation point t = w₂/(w₁ + w₂) (one input: t = w₁/(base_weight + w₁)); "
                       "the weights do not scale the endpoints",
    )
)
