"""What the spherical methods share: their points as rows, and per-row Gram statistics in float64.

NuSLERP, Multi-SLERP and the Karcher mean combine whole flattened tensors x₀ … x_{k−1} (models or task vectors)
through their norms and angles only, and every vector they build — a weighted mean, a tangent vector, the next
iterate — stays in the span of the xⱼ. So each method is exactly a set of coefficients cⱼ computed from the Gram
matrix Gᵢⱼ = xᵢ·xⱼ, followed by Σ cⱼxⱼ: one statistics pass (per row, in float64, summed over rows in order by
the engine: the same for every chunk size and worker count), then one writing pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A chunk of a tensor as rows × columns (a 1-D chunk: one entry per row)."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def points(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], with_base: bool) -> list[torch.Tensor]:
    """The xⱼ rows: W, W + u₁, …, W + uₙ when the models themselves are the points (`with_base`), else u₁ … uₙ
    (an input that does not touch the tensor: zeros, i.e. the base itself)."""
    flat = rows_of(base_rows)

    def task(update: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(flat) if update is None else update.reshape(flat.shape)

    if with_base:
        return [flat, *(flat + task(u) for u in updates)]
    return [task(u) for u in updates]


def row_gram(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row, the upper triangle of xᵢ·xⱼ (i ≤ j, row-major) in float64: rows × k(k+1)/2."""
    columns = []
    for i, x in enumerate(xs):
        wide = x.to(torch.float64)
        for other in xs[i:]:
            columns.append((wide * (wide if other is x else other.to(torch.float64))).sum(dim=1))
    return torch.stack(columns, dim=1)


def gram(totals: torch.Tensor, k: int) -> torch.Tensor:
    """The k × k Gram matrix from the summed upper triangle of `row_gram`."""
    matrix = torch.zeros(k, k, dtype=torch.float64)
    index = 0
    for i in range(k):
        for j in range(i, k):
            matrix[i, j] = matrix[j, i] = totals[index]
            index += 1
    return matrix


def norm_of(coefficients: torch.Tensor, matrix: torch.Tensor) -> float:
    """‖Σ cⱼxⱼ‖ from the Gram matrix."""
    return float(torch.sqrt(torch.clamp(coefficients @ matrix @ coefficients, min=0.0)))


def combination(xs: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ cⱼxⱼ in the rows' dtype, in order."""
    merged = xs[0] * coefficients[0]
    for x, c in zip(xs[1:], coefficients[1:]):
        merged = merged + x * c
    return merged


def weights_of(params: dict | object, count: int) -> list[float]:
    """The per-tensor weights wᵢ a `weights_apart` method is given as params["weight.i"]."""
    return [float(params[f"weight.{i}"]) for i in range(count)]  # type: ignore[index]
