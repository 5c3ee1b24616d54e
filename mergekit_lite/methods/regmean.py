"""regmean: RegMean (Jin et al., ICLR 2023) exact in the LoRA factors (SEMANTICS §3e).

For a linear module read as y = W x (W out×in), adapter i's model Wᵢ = W + τᵢ and the Gram matrix
Gᵢ = XᵢᵀXᵢ of that module's inputs while adapter i's model reads its own calibration prompts, RegMean's
W* = argmin Σᵢ wᵢ‖Xᵢ(W* − Wᵢ)ᵀ‖² is, with G̃ᵢ = αGᵢ + (1−α)diag(Gᵢ) and S = Σⱼ wⱼG̃ⱼ,

    ΔW* = W* − W = Σᵢ wᵢ τᵢ G̃ᵢ S⁻¹ = Σᵢ (wᵢsᵢBᵢ) · (AᵢG̃ᵢ) S⁻¹,

of rank ≤ Σrᵢ: the factors L = [w₁s₁B₁ … wₙsₙBₙ] and R = [(A₁G̃₁)S⁻¹; …] are returned and the engine streams
W + L·R. No m×n matrix is built; the solve is float64, one Cholesky of S + δI per tensor (δ a ridge toward the
base, see `JITTER`). The statistics S (one d_in² sum per distinct module input) and AᵢG̃ᵢ come from
`mergekit_lite.calibration.gram`; this module is the pure math on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..errors import MergeConfigError
from ._core import CORE_DTYPE
from .registry import FactoredContext, FactoredPhase, LowRankFactors, Param

PAPER = "https://arxiv.org/abs/2212.09849"

#: the ridge added to S before its Cholesky, relative to S's mean diagonal entry: S + δI with
#: δ = JITTER · tr(S)/d. It is the minimiser of the objective plus δ‖W* − W‖² (a pull toward the base), so a
#: Gram that is singular (α = 1 with fewer tokens than input features) gives the minimum-change solution.
JITTER = 1e-10
#: the two orientations of a module's weight: "cols" (Linear, W out×in: S acts on the columns) and "rows"
#: (GPT-2 Conv1D, W stored in×out: S acts on the rows)
SIDES = ("cols", "rows")

ALPHA = Param("alpha", 0.9, float, "share of each Gram matrix's off-diagonal kept (G̃ = αG + (1−α)diag G), "
              "in (0, 1]", interval=(0.0, 1.0))
NORMALIZE = Param("normalize", True, bool, "divide each adapter's Gram matrix by its number of tokens "
                  "(per-token mean), so adapters with longer prompts do not outweigh the others")


@dataclass(frozen=True)
class TensorGram:
    """RegMean's statistics of one base tensor, in float64: S and every touching adapter's AᵢG̃ᵢ."""

    #: "cols" (y = W x, W out×in) or "rows" (Conv1D, y = x W, W in×out)
    side: str
    #: S = Σⱼ wⱼG̃ⱼ over every input of the merge (d_in × d_in), shared by the tensors that read one input
    total: torch.Tensor
    #: config index of adapter i -> AᵢG̃ᵢ (rᵢ × d_in), Aᵢ its lora_A of this module
    projected: Mapping[int, torch.Tensor]


@dataclass(frozen=True)
class RegMeanStatistics:
    """What the calibration passes gathered for one merge: per merged tensor its Gram statistics, or its name
    in `averaged` (embeddings and other tensors that are not a linear module's weight)."""

    grams: Mapping[str, TensorGram]
    averaged: frozenset[str] = frozenset()
    #: the weights wⱼ that S was summed with (config order), checked against the merge's own
    weights: tuple[float, ...] = ()
    #: how many bytes the float64 sums took at their peak, and in how many passes they were gathered
    nbytes: int = 0
    passes: int = 1
    tokens: tuple[int, ...] = field(default=())


def modified_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = αG + (1−α)diag(G): the off-diagonal shrunk by α (float64)."""
    g = gram.to(CORE_DTYPE)
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def cholesky(total: torch.Tensor, where: str) -> torch.Tensor:
    """The lower Cholesky factor of S + δI (δ = JITTER · mean diag S), or a config error naming `where`."""
    s = total.to(CORE_DTYPE)
    if not bool(torch.isfinite(s).all()):
        raise MergeConfigError(f"{where}: the calibration inputs' Gram matrix holds inf/NaN; check the adapters "
                               "and the calibration prompts (the model's activations overflowed)")
    scale = float(torch.diagonal(s).mean()) if s.numel() else 0.0
    if not scale > 0.0:
        raise MergeConfigError(f"{where}: the module's inputs on the calibration prompts are all zero (an empty "
                               "Gram matrix); RegMean cannot weight them: add calibration prompts or use another method")
    factor, info = torch.linalg.cholesky_ex(s + (JITTER * scale) * torch.eye(s.shape[0], dtype=CORE_DTYPE))
    if int(info) != 0:
        raise MergeConfigError(f"{where}: the summed Gram matrix is not positive definite even with the jitter "
                               f"{JITTER:g}·mean(diag); its inputs are degenerate: lower 'alpha' or add prompts")
    return factor


def solve_right(projected: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """X S⁻¹ for X (k × d) and the Cholesky factor of the symmetric S: (S⁻¹ Xᵀ)ᵀ."""
    return torch.cholesky_solve(projected.to(CORE_DTYPE).T, factor).T


def regmean_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                    context: FactoredContext, *, statistics: RegMeanStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of ΔW* = Σᵢ wᵢsᵢBᵢ (AᵢG̃ᵢ)S⁻¹ (Linear) or its transpose (Conv1D); tensors listed as averaged
    (embeddings) get the weighted average Σ wᵢτᵢ / Σ wⱼ over every adapter of the merge, as `linear`."""
    if context.tensor in statistics.averaged:
        total = sum(context.all_weights or weights)
        lefts = [f.left.to(CORE_DTYPE) * (float(w) * f.scale / total) for f, w in zip(factors, weights)]
        return torch.cat(lefts, dim=1), torch.cat([f.right.to(CORE_DTYPE) for f in factors], dim=0)
    gram = statistics.grams.get(context.tensor)
    if gram is None:
        raise AssertionError(f"regmean: no calibration statistics for tensor '{context.tensor}'")
    factor = cholesky(gram.total, f"tensor '{context.tensor}'")
    data_side, merged_side = [], []
    for f, w, index in zip(factors, weights, context.adapters):
        solved = solve_right(gram.projected[index], factor)  # (AᵢG̃ᵢ)S⁻¹, rᵢ × d_in
        other = (f.left if gram.side == "cols" else f.right).to(CORE_DTYPE) * (float(w) * f.scale)
        if solved.shape[0] != f.left.shape[1]:
            raise AssertionError(f"regmean: tensor '{context.tensor}': adapter {index}'s statistics have rank "
                                 f"{solved.shape[0]}, its factors {f.left.shape[1]}")
        data_side.append(solved)
        merged_side.append(other)
    if gram.side == "cols":  # W out×in: ΔW* = [wᵢsᵢBᵢ] · [(AᵢG̃ᵢ)S⁻¹]
        return torch.cat(merged_side, dim=1), torch.cat(data_side, dim=0)
    # Conv1D, W in×out: ΔW* = Σ S⁻¹(AᵢG̃ᵢ)ᵀ · wᵢsᵢBᵢᵀ
    return torch.cat([d.T for d in data_side], dim=1), torch.cat(merged_side, dim=0)


def averaged_vectors(taus: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any],
                     context: FactoredContext) -> torch.Tensor:
    """1-D changes (lora_bias shifts) are averaged as `linear` does, Σ wᵢτᵢ / Σ wⱼ over every adapter (RegMean
    merges the linear maps' weights; the paper averages every other parameter)."""
    total = sum(context.all_weights or weights)
    out = taus[0] * (float(weights[0]) / total)
    for tau, w in zip(taus[1:], weights[1:]):
        out = out + tau * (float(w) / total)
    return out


def factored_phase(statistics: RegMeanStatistics) -> FactoredPhase:
    """The factored phase that writes a merge once its statistics are gathered."""
    return FactoredPhase(partial(regmean_factors, statistics=statistics), vectors=averaged_vectors)


def check_weights(weights: Sequence[float], params: Mapping[str, Any], _own: Sequence[Mapping[str, Any]]) -> None:
    """Every wᵢ weights one adapter's term of the objective: it must be positive (S stays positive definite)."""
    for index, w in enumerate(weights):
        if not float(w) > 0.0:
            raise MergeConfigError(f"adapters[{index}]: method 'regmean' needs positive weights (each weights one "
                                   f"adapter's term of the RegMean objective), got {w!r}")
