"""RegMean's statistics: the Gram matrices of the targeted modules' inputs, gathered by forward hooks.

While adapter i's model (base + τᵢ) reads adapter i's calibration prompts, the input X (tokens × d_in, padding
dropped) of every linear module some adapter targets is hooked. Kept, in float64 on the model's device:

- per *distinct* module input (q/k/v read one input, gate/up another): ONE d_in × d_in sum
  S = Σᵢ wᵢG̃ᵢ, accumulated across the adapters' passes as S += (wᵢα/cᵢ)·XᵀX per batch, and
  S += (wᵢ(1−α)/cᵢ)·diag(Gᵢ) after adapter i's pass (cᵢ = adapter i's token count with `normalize`, else 1);
- per adapter and module it targets: AᵢG̃ᵢ = (α·(AᵢXᵀ)X summed + (1−α)·Aᵢ diag(Gᵢ)) / cᵢ (rᵢ × d_in), built
  from the running (AᵢXᵀ)X and diag(Gᵢ) (d_in), which live only during adapter i's pass.

So the memory is one d_in² per distinct input, not one per adapter. When those sums exceed the budget, the
inputs are gathered in groups (consecutive in model order), each group one more round of every adapter's
passes; a group's sums are the same bytes whatever the grouping (each input's sequence of additions is fixed).
At 7B (Llama-2-7B: per layer q/k/v and o_proj 4096 wide, gate/up 4096, down_proj 11008) one set of sums is
32 × (3·4096² + 11008²) ≈ 5.5 G entries: 20 GiB in float32, 41 GiB in the float64 kept here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.plan import LowRank
from ..methods.regmean import SIDES, RegMeanStatistics, TensorGram, solve_inputs
from .batches import TokenBatch

STAT_DTYPE = torch.float64
#: (input_ids, attention_mask) of one batch
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GramTarget:
    """One linear module whose input is hooked: its base tensor, its orientation, and its adapters' lora_A."""

    tensor: str
    module: torch.nn.Module
    side: str
    #: config index of each adapter touching the module -> its lora_A (rᵢ × d_in)
    lora_a: Mapping[int, torch.Tensor]


@dataclass
class _Input:
    """One distinct module input: the targets that read it and its running sums."""

    targets: list[GramTarget]
    width: int
    total: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    rows: int = 0
    #: (adapter, tensor) -> running Σ (AᵢXᵀ)X during that adapter's pass
    running: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def owner(self) -> GramTarget:
        return self.targets[0]


def input_width(target: GramTarget) -> int:
    """d_in of a target module: lora_A's columns (every adapter's A reads the module's input)."""
    widths = {int(a.shape[1]) for a in target.lora_a.values()}
    if len(widths) != 1:
        raise AssertionError(f"tensor '{target.tensor}': adapters disagree on the input width {sorted(widths)}")
    return widths.pop()


def shared_inputs(targets: Sequence[GramTarget], probe: Callable[[], None]) -> list[list[GramTarget]]:
    """The targets grouped by the input they read, found by one probing forward pass: modules handed the very
    same tensor object (q/k/v, gate/up) share one sum. Groups come in the order their inputs were first seen."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for target in targets:
        def hook(_module: torch.nn.Module, args: tuple[object, ...], name: str = target.tensor) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0]  # held (alive) until the grouping is done, so identity means the same input
        handles.append(target.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            probe()
    finally:
        for handle in handles:
            handle.remove()
    missing = [t.tensor for t in targets if t.tensor not in seen]
    if missing:
        raise AssertionError(f"regmean: modules never ran on the calibration prompts: {', '.join(missing)}")
    groups: list[tuple[torch.Tensor, list[GramTarget]]] = []
    order = {name: n for n, name in enumerate(seen)}
    for target in sorted(targets, key=lambda t: order[t.tensor]):
        x = seen[target.tensor]
        for tensor, members in groups:
            if tensor is x:
                members.append(target)
                break
        else:
            groups.append((x, [target]))
    return [members for _, members in groups]


def plan_groups(inputs: Sequence[list[GramTarget]], budget: int) -> list[list[list[GramTarget]]]:
    """Consecutive inputs packed into groups whose float64 sums fit `budget` bytes (at least one per group)."""
    groups: list[list[list[GramTarget]]] = []
    used = 0
    for members in inputs:
        size = statistics_bytes([members])
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(members)
        used += size
    return groups


def statistics_bytes(inputs: Iterable[Sequence[GramTarget]]) -> int:
    """Bytes of the float64 sums kept for `inputs`: d_in² per input, plus rᵢ × d_in per adapter and module."""
    total = 0
    for members in inputs:
        width = input_width(members[0])
        total += width * width * 8
        total += sum(int(a.shape[0]) * width * 8 for t in members for a in t.lora_a.values())
    return total


def gather(targets: Sequence[GramTarget], batches: Sequence[Sequence[Batch]], weights: Sequence[float],
           forward: Callable[[int, Batch], None], alpha: float, normalize: bool, budget: int,
           averaged: Iterable[str] = (), solve: bool = True) -> RegMeanStatistics:
    """Run every adapter's passes (`forward(i, batch)` runs adapter i's model alone on a batch) with hooks on
    the targets' inputs, in as many rounds as the budget needs, and return RegMean's statistics. With `solve`
    (the default) each round's sums are solved as soon as they are complete and dropped, so only the small
    (AᵢG̃ᵢ)(S + δI)⁻¹ outlive their round; a degenerate Gram is refused there, before anything is written."""
    for target in targets:
        if target.side not in SIDES:
            raise AssertionError(f"tensor '{target.tensor}': side {target.side!r}")
    tokens = tuple(int(sum(int(mask.sum()) for _, mask in own)) for own in batches)
    if not targets:
        return RegMeanStatistics({}, frozenset(averaged), tuple(float(w) for w in weights), 0, 0, tokens, 0)
    first = next(i for i, own in enumerate(batches) if own)
    inputs = shared_inputs(targets, lambda: forward(first, batches[first][0]))
    groups = plan_groups(inputs, budget)
    grams: dict[str, TensorGram] = {}
    peak = 0
    for group in groups:
        state = [_Input(list(members), input_width(members[0])) for members in group]
        peak = max(peak, statistics_bytes(group))
        for index, own in enumerate(batches):
            scale = 1.0 / tokens[index] if normalize and tokens[index] else 1.0
            _one_pass(state, index, own, forward, float(weights[index]) * alpha * scale)
            for item in state:
                _finish_adapter(item, index, float(weights[index]), alpha, scale, grams, tokens[index])
        done = {}
        for item in state:
            total = item.total if item.total is not None else torch.zeros(item.width, item.width, dtype=STAT_DTYPE)
            for target in item.targets:
                done[target.tensor] = TensorGram(target.side, total, dict(grams[target.tensor].projected))
        grams.update(solve_inputs(done) if solve else done)
    return RegMeanStatistics(grams, frozenset(averaged), tuple(float(w) for w in weights), peak, len(groups), tokens,
                             len(inputs))


def _one_pass(state: list[_Input], index: int, own: Sequence[Batch], forward: Callable[[int, Batch], None],
              coefficient: float) -> None:
    """Adapter `index`'s model reads its batches; each hooked input adds to S, diag(Gᵢ) and (AᵢXᵀ)X."""
    mask_now: list[torch.Tensor] = []
    handles = []
    for item in state:
        item.diag, item.rows, item.running = None, 0, {}

        def hook(_module: torch.nn.Module, args: tuple[object, ...], item: _Input = item) -> None:
            x = args[0]
            assert isinstance(x, torch.Tensor)
            keep = mask_now[0].reshape(-1).to(device=x.device, dtype=torch.bool)
            flat = x.reshape(-1, item.width)
            if flat.shape[0] != keep.shape[0]:
                raise AssertionError(f"tensor '{item.owner.tensor}': input of {flat.shape[0]} rows for a batch of "
                                     f"{keep.shape[0]} tokens")
            rows = flat[keep].to(STAT_DTYPE)
            if item.total is None:
                item.total = torch.zeros(item.width, item.width, dtype=STAT_DTYPE, device=x.device)
            item.total.addmm_(rows.T, rows, alpha=coefficient)
            squares = (rows * rows).sum(dim=0)
            item.diag = squares if item.diag is None else item.diag + squares
            item.rows += rows.shape[0]
            for target in item.targets:
                a = target.lora_a.get(index)
                if a is not None:
                    part = (a.to(device=x.device, dtype=STAT_DTYPE) @ rows.T) @ rows
                    previous = item.running.get(target.tensor)
                    item.running[target.tensor] = part if previous is None else previous + part
        handles.append(item.owner.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in own:
                mask_now[:] = [batch[1]]
                forward(index, batch)
    finally:
        for handle in handles:
            handle.remove()


def _finish_adapter(item: _Input, index: int, weight: float, alpha: float, scale: float,
                    grams: dict[str, TensorGram], tokens: int) -> None:
    """After adapter `index`'s pass: S += w(1−α)/c · diag(Gᵢ); AᵢG̃ᵢ = (α(AᵢXᵀ)X + (1−α)Aᵢdiag(Gᵢ)) / c."""
    if item.rows != tokens:
        raise AssertionError(f"tensor '{item.owner.tensor}': saw {item.rows} tokens of adapter {index}, expected {tokens}")
    if item.total is None or item.diag is None:  # no token at all: nothing to add
        return
    item.total.diagonal().add_(item.diag, alpha=weight * (1.0 - alpha) * scale)
    for target in item.targets:
        a = target.lora_a.get(index)
        if a is None:
            continue
        a = a.to(device=item.diag.device, dtype=STAT_DTYPE)
        projected = (alpha * item.running[target.tensor] + (1.0 - alpha) * (a * item.diag)) * scale
        previous = dict(grams[target.tensor].projected) if target.tensor in grams else {}
        previous[index] = projected
        grams[target.tensor] = TensorGram(target.side, item.total, previous)
    item.diag, item.running = None, {}


#: prompts per forward pass while gathering (the statistics do not depend on it beyond float64 rounding)
BATCH_SIZE = 16


def regmean_statistics(calibration: Any, prepared: Any, alpha: float, normalize: bool, budget: int,
                       batch_size: int = BATCH_SIZE) -> RegMeanStatistics:
    """RegMean's statistics of a prepared merge from its loaded calibration (`calibration.load_calibration`):
    every Linear / Conv1D branch's module input hooked; Embedding branches are averaged (SEMANTICS §3e)."""
    from .model import CONV1D, EMBEDDING, LINEAR

    model = calibration.model
    plans = {t.name: t for t in prepared.plan.tensors}
    targets, averaged = [], []
    for branch in model.branches:
        if branch.kind == EMBEDDING:
            averaged.append(branch.tensor)
        elif branch.kind in (LINEAR, CONV1D):
            lora_a = {}
            for index, items in enumerate(plans[branch.tensor].by_adapter):
                for item in items:
                    if isinstance(item, LowRank):
                        lora_a[index] = prepared.adapters[index].tensor(item.module.a_key).to(STAT_DTYPE)
            targets.append(GramTarget(branch.tensor, model.module(branch.tensor),
                                      "cols" if branch.kind == LINEAR else "rows", lora_a))
    batches = [[(b.input_ids, b.attention_mask) for b in calibration.batches(i, batch_size)]
               for i in range(model.n_adapters)]

    def forward(index: int, batch: Batch) -> None:
        with model.teacher(index):
            model.logits(TokenBatch(batch[0], batch[1]))

    return gather(targets, batches, prepared.config.weights, forward, alpha, normalize, budget, averaged)
