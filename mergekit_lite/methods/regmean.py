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
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeConfigError
from .lowrank_core import CORE_DTYPE
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
    """RegMean's statistics of one base tensor, in float64: S and every touching adapter's AᵢG̃ᵢ, or once
    `solved`, only the rᵢ × d_in products (AᵢG̃ᵢ)(S + δI)⁻¹ (S dropped: what the write needs is small)."""

    #: "cols" (y = W x, W out×in) or "rows" (Conv1D, y = x W, W in×out)
    side: str
    #: S = Σⱼ wⱼG̃ⱼ over every input of the merge (d_in × d_in), shared by the tensors that read one input;
    #: None once solved
    total: torch.Tensor | None
    #: config index of adapter i -> AᵢG̃ᵢ (rᵢ × d_in), Aᵢ its lora_A of this module; (AᵢG̃ᵢ)(S + δI)⁻¹ once solved
    projected: Mapping[int, torch.Tensor]
    solved: bool = False


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
    #: how many distinct module inputs (one d_in² sum each) were gathered
    inputs: int = 0


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
    if statistics.weights and context.all_weights and tuple(map(float, context.all_weights)) != statistics.weights:
        raise AssertionError(f"regmean: tensor '{context.tensor}' is merged with weights {context.all_weights}, but "
                             f"its Gram sums were weighted {statistics.weights}")
    if not gram.solved:
        gram = solve_inputs({context.tensor: gram})[context.tensor]
    data_side, merged_side = [], []
    for f, w, index in zip(factors, weights, context.adapters):
        solved = gram.projected[index]  # (AᵢG̃ᵢ)(S + δI)⁻¹, rᵢ × d_in
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


def solve_inputs(grams: Mapping[str, TensorGram]) -> dict[str, TensorGram]:
    """Every tensor's (AᵢG̃ᵢ)(S + δI)⁻¹, one Cholesky per distinct S (q/k/v share one), S then dropped. A
    degenerate Gram is refused here, naming the tensors that read it."""
    readers: dict[int, list[str]] = {}
    for name, gram in grams.items():
        readers.setdefault(id(gram.total), []).append(name)
    factors: dict[int, torch.Tensor] = {}
    out = {}
    for name, gram in grams.items():
        if gram.solved:
            out[name] = gram
            continue
        key = id(gram.total)
        if key not in factors:
            names = readers[key]
            more = f" (and {len(names) - 1} more reading the same input)" if len(names) > 1 else ""
            factors[key] = cholesky(gram.total, f"tensor '{names[0]}'{more}")  # type: ignore[arg-type]
        solved = {i: solve_right(p, factors[key]) for i, p in gram.projected.items()}
        out[name] = TensorGram(gram.side, None, solved, solved=True)
    return out


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
    return FactoredPhase(partial(regmean_factors, statistics=statistics), vectors=averaged_vectors, rank=merged_rank)


def check_weights(weights: Sequence[float], params: Mapping[str, Any], _own: Sequence[Mapping[str, Any]]) -> None:
    """Every wᵢ weights one adapter's term of the objective: it must be positive (S stays positive definite)."""
    for index, w in enumerate(weights):
        if not float(w) > 0.0:
            raise MergeConfigError(f"adapters[{index}]: method 'regmean' needs positive weights (each weights one "
                                   f"adapter's term of the RegMean objective), got {w!r}")


# -- the registry row: calibration passes gather the statistics, then the factored phase streams -------------

#: float64 sums kept at once while gathering; more inputs than fit are gathered in further rounds of passes
STATISTICS_MEMORY = "8GB"


def uncalibrated_factors(factors: Sequence[LowRankFactors], weights: Sequence[float], params: Mapping[str, Any],
                         context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Before the calibration there are no factors to give: the Gram statistics close the phase that has them
    (`factored_phase`). An output's layout reads the declared rank Σrᵢ instead."""
    raise AssertionError(f"regmean: tensor '{context.tensor}' asked for factors before the calibration; the engine "
                         "streams the phase `calibrate` returns")


def merged_rank(ranks: Sequence[int]) -> int:
    """ΔW*'s factors are as wide as the adapters' stacked factors, before and after the calibration: Σ rᵢ."""
    return sum(int(r) for r in ranks)


def _validate(weights: Sequence[Any], params: Mapping[str, Any], per_adapter: Sequence[Mapping[str, Any]]) -> None:
    """Config-time checks: positive weights, the statistics budget, every adapter's calibration keys."""
    from ..calibration import check_calibration
    from ..units import parse_size

    check_weights(weights, params, per_adapter)
    try:
        budget = parse_size(params["statistics_memory"])
    except (ValueError, TypeError, OverflowError):
        budget = 0
    if budget <= 0:
        raise MergeConfigError(f"parameters: 'statistics_memory' must be a size such as '8GB', got "
                               f"{params['statistics_memory']!r}")
    check_calibration(per_adapter)


def calibrate(prepared: Any, run: Any) -> Any:
    """Every adapter's model reads its prompts with hooks on the targeted modules' inputs; the statistics then
    close the factored phase the engine streams."""
    from ..calibration import load_calibration, refuse_full_models
    from ..calibration.gram import regmean_statistics
    from ..engine.device import single_threaded_torch
    from ..units import format_size, parse_size
    from .gradients import any_setting
    from .registry import Calibrated

    config = prepared.config
    params = config.global_params
    refuse_full_models(config, "regmean")
    if any_setting(config.weights, params, config.adapter_params):
        raise MergeConfigError("method 'regmean' takes constant weights and parameters: its Gram sums are shared "
                               "by the tensors that read one input, so a per-layer gradient or filter list cannot "
                               "apply; give plain numbers")
    _validate(config.weights, params, config.adapter_params)
    with single_threaded_torch():
        calibration = load_calibration(prepared, device=run.device, seed=config.seed, room=0,
                                       cache_dir=run.cache_dir, progress=run.progress)
        try:
            statistics = regmean_statistics(calibration, prepared, params["alpha"], params["normalize"],
                                            parse_size(params["statistics_memory"]))
        finally:
            calibration.close()
    inputs = statistics.inputs
    size = format_size(statistics.nbytes)
    summary = (f"regmean: Gram statistics of {inputs} module input(s) ({size} float64, {statistics.passes} round(s) "
               f"of passes) from {', '.join(map(str, statistics.tokens))} calibration tokens")
    # file names only: the card travels with the merge, the local folders it was made in do not
    sources = [s.describe() if s.kind == "task" else Path(s.reference).name for s in calibration.sources]
    rows = "\n".join(f"| {a.label} | {src} | {len(p)} | {n} |" for a, src, p, n in
                     zip(prepared.adapters, sources, calibration.prompts, statistics.tokens))
    card = (f"## RegMean calibration\n\nalpha {params['alpha']}, normalize {str(params['normalize']).lower()}, "
            f"ridge {JITTER:g}·mean(diag S); {inputs} distinct module inputs, {size} of float64 sums, gathered in "
            f"{statistics.passes} round(s) of passes; {len(statistics.averaged)} embedding tensor(s) averaged.\n\n| adapter | calibration | prompts | tokens |\n|---|---|---:|---:|\n"
            f"{rows}\n")
    return Calibrated(weights=tuple(float(w) for w in config.weights), phase=factored_phase(statistics),
                      card_section=card, summary=summary)


def describe(prepared: Any) -> list[str]:
    """The dry run's account of the calibration: the prompts, one pass per adapter with hooks (no teachers, no
    training), the float64 statistics and their rounds, then the solve; per tensor the Gram width and rank Σrᵢ.
    Without the model it cannot see which modules read one input (q/k/v): the size is an upper bound."""
    from ..calibration.dry_run import model_line, source_lines
    from ..calibration.gram import BATCH_SIZE
    from ..engine.plan import LowRank
    from ..units import format_size, parse_size

    config = prepared.config
    params = config.global_params
    budget = parse_size(params["statistics_memory"])
    rows, sizes, averaged = [], [], 0
    for tensor in prepared.plan.tensors:
        if not tensor.touched:
            continue
        low = [item for items in tensor.by_adapter for item in items if isinstance(item, LowRank)]
        shape = "x".join(map(str, tensor.info.shape))
        if not low:
            rows.append(f"    {tensor.name} [{shape}]: 1-D: mean of the adapters' shifts")
        elif low[0].module.embedding:
            averaged += 1
            rows.append(f"    {tensor.name} [{shape}]: embedding, averaged (no Gram)")
        else:
            width = tensor.info.rows if low[0].transposed else tensor.info.cols
            rank = merged_rank([item.module.rank for item in low])
            sizes.append(width * width * 8 + rank * width * 8)
            rows.append(f"    {tensor.name} [{shape}]: Gram {width}x{width}, rank {rank} ({len(low)} adapter(s))")
    rounds, used = 0, 0
    for size in sizes:  # as calibration.gram.plan_groups packs them, each module's input counted apart
        if not rounds or used + size > budget:
            rounds, used = rounds + 1, 0
        used += size
    return [model_line(), *source_lines(config),
            f"  passes: each adapter's model reads its prompts once (batches of {BATCH_SIZE}; no teacher pass, no "
            f"training), hooks on the inputs of {len(sizes)} module(s)",
            f"  statistics: float64 Gram sums up to {format_size(sum(sizes))} (d_in² per module input, q/k/v reading "
            f"one input share it, + rᵢ×d_in per adapter; budget {params['statistics_memory']}: about "
            f"{max(rounds, 1)} round(s) of passes)",
            f"  solve: one Cholesky per distinct input (float64), then per tensor ΔW* as factors of rank Σrᵢ, streamed "
            f"like task arithmetic; {averaged} embedding tensor(s) averaged",
            *rows]


def _calibration_params() -> tuple[Param, ...]:
    from ..calibration import CALIBRATION_PARAMS

    return CALIBRATION_PARAMS


def _register() -> Any:
    from .registry import CalibratedPhase, MergeMethod, register

    return register(MergeMethod(
        name="regmean",
        display_name="RegMean (exact in the LoRA factors)",
        paper_url=PAPER,
        summary="ΔW* = Σᵢ wᵢτᵢG̃ᵢ(Σⱼ wⱼG̃ⱼ)⁻¹ per linear module, G̃ᵢ the (α-shrunk) Gram matrix of the module's inputs "
                "while adapter i's model reads its calibration prompts; as factors of rank ≤ Σrᵢ",
        params=(ALPHA, NORMALIZE,
                Param("statistics_memory", STATISTICS_MEMORY, str, "float64 Gram sums held at once; more are "
                      "gathered in further rounds of the adapters' passes"),
                *_calibration_params()),
        phase=FactoredPhase(uncalibrated_factors, vectors=averaged_vectors, rank=merged_rank),
        validate=_validate,
        calibrated=CalibratedPhase(calibrate, describe=describe),
    ))


REGMEAN = _register()
