"""Parameters and per-chunk combine steps shared by the sparsifying methods (TIES, DARE, magnitude pruning,
Breadcrumbs, DELLA); how each thins τᵢ is its sparsifier (`sparsifiers.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .lowrank_core import core_space_factors
from .registry import ElementwisePhase, FactoredContext, FactoredPhase, MergeMethod, Param, get_method, register
from .sparsifiers import Sparsifier, kept_count
from .subspace import mean_of_vectors

__all__ = ["DENSITY", "LAMBDA", "NORMALIZE_TIES", "RESCALE", "SIGN", "SPACE", "core_space_phase", "kept_count",
           "register_sparse", "sum_consensus", "ties_consensus"]

DENSITY = Param(
    "density", None, float, "fraction of each task vector's entries kept, in (0, 1]", per_adapter=True,
    interval=(0.0, 1.0), required=True,
)
LAMBDA = Param("lambda", 1.0, float, "global scale of the merged task vector")
SIGN = Param("sign", "sum", str, "sign election: sum of weighted values, or count of signs", choices=("sum", "count"))
NORMALIZE_TIES = Param("normalize", True, bool, "divide by Σ|wᵢ| of the adapters that agree with the elected sign")
SPACE = Param("space", "full", str, "where the entry-wise steps run: on the dense task vectors (full), or on the "
              "core of the stacked LoRA factors (core: Core Space merging, another method)", choices=("full", "core"))
RESCALE = Param("rescale", True, bool, "divide kept entries by the density", per_adapter=True)


def sum_consensus(updates: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any]) -> torch.Tensor:
    """τ = λ · Σ uᵢ (uᵢ = wᵢ tᵢ already weighted)."""
    total = updates[0].clone()
    for update in updates[1:]:
        total += update
    return total * params["lambda"]


def ties_consensus(updates: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any]) -> torch.Tensor:
    """TIES steps (3)–(4): elect γ per entry, keep the uᵢ that agree, sum, divide by Σ Mᵢ|wᵢ| (SEMANTICS §3).

    uᵢ·γ > 0 exactly where uᵢ ≠ 0 and sign(uᵢ) = γ, so the agreeing sum is γ · Σ relu(uᵢγ) and Mᵢ is
    sign(relu(uᵢγ)). Only float ops, in place where a buffer is free (boolean tensor kernels are many times
    slower on CPU, and every pass over a chunk counts).
    """
    def ballot(update: torch.Tensor) -> torch.Tensor:
        return torch.sign(update) if params["sign"] == "count" else update

    vote = torch.add(ballot(updates[0]), ballot(updates[1])) if len(updates) > 1 else ballot(updates[0]).clone()
    for update in updates[2:]:
        vote.add_(ballot(update))
    gamma = vote.sign_().add_(0.5).sign_()  # γ = +1 where the vote is 0
    merged: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    for update, weight in zip(updates, weights):
        aligned = torch.mul(update, gamma).relu_()
        if merged is None:
            merged = aligned
            divisor = torch.sign(aligned).mul_(abs(weight)) if params["normalize"] else None
            continue
        merged.add_(aligned)
        if divisor is not None:
            divisor.add_(aligned.sign_(), alpha=abs(weight))
    assert merged is not None
    merged.mul_(gamma)
    if divisor is not None:  # where no adapter agrees, merged is 0 and so is the result
        merged.div_(divisor.clamp_(min=torch.finfo(divisor.dtype).tiny))
    return merged if params["lambda"] == 1 else merged.mul_(params["lambda"])


def core_space_phase(name: str) -> FactoredPhase:
    """`space: core` of the elementwise method `name`: its steps on the core matrices (SEMANTICS §3c)."""

    def factors(factors: Sequence[Any], weights: Sequence[float], params: Mapping[str, Any],
                context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
        return core_space_factors(get_method(name), factors, weights, params, context)

    return FactoredPhase(factors, vectors=mean_of_vectors)


def register_sparse(name: str, *, sparsifier: Sparsifier, ties: bool, **fields: Any) -> MergeMethod:
    """Register a sparsifying method: `sparsifier` thins each τᵢ, then the sum (linear) or TIES consensus combines
    them, with its `space: core` form; one place pairs each consensus with its C kernel."""
    consensus, kernel = (ties_consensus, "ties") if ties else (sum_consensus, "sum")
    return register(MergeMethod(name=name, core_phase=core_space_phase(name),
                                phase=ElementwisePhase(consensus, sparsifier=sparsifier, kernel=kernel), **fields))
