"""tsv_m: Task Singular Vectors merge, computed exactly in the low-rank core (SEMANTICS §3c)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .lowrank_core import core_of, polar, rank_svd
from .registry import FactoredContext, FactoredPhase, LowRankFactors, MergeMethod, register
from .subspace import ALPHA, mean_of_vectors


def tsv_m_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                  context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Each uᵢ's top kᵢ = min(rank uᵢ, ⌊min(m,n)/T⌋) singular triplets, U and V stacked and replaced by their
    polar factors, alpha · U⊥ Σ V⊥ᵀ."""
    core = core_of(factors, weights, context.shape)
    m, n = context.shape
    cap = min(m, n) // len(factors)
    us, ss, vs = [], [], []
    for c in core.cores:
        u, s, vh = rank_svd(c, context.shape)
        k = min(s.numel(), cap)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_all, s_all, v_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    if s_all.numel() == 0:
        return core.factors(torch.zeros_like(core.cores[0]))
    u_orth = polar(u_all, (m, u_all.shape[1]))
    v_orth = polar(v_all, (n, v_all.shape[1]))
    merged = params["alpha"] * (u_orth * s_all) @ v_orth.T
    return core.factors(merged)


TSV_M = register(
    MergeMethod(
        name="tsv_m",
        display_name="Task Singular Vectors merge (TSV-M)",
        paper_url="https://arxiv.org/abs/2412.00081",
        summary="each uᵢ's top singular triplets (capped at its rank), U and V orthogonalised by their polar "
                "factors: alpha · U⊥ Σ V⊥ᵀ, computed in the low-rank core",
        params=(ALPHA,),
        phase=FactoredPhase(tsv_m_factors, vectors=mean_of_vectors),
    )
)
