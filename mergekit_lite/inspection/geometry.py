"""Exact task-vector geometry of one tensor from the adapters' factors, never from a dense ΔW.

τᵢ = PᵢQᵢ (Pᵢ = sᵢBᵢ, m×rᵢ; Qᵢ = Aᵢ, rᵢ×n, both in the base tensor's layout). Inner products come from the
small Gram matrices, ⟨PᵢQᵢ, PⱼQⱼ⟩ = tr((PᵢᵀPⱼ)(QⱼQᵢᵀ)); everything that needs singular vectors (spans,
effective ranks, the spectrum of the summed delta) runs in the core of the stacked factors (SEMANTICS §3c):
τᵢ = U_P Cᵢ U_Qᵀ with orthonormal U_P, U_Q, so τᵢ and Cᵢ share singular values, and the column (row) space
of τᵢ is U_P (U_Q) times that of Cᵢ. All of it is float64 and costs O((m + n)·R²), R = Σ rᵢ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..methods import LowRankFactors
from ..methods.lowrank_core import CORE_DTYPE, core_of, rank_svd


@dataclass(frozen=True)
class TaskFactors:
    """One adapter's whole low-rank change of one tensor, τ = left @ right, the scale folded into `left`."""

    left: torch.Tensor
    right: torch.Tensor

    @staticmethod
    def of(parts: Sequence[LowRankFactors]) -> TaskFactors:
        """Several low-rank changes of one tensor by one adapter, summed: [s₁L₁ | s₂L₂] @ [R₁; R₂] (float64)."""
        lefts = [part.left.to(CORE_DTYPE) * float(part.scale) for part in parts]
        rights = [part.right.to(CORE_DTYPE) for part in parts]
        return TaskFactors(torch.cat(lefts, dim=1), torch.cat(rights, dim=0))

    @property
    def rank(self) -> int:
        """The factor rank r (an upper bound on rank τ)."""
        return int(self.left.shape[1])


@dataclass(frozen=True)
class TensorGeometry:
    """The adapters' task vectors of one tensor, compared (in the order of the factors given)."""

    #: ⟨τᵢ, τⱼ⟩ (T×T, float64); its diagonal is ‖τᵢ‖²_F
    inner: torch.Tensor
    #: mean squared cosine of the principal angles between the column spaces (rows: None where a τ is 0)
    column_overlap: list[list[float | None]]
    #: the same for the row spaces
    row_overlap: list[list[float | None]]
    #: numerical rank of each τᵢ
    ranks: list[int]
    #: exp(entropy) of each τᵢ's normalised singular values (Roy & Vetterli); 0 for τᵢ = 0
    effective_ranks: list[float]
    #: singular values of Σ wᵢτᵢ, largest first, to its numerical rank
    sum_spectrum: list[float]

    @property
    def norms(self) -> list[float]:
        """‖τᵢ‖_F."""
        return [math.sqrt(max(float(v), 0.0)) for v in torch.diagonal(self.inner)]

    def cosine(self, i: int, j: int) -> float | None:
        """cos(τᵢ, τⱼ) = ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖‖τⱼ‖); None when either is 0."""
        return cosine_of(float(self.inner[i, j]), float(self.inner[i, i]), float(self.inner[j, j]))


def cosine_of(inner: float, square_i: float, square_j: float) -> float | None:
    """A cosine from an inner product and two squared norms, clamped to [-1, 1] against rounding."""
    if square_i <= 0.0 or square_j <= 0.0:
        return None
    return max(-1.0, min(1.0, inner / math.sqrt(square_i * square_j)))


def gram_inner(a: TaskFactors, b: TaskFactors) -> float:
    """⟨PₐQₐ, P_bQ_b⟩_F = tr((PₐᵀP_b)(Q_bQₐᵀ)) = Σ (PₐᵀP_b) ⊙ (QₐQ_bᵀ): two r×r Grams, no m×n product."""
    return float(((a.left.T @ b.left) * (a.right @ b.right.T)).sum())


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p = σ / Σσ: 1 for a rank-1 matrix, k for k equal singular values, 0 for the zero matrix."""
    total = float(singular_values.sum())
    if total <= 0.0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def span_overlap(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean squared cosine of the principal angles between span(a) and span(b) (orthonormal columns each):
    ‖aᵀb‖²_F / min(kₐ, k_b); 1 when one span contains the other, 0 when they are orthogonal."""
    smaller = min(a.shape[1], b.shape[1])
    if smaller == 0:
        return None
    return min(1.0, float((a.T @ b).square().sum()) / smaller)


def tensor_geometry(factors: Sequence[TaskFactors], weights: Sequence[float], shape: tuple[int, int]) -> TensorGeometry:
    """Norms, inner products, span overlaps, ranks, effective ranks and the summed spectrum of one tensor's τᵢ."""
    count = len(factors)
    inner = torch.zeros(count, count, dtype=CORE_DTYPE)
    for i in range(count):
        for j in range(i, count):
            inner[i, j] = inner[j, i] = gram_inner(factors[i], factors[j])
    core = core_of([LowRankFactors(f.left, f.right, 1.0) for f in factors], [1.0] * count, shape)
    lefts, rights, ranks, effective = [], [], [], []
    for c in core.cores:
        u, s, vh = rank_svd(c, shape)  # τᵢ = (U_P u) s (U_Q vhᵀ)ᵀ: u and vhᵀ are τᵢ's spans in core coordinates
        lefts.append(u)
        rights.append(vh.T)
        ranks.append(int(s.numel()))
        effective.append(effective_rank(s))
    column = [[span_overlap(lefts[i], lefts[j]) for j in range(count)] for i in range(count)]
    row = [[span_overlap(rights[i], rights[j]) for j in range(count)] for i in range(count)]
    summed = sum((c * float(w) for c, w in zip(core.cores, weights)), torch.zeros_like(core.cores[0]))
    _, spectrum, _ = rank_svd(summed, shape)
    return TensorGeometry(inner, column, row, ranks, effective, [float(v) for v in spectrum])


def vector_inner(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨vᵢ, vⱼ⟩ of 1-D changes (bias shifts), float64: the only geometry a vector has."""
    stacked = torch.stack([v.reshape(-1).to(CORE_DTYPE) for v in vectors])
    return stacked @ stacked.T
