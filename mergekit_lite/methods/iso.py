"""iso_c and iso_cts: isotropic merging in a common (and task-specific) subspace, in the low-rank core (§3c)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from .lowrank_core import core_of, polar, rank_svd
from .registry import FactoredContext, FactoredPhase, LowRankFactors, MergeMethod, Param, register
from .subspace import ALPHA, mean_of_vectors

PAPER = "https://arxiv.org/abs/2502.04959"


def iso_c_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                  context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Σ uᵢ = U Σ Vᵀ (rank ρ): alpha · σ̄ · U Vᵀ, σ̄ the mean of the ρ nonzero singular values."""
    core = core_of(factors, weights, context.shape)
    u, s, vh = rank_svd(sum(core.cores), context.shape)  # type: ignore[arg-type]
    scale = params["alpha"] * float(s.mean()) if s.numel() else 0.0
    return core.factors(scale * (u @ vh) if s.numel() else torch.zeros_like(core.cores[0]))


def iso_cts_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                    context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Common directions of S = Σ uᵢ (⌊common_fraction·ρ⌋ of them) plus each adapter's top ⌊(ρ − k_c)/T⌋
    directions outside them, both sides orthogonalised by polar factors, every direction at σ̄·alpha."""
    core = core_of(factors, weights, context.shape)
    m, n = context.shape
    u, s, vh = rank_svd(sum(core.cores), context.shape)  # type: ignore[arg-type]
    rho = s.numel()
    if rho == 0:
        return core.factors(torch.zeros_like(core.cores[0]))
    k_c = math.floor(params["common_fraction"] * rho)
    k_s = (rho - k_c) // len(factors)
    u_c, s_c, v_c = u[:, :k_c], s[:k_c], vh[:k_c].T
    us, ss, vs = [u_c], [s_c], [v_c]
    for c in core.cores:
        residual = c - u_c @ (u_c.T @ c)
        u_i, s_i, vh_i = rank_svd(residual, context.shape)
        k = min(k_s, s_i.numel())
        us.append(u_i[:, :k])
        ss.append(s_i[:k])
        vs.append(vh_i[:k].T)
    u_all, s_all, v_all = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    if s_all.numel() == 0:  # ρ < 1 / common_fraction with T > ρ − k_c: no direction is selected
        return core.factors(torch.zeros_like(core.cores[0]))
    u_orth = polar(u_all, (m, u_all.shape[1]))
    v_orth = polar(v_all, (n, v_all.shape[1]))
    return core.factors(params["alpha"] * float(s_all.mean()) * (u_orth @ v_orth.T))


ISO_C = register(
    MergeMethod(
        name="iso_c",
        display_name="Isotropic merging in a common subspace (Iso-C)",
        paper_url=PAPER,
        summary="S = Σ wᵢτᵢ with its nonzero singular values all set to their mean: alpha · σ̄ · U Vᵀ, in the core",
        params=(ALPHA,),
        phase=FactoredPhase(iso_c_factors, vectors=mean_of_vectors),
    )
)


def _check_fraction(weights: Sequence[float], params: Mapping[str, Any], _own: Sequence[Mapping[str, Any]]) -> None:
    if not 0.0 <= params["common_fraction"] <= 1.0:
        raise MergeConfigError(f"parameters: 'common_fraction' must be in [0, 1], got {params['common_fraction']!r}")


ISO_CTS = register(
    MergeMethod(
        name="iso_cts",
        display_name="Isotropic merging in common and task-specific subspaces (Iso-CTS)",
        paper_url=PAPER,
        summary="Iso-C's common directions plus each adapter's own directions outside them, orthogonalised, "
                "all at the mean singular value; in the core",
        params=(ALPHA, Param("common_fraction", 0.8, float,
                             "share of the summed delta's rank kept as common directions, in [0, 1]")),
        phase=FactoredPhase(iso_cts_factors, vectors=mean_of_vectors),
        validate=_check_fraction,
    )
)
