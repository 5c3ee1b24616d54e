"""model_stock: W + t · mean uᵢ, with the per-tensor ratio t from the task vectors' mean pairwise cosine.

Model Stock (Jang et al., 2024): fine-tunes of one base lie on a thin shell around their centre; the merged
weight w_H = t·w_avg + (1 − t)·w₀ with t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the angle between the task
vectors, per tensor. Over the k inputs that touch a tensor (uᵢ = wᵢτᵢ, each flattened): c = the mean of their
pairwise cosines (a pair with a zero vector counts 0) clamped to [0, 1], t as above (t = 1 for one input), and
W' = W + t · Σuᵢ / k (SEMANTICS §3). The cosines need whole-tensor sums, so the engine gathers them in a first
pass over the chunks (per row, in float64, summed in row order: the same for every chunk size), as for SLERP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from .registry import InterpolationPhase, MergeMethod, register


def stock_ratio(cosine: float, k: int) -> float:
    """t = k·c / (1 + (k − 1)·c) for the mean pairwise cosine c clamped to [0, 1]; 1 for a single input."""
    if k <= 1:
        return 1.0
    c = min(1.0, max(0.0, cosine))
    return k * c / (1.0 + (k - 1) * c)


def _rows(base_rows: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return update.reshape(base_rows.shape[0] if base_rows.dim() else 1, -1).to(torch.float64)


def _statistics(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], _params: Mapping[str, Any]
                ) -> torch.Tensor:
    """Per row, in float64: for every input whether it is present (1), then uᵢ·uⱼ for i ≤ j (the upper
    triangle of the Gram matrix, row by row), 0 where an input is absent."""
    count = len(updates)
    rows = base_rows.shape[0] if base_rows.dim() else 1
    flat = [None if u is None else _rows(base_rows, u) for u in updates]
    device = base_rows.device
    columns = [torch.full((rows,), 0.0 if u is None else 1.0, dtype=torch.float64, device=device) for u in flat]
    for i in range(count):
        for j in range(i, count):
            a, b = flat[i], flat[j]
            columns.append(torch.zeros(rows, dtype=torch.float64, device=device) if a is None or b is None
                           else (a * b).sum(dim=1))
    return torch.stack(columns, dim=1)


def _finish(totals: torch.Tensor, _params: Mapping[str, Any]) -> tuple[float, tuple[bool, ...]]:
    """(t / k, which inputs touch the tensor) from the summed statistics."""
    values = totals.tolist()
    count = (math.isqrt(8 * len(values) + 9) - 3) // 2  # n + n(n + 1)/2 columns
    present = tuple(v > 0 for v in values[:count])
    gram, position = {}, count
    for i in range(count):
        for j in range(i, count):
            gram[i, j] = values[position]
            position += 1
    inputs = [i for i in range(count) if present[i]]
    cosines = []
    for a, i in enumerate(inputs):
        for j in inputs[a + 1:]:
            norms = math.sqrt(gram[i, i]) * math.sqrt(gram[j, j])
            cosines.append(gram[i, j] / norms if norms > 0 else 0.0)
    k = len(inputs)
    ratio = stock_ratio(sum(cosines) / len(cosines) if cosines else 1.0, k)
    return ratio / max(k, 1), present


def _combine(base_rows: torch.Tensor, updates: Sequence[torch.Tensor | None], state: tuple[float, tuple[bool, ...]],
             _params: Mapping[str, Any]) -> torch.Tensor:
    """W' rows: W + (t/k) · Σ uᵢ (the sum in input order, in the compute dtype)."""
    scale, _present = state
    present = [u for u in updates if u is not None]
    if not present:
        return base_rows.clone()
    total = present[0].reshape(base_rows.shape).clone()
    for update in present[1:]:
        total.add_(update.reshape(base_rows.shape))
    return base_rows + total * scale


def _validate(weights: Sequence[float], _params: Mapping[str, Any], _own: Sequence[Mapping[str, Any]]) -> None:
    if len(weights) < 2:
        raise MergeConfigError(f"model_stock averages fine-tunes by the angle between their task vectors: give at "
                               f"least two inputs, not {len(weights)}")


MODEL_STOCK = register(
    MergeMethod(
        name="model_stock",
        display_name="Model Stock",
        paper_url="https://arxiv.org/abs/2403.19522",
        summary="W + t · mean uᵢ per tensor, t = k·c / (1 + (k − 1)·c) from the mean pairwise cosine c of the task "
                "vectors (clamped to [0, 1])",
        params=(),
        phase=InterpolationPhase(_statistics, _finish, _combine),
        validate=_validate,
    )
)
