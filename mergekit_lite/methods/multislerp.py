"""multislerp: mergekit's Multi-SLERP, barycentric interpolation of two or more points on a hypersphere (§3b).

The points xⱼ are the inputs' task vectors (mergekit with a base_model; the result is added to W), or, with
`base_weight`, the models themselves: W with that weight and W + τᵢ (mergekit without a base_model, its first
model being our base). With barycentric weights ŵ (wᵢ/Σw when `normalize_weights`), each tensor flattened:
uⱼ = xⱼ/(‖xⱼ‖ + eps); m = Σŵⱼuⱼ, normalised; the tangent vectors uⱼ − (uⱼ·m)m averaged with ŵ into T; the result
m cos‖T‖ + T sin‖T‖/‖T‖ (‖T‖ taken + eps) scaled by Σŵⱼ‖xⱼ‖. Two points whose weighted mean is zero are
interpolated linearly (ŵ₀x₀ + ŵ₁x₁); more are refused, naming the tensor's case. One point is returned as is.
All of it is a combination Σcⱼxⱼ whose cⱼ come from the Gram matrix of the xⱼ (methods/_spherical.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InputError, MergeConfigError
from ._spherical import combination, gram, norm_of, points, row_gram, rows_of, weights_of
from .registry import InterpolationPhase, MergeMethod, Param, register


def multislerp_coefficients(matrix: torch.Tensor, weights: Sequence[float], normalize: bool, eps: float
                            ) -> list[float]:
    """cⱼ with multislerp(x) = Σcⱼxⱼ, from the Gram matrix Gᵢⱼ = xᵢ·xⱼ and the weights, in float64."""
    k = len(weights)
    if k == 1:
        return [1.0]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.sqrt(torch.clamp(torch.diagonal(matrix), min=0.0))
    scale = 1.0 / (norms + eps)  # uⱼ = scaleⱼ xⱼ
    mean = w * scale  # m = Σ meanⱼ xⱼ
    mean_norm = norm_of(mean, matrix)
    if mean_norm < eps:
        if k == 2:
            return [float(w[0]), float(w[1])]
        raise InputError("multislerp: the weighted mean of the unit inputs is zero (antipodal inputs whose weights "
                         "cancel); use other weights")
    mean = mean / mean_norm
    dots = scale * (matrix @ mean)  # uⱼ·m
    tangent = w * scale - float((w * dots).sum()) * mean  # T = Σŵⱼ(uⱼ − (uⱼ·m)m)
    tangent_norm = norm_of(tangent, matrix) + eps
    result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return (result * float((norms * w).sum())).tolist()


def _with_base(params: Mapping[str, Any]) -> bool:
    return params["base_weight"] is not None


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], params: Mapping[str, Any]
                ) -> torch.Tensor:
    return row_gram(points(base_rows, updates, _with_base(params)))


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    return totals  # the weights come per tensor with the chunks (params["weight.i"]): coefficients in _combine


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], totals: torch.Tensor,
             params: Mapping[str, Any]) -> torch.Tensor:
    """W' rows: Σcⱼxⱼ (models) or W + Σcⱼτⱼ (task vectors)."""
    with_base = _with_base(params)
    weights = weights_of(params, len(updates))
    weights = [float(params["base_weight"]), *weights] if with_base else weights
    xs = points(base_rows, updates, with_base)
    coefficients = multislerp_coefficients(gram(totals, len(xs)), weights, params["normalize_weights"],
                                           params["eps"])
    merged = combination(xs, coefficients)
    if not with_base:
        merged = merged + rows_of(base_rows)
    return merged.reshape(base_rows.shape)


def _validate(weights: Sequence[Any], params: Mapping[str, Any], _per_input: Sequence[Mapping[str, Any]]) -> None:
    if params["normalize_weights"] and abs(sum(weights) + (params["base_weight"] or 0.0)) < 1e-12:
        raise MergeConfigError("multislerp: the weights sum to 0, so normalize_weights cannot divide by them; give "
                               "weights with a non-zero sum or set normalize_weights: false")


MULTISLERP = register(
    MergeMethod(
        name="multislerp",
        display_name="Multi-SLERP",
        paper_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        summary="mergekit's Multi-SLERP: barycentric interpolation of the task vectors (or of the base and the "
                "models) on a hypersphere, through the tangent space at their weighted mean",
        params=(
            Param("base_weight", None, float, "the base's weight when the base itself is one of the points "
                  "(mergekit without base_model)"),
            Param("normalize_weights", True, bool, "divide the weights by their sum"),
            Param("eps", 1e-8, float, "added to norms before dividing (mergekit's)", interval=(0.0, 1.0)),
        ),
        phase=InterpolationPhase(_statistics, _finish, _combine, weights_apart=True),
        validate=_validate,
        weight_meaning="each point's barycentric share, ŵᵢ = wᵢ / Σw with `normalize_weights` (the base's "
                       "`base_weight` among them when it is a point); the weights do not scale the points",
    )
)
