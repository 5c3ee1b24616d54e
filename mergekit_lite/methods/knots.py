"""knots: KnOTS, a base method run on the adapters' representations in their shared left singular basis (§3c)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from .lowrank_core import CORE_DTYPE, base_coefficients, elementwise_merge, rank_svd, weighted_sum
from .registry import FactoredContext, FactoredPhase, LowRankFactors, MergeMethod, Param, get_method, register
from .sparsifying import LAMBDA, NORMALIZE_TIES, RESCALE, SIGN
from .subspace import mean_of_vectors

BASES = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "linear", "task_arithmetic")
DENSITY_OPTIONAL = Param("density", None, float, "fraction of each representation's entries kept, in (0, 1] "
                         "(needed by the sparsifying bases)", per_adapter=True, interval=(0.0, 1.0))


def knots_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                  context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of [τ₁ … τ_T] = U Σ [Z₁ … Z_T] from the factors; `base` merges the representations ΣZᵢ into Z;
    the merged delta is U Z."""
    m, n = context.shape
    lefts = [f.left.to(CORE_DTYPE) * f.scale for f in factors]
    u_p, k_p = torch.linalg.qr(torch.cat(lefts, dim=1), mode="reduced")
    blocks, bases, start = [], [], 0
    for f in factors:
        stop = start + f.left.shape[1]
        u_q, k_q = torch.linalg.qr(f.right.to(CORE_DTYPE).T, mode="reduced")
        blocks.append(k_p[:, start:stop] @ k_q.T)
        bases.append(u_q)
        start = stop
    u, s, vh = rank_svd(torch.cat(blocks, dim=1), (m, len(factors) * n))
    # ΣZᵢ = Uᵀτᵢ (= Σ·Vᵢᵀ·U_Qiᵀ): computed from the block itself, so an adapter that is 0 here stays exactly 0
    # (from Σ·Vᵀ it would be rounding noise, which TIES would count as an agreeing adapter)
    representations = [(u.T @ block) @ u_q.T for block, u_q in zip(blocks, bases)]
    merged = elementwise_merge(get_method(params["base"]), representations, weights, params, context, "knots")
    return u_p @ u, merged


def knots_vectors(taus: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any],
                  context: FactoredContext) -> torch.Tensor:
    """1-D changes: a linear base combines them as it would (so knots with a linear base is that base
    everywhere); otherwise they are averaged, as for every subspace method."""
    coefficients = base_coefficients(get_method(params["base"]), weights, params, context)
    if coefficients is None:
        return mean_of_vectors(taus, weights, params, context)
    return weighted_sum(taus, coefficients)


def _validate(weights: Sequence[float], params: Mapping[str, Any], own: Sequence[Mapping[str, Any]]) -> None:
    base = get_method(params["base"])
    if base.sparsification is not None and any(o["density"] is None for o in own):
        raise MergeConfigError(f"method 'knots' with base '{base.name}' needs 'density': set it under parameters "
                               "(or every adapter entry)")
    if base.validate is not None:
        base.validate(weights, params, own)


KNOTS = register(
    MergeMethod(
        name="knots",
        display_name="KnOTS",
        paper_url="https://arxiv.org/abs/2410.19735",
        summary="the base method (ties, dare_*, magnitude_prune, linear, task_arithmetic) run on each adapter's "
                "representation ΣZᵢ in the shared singular basis U of [τ₁ … τ_T]; merged delta U·Z",
        params=(Param("base", "ties", str, "the method run on the aligned representations", choices=BASES),
                DENSITY_OPTIONAL, RESCALE, SIGN, NORMALIZE_TIES, LAMBDA),
        phase=FactoredPhase(knots_factors, vectors=knots_vectors),
        validate=_validate,
    )
)
