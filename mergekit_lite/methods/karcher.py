"""karcher: mergekit's Karcher mean, the Riemannian (geodesic) mean of the models on the unit hypersphere (§3b).

The points are the models themselves, the base counted as one of them (mergekit's tensor group holds the base
model whenever there is one): W and W + wᵢτᵢ (wᵢ = 1 by default, a scale of τᵢ as everywhere), each with the
same weight 1/N. Per tensor, flattened: units uⱼ = xⱼ/‖xⱼ‖ of the points with ‖xⱼ‖ > tol; the mean m starts at
their normalised average (u of the first such point when that average is shorter than tol); then up to
`max_iter` times: T = Σ αⱼ θⱼ/sin θⱼ (uⱼ − cos θⱼ m) over the points with θⱼ = acos(m·uⱼ) ≥ tol; stop when
‖T‖ < tol, else m ← cos‖T‖ m + sin‖T‖ T/‖T‖, renormalised. The result is m scaled by Σ αⱼ‖xⱼ‖ over all points.
Every iterate is a combination of the points, so the whole iteration runs on their Gram matrix, gathered in one
streamed pass (methods/_spherical.py): no pass per iteration, and the same bytes for any chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from ._spherical import combination, gram, norm_of, points, row_gram
from .registry import InterpolationPhase, MergeMethod, Param, register


def karcher_coefficients(matrix: torch.Tensor, alphas: Sequence[float], max_iter: int, tol: float) -> list[float]:
    """cⱼ with karcher(x) = Σcⱼxⱼ, from the Gram matrix Gᵢⱼ = xᵢ·xⱼ, in float64 (mergekit's iteration)."""
    k = len(alphas)
    if k == 1:
        return [1.0]
    norms = torch.sqrt(torch.clamp(torch.diagonal(matrix), min=0.0))
    valid = [j for j in range(k) if float(norms[j]) > tol]
    if not valid:
        return [0.0] * k
    total = sum(alphas[j] for j in valid)
    alpha = torch.zeros(k, dtype=torch.float64)
    scale = torch.zeros(k, dtype=torch.float64)  # uⱼ = scaleⱼ xⱼ
    for j in valid:
        alpha[j] = alphas[j] / total
        scale[j] = 1.0 / norms[j]
    mean = alpha * scale
    mean_norm = norm_of(mean, matrix)
    if mean_norm < tol:
        mean = torch.zeros(k, dtype=torch.float64)
        mean[valid[0]] = scale[valid[0]]
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        projections = matrix @ mean  # xⱼ·m
        tangent = torch.zeros(k, dtype=torch.float64)
        for j in valid:
            dot = min(1.0, max(-1.0, float(scale[j] * projections[j])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            factor = float(alpha[j]) * theta / math.sin(theta)
            tangent = tangent - factor * dot * mean
            tangent[j] += factor * float(scale[j])
        tangent_norm = norm_of(tangent, matrix)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        length = norm_of(mean, matrix)
        if length > tol:
            mean = mean / length
    return (mean * float(sum(a * float(n) for a, n in zip(alphas, norms)))).tolist()


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], _params: Mapping[str, Any]
                ) -> torch.Tensor:
    return row_gram(points(base_rows, updates, with_base=True))


def _finish(totals: torch.Tensor, params: Mapping[str, Any]) -> list[float]:
    k = int(round((math.sqrt(8 * totals.numel() + 1) - 1) / 2))  # k(k+1)/2 Gram entries
    return karcher_coefficients(gram(totals, k), [1.0 / k] * k, int(params["max_iter"]), float(params["tol"]))


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], coefficients: list[float],
             _params: Mapping[str, Any]) -> torch.Tensor:
    """W' rows: Σcⱼxⱼ over the base and the models."""
    return combination(points(base_rows, updates, with_base=True), coefficients).reshape(base_rows.shape)


def _validate(_weights: Sequence[Any], params: Mapping[str, Any], _per_input: Sequence[Mapping[str, Any]]) -> None:
    max_iter = params["max_iter"]
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or not 0 <= max_iter <= 10_000:
        raise MergeConfigError(f"parameters: 'max_iter' must be a whole number of iterations from 0 to 10000, got "
                               f"{max_iter!r}")


KARCHER = register(
    MergeMethod(
        name="karcher",
        display_name="Karcher mean",
        paper_url="https://arxiv.org/abs/2603.04972",
        summary="mergekit's Karcher mean: the Riemannian mean of the base and the models on the unit hypersphere, "
                "scaled by their mean norm",
        params=(
            Param("max_iter", 10, int, "most iterations of the mean"),
            Param("tol", 1e-5, float, "convergence tolerance (and the smallest norm and angle that count)",
                  interval=(0.0, 1.0)),
        ),
        phase=InterpolationPhase(_statistics, _finish, _combine),
        weight_meaning="the wᵢ scaling each task vector: the points are W and W + wᵢτᵢ, each of share 1/N (the "
                       "weights are not the mean's shares)",
        validate=_validate,
    )
)
