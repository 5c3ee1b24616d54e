"""The low-rank core of one tensor's adapters (SEMANTICS §3c), and the small exact steps run in it.

All adapters' task vectors of one tensor lie in the span of their stacked factors: with P = [P₁ … P_T] (m×R)
and Q = [Q₁; …; Q_T] (R×n), thin QRs P = U_P K_P and Qᵀ = U_Q K_Q give every τᵢ = U_P Cᵢ U_Qᵀ with a small
core Cᵢ = K_P[:, Jᵢ] K_Q[:, Jᵢ]ᵀ. Products, SVDs and polar factors commute with U_P(·)U_Qᵀ, so the subspace
methods run on the cores and the merged delta comes back as factors (U_P C, U_Qᵀ). Nothing here ever forms,
decomposes or multiplies out an m×n matrix; the arithmetic is float64 (the cores are R×R at most).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..randomness import UniformStream, stream_key
from .registry import ElementwisePhase, FactoredContext, LowRankFactors, MergeMethod
from .sparsifiers import dense_cut

CORE_DTYPE = torch.float64
EPS = 2.0**-52


@dataclass(frozen=True)
class Core:
    """The stacked factors of one tensor reduced to their core: τᵢ (times its coefficient) = U_P Cᵢ U_Qᵀ."""

    #: m×p with orthonormal columns (p = min(m, R))
    u_p: torch.Tensor
    #: n×q with orthonormal columns (q = min(n, R))
    u_q: torch.Tensor
    #: the adapters' p×q cores, in the order of the factors given
    cores: tuple[torch.Tensor, ...]
    #: the R factors of the two QRs: P = U_P K_P (p×R), Qᵀ = U_Q K_Q (q×R)
    k_p: torch.Tensor
    k_q: torch.Tensor
    #: (m, n) of the tensor, for the numerical-rank rule
    shape: tuple[int, int]

    def factors(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with L @ R = U_P · merged · U_Qᵀ, the merged delta in the tensor's layout."""
        return self.u_p @ merged, self.u_q.T


def stacked(factors: Sequence[LowRankFactors], coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """P = [c₁s₁L₁ … c_Ts_TL_T] and Q = [R₁; …; R_T] in float64 (τᵢ = sᵢ Lᵢ Rᵢ)."""
    lefts = [f.left.to(CORE_DTYPE) * (float(c) * f.scale) for f, c in zip(factors, coefficients)]
    return torch.cat(lefts, dim=1), torch.cat([f.right.to(CORE_DTYPE) for f in factors], dim=0)


def core_of(factors: Sequence[LowRankFactors], coefficients: Sequence[float], shape: tuple[int, int]) -> Core:
    """The core of cᵢτᵢ for every adapter: two thin QRs of the tall stacked factors (m×R and n×R)."""
    p, q = stacked(factors, coefficients)
    u_p, k_p = torch.linalg.qr(p, mode="reduced")
    u_q, k_q = torch.linalg.qr(q.T, mode="reduced")
    cores, start = [], 0
    for f in factors:
        stop = start + f.left.shape[1]
        cores.append(k_p[:, start:stop] @ k_q[:, start:stop].T)
        start = stop
    return Core(u_p, u_q, tuple(cores), k_p, k_q, shape)


def rank_svd(x: torch.Tensor, shape: tuple[int, ...] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `x` truncated to its numerical rank: singular values > σ₁ · max(shape) · 2⁻⁵² (numpy's
    matrix_rank rule; `shape` is the full-space shape the core stands for, default x's own)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0], s[:0], vh[:0]
    rank = int((s > s[0] * max(shape or x.shape) * EPS).sum())
    return u[:, :rank], s[:rank], vh[:rank]


def polar(x: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The polar factor of x = Y S Zᵀ: Y Zᵀ (on its numerical range; the closest matrix with orthonormal
    columns when x has full column rank)."""
    u, _, vh = rank_svd(x, shape)
    return u @ vh


# -- the entry-wise steps of the sparsifying methods, on small dense matrices (KnOTS, core space) ---------


def base_coefficients(base: MergeMethod, weights: Sequence[float], params: Mapping[str, Any],
                      context: FactoredContext) -> list[float] | None:
    """A linear `base`'s cᵢ for the adapters in `context` (None for other methods); its Σ wᵢ counts every
    adapter of the merge, touching the tensor or not, as in full space (SEMANTICS §3)."""
    coefficients = base.coefficients(context.all_weights or weights, params)
    if coefficients is not None and context.all_weights:
        coefficients = [coefficients[i] for i in context.adapters]
    return coefficients


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ cᵢ xᵢ, added in order."""
    total = tensors[0] * float(coefficients[0])
    for x, c in zip(tensors[1:], coefficients[1:]):
        total = total + x * float(c)
    return total


def elementwise_merge(base: MergeMethod, matrices: Sequence[torch.Tensor], weights: Sequence[float],
                      params: Mapping[str, Any], context: FactoredContext, space: str) -> torch.Tensor:
    """`base`'s steps (its sparsifier, weights, sign election, disjoint merge, λ) on the adapters' matrices as if
    they were the task vectors; a linear `base` is its Σ cᵢ Xᵢ. Random cuts' keys are (seed, adapter, tensor:space)."""
    coefficients = base_coefficients(base, weights, params, context)
    if coefficients is not None:
        return weighted_sum(matrices, coefficients)
    phase = base.phase
    assert isinstance(phase, ElementwisePhase)
    updates = []
    for x, w, index, own in zip(matrices, weights, context.adapters, context.adapter_params):
        if phase.sparsifier is not None:
            where = f"tensor '{context.tensor}' ({space} of adapters[{index}])"
            stream = UniformStream(stream_key(context.seed, index, f"{context.tensor}:{space}"))
            x = dense_cut(phase.sparsifier, x, own, stream, where)
            w = phase.sparsifier.scale(w, own)
        updates.append(x * float(w))
    return phase.combine(updates, list(weights), params)


def core_space_factors(method: MergeMethod, factors: Sequence[LowRankFactors], weights: Sequence[float],
                       params: Mapping[str, Any], context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Core Space merging: `method`'s entry-wise steps on Mᵢ = V_Pᵀ τᵢ V_Q, with V_P, V_Q the singular vectors
    of the stacked [P₁ … P_T] and [Q₁; …; Q_T]; the merged delta is V_P M V_Qᵀ."""
    m, n = context.shape
    total_rank = sum(f.left.shape[1] for f in factors)
    core = core_of(factors, [1.0] * len(factors), context.shape)
    left_p, _, _ = rank_svd(core.k_p, (m, total_rank))  # V_P = U_P · left_p: [P₁ … P_T] = U_P K_P
    left_q, _, _ = rank_svd(core.k_q, (n, total_rank))  # V_Q = U_Q · left_q: [Q₁; …; Q_T]ᵀ = U_Q K_Q
    matrices = [left_p.T @ c @ left_q for c in core.cores]
    merged = elementwise_merge(method, matrices, weights, params, context, "core")
    return core.u_p @ (left_p @ merged), (core.u_q @ left_q).T
