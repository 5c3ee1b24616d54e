"""Learn merge coefficients λᵢ,ₜ so that the merged model answers each adapter's prompts as that adapter does.

The student is `BranchedModel` with coefficients = θ gathered per (adapter, tensor) by granularity (`tensor`: one
θ per adapter and tensor, `layer`: per adapter and transformer block, `adapter`: one per adapter); only θ is
trained (Adam), the base and the factors stay frozen. Every step draws `batch_size` training examples of every
adapter (one forward with all branches over all of them), and the loss is the mean over adapters of

- `ce`: the cross-entropy of the student on the teacher's greedy tokens, averaged over continuation tokens;
- `kl`: KL(teacher ‖ student) over the continuation positions, averaged the same way;

so an adapter with long answers does not outweigh one with short answers.

A share of each adapter's prompts (`holdout`, default 10%) is never trained on: its loss before and after is
reported. Draws are seeded, so the same seed gives the same λ on the same device.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NonFiniteError
from ..methods.gradients import LAYER_INDEX
from .model import BranchedModel
from .teachers import TeacherSet, training_batch

GRANULARITIES = ("tensor", "layer", "adapter")
LOSSES = ("ce", "kl")


@dataclass
class FitResult:
    """The learned coefficients (adapters × tensors) and how the fit went."""

    coefficients: torch.Tensor
    #: training loss per step (the batch's mean)
    losses: list[float] = field(default_factory=list)
    #: held-out loss at the start and at the end (None when nothing was held out)
    held_out: tuple[float, float] | None = None
    #: held-out examples per adapter
    held_out_count: list[int] = field(default_factory=list)
    seconds: float = 0.0


def groups(model: BranchedModel, granularity: str) -> torch.Tensor:
    """Index of the trained θ behind each coefficient (adapters × tensors), by granularity."""
    if granularity not in GRANULARITIES:
        raise ValueError(granularity)
    keys: dict[tuple[int, Any], int] = {}
    index = torch.zeros(model.n_adapters, len(model.tensors), dtype=torch.long)
    for i in range(model.n_adapters):
        for t, name in enumerate(model.tensors):
            if granularity == "tensor":
                key: Any = t
            elif granularity == "layer":
                match = LAYER_INDEX.search(name)
                key = int(match.group(1)) if match else "outside"
            else:
                key = None
            index[i, t] = keys.setdefault((i, key), len(keys))
    return index


def split_held_out(sets: Sequence[TeacherSet], share: float) -> tuple[list[TeacherSet], list[TeacherSet]]:
    """(training, held out) per adapter: the last ⌈share·n⌉ of each adapter's (already shuffled) examples held out,
    keeping at least one to train on."""
    train, held = [], []
    for examples in sets:
        n = len(examples)
        k = min(n - 1, math.ceil(share * n)) if share > 0 else 0
        train.append(examples.subset(range(n - k)))
        held.append(examples.subset(range(n - k, n)))
    return train, held


def fit(model: BranchedModel, sets: Sequence[TeacherSet], init: torch.Tensor, *, loss: str = "ce",
        granularity: str = "tensor", steps: int = 150, lr: float = 0.02, batch_size: int = 16, seed: int = 0,
        holdout: float = 0.1, progress: bool = False) -> FitResult:
    """Train θ from `init` (adapters × tensors; a group starts at its members' mean) and return λ = θ[groups]."""
    started = time.perf_counter()
    index = groups(model, granularity).to(model.device)
    count = int(index.max()) + 1 if index.numel() else 0
    dtype = model.coefficients.dtype
    init = init.to(device=model.device, dtype=dtype)
    start = torch.zeros(count, dtype=dtype, device=model.device).index_add_(0, index.flatten(), init.flatten())
    start /= torch.bincount(index.flatten(), minlength=count).to(dtype)
    theta = torch.nn.Parameter(start)
    train, held = split_held_out(sets, holdout)
    pool = [(a, j) for a, examples in enumerate(train) for j in range(len(examples))]
    result = FitResult(theta.detach()[index].clone(), held_out_count=[len(h) for h in held])
    before = _held_out_loss(model, held, theta[index].detach(), loss, batch_size) if any(map(len, held)) else None
    if steps == 0 or not pool:
        result.held_out = (before, before) if before is not None else None
        result.seconds = time.perf_counter() - started
        return result
    optimizer = torch.optim.Adam([theta], lr=lr)
    rng = random.Random(seed)
    orders: list[list[int]] = [[] for _ in train]
    bar = _bar(steps, progress)
    for step in range(1, steps + 1):
        picked = []
        for a, examples in enumerate(train):  # every adapter's prompts in every step, in equal number
            for _ in range(min(batch_size, len(examples))):
                if not orders[a]:
                    orders[a] = list(range(len(examples)))
                    rng.shuffle(orders[a])
                picked.append((a, orders[a].pop()))
        optimizer.zero_grad(set_to_none=True)
        with model.using(theta[index]):
            per_row, owners = _batch_loss(model, train, picked, loss)
        value = _adapter_mean(per_row, owners, [len(train[a].continuations[j]) for a, j in picked])
        if not torch.isfinite(value):
            bad = next((o for o, v in zip(owners, per_row) if not torch.isfinite(v)), owners[0])
            raise NonFiniteError(f"learned: the {loss} loss is not finite at step {step} on adapter "
                                 f"'{model.labels[bad]}''s prompts; lower lr ({lr:g}) or check that adapter's files")
        value.backward()
        optimizer.step()
        result.losses.append(float(value.detach()))
        bar.set_postfix_str(f"loss {result.losses[-1]:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    result.coefficients = theta.detach()[index].clone()
    if before is not None:
        result.held_out = (before, _held_out_loss(model, held, result.coefficients, loss, batch_size))
    result.seconds = time.perf_counter() - started
    return result


def _adapter_mean(per_row: torch.Tensor, owners: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Mean over adapters of each adapter's per-token loss in the batch (an adapter with long answers does not
    outweigh one with short answers)."""
    means = []
    for a in sorted(set(owners)):
        rows = [k for k, o in enumerate(owners) if o == a]
        means.append(per_row[rows].sum() / max(1, sum(tokens[k] for k in rows)))
    return torch.stack(means).mean()


def _batch_loss(model: BranchedModel, sets: Sequence[TeacherSet], picked: Sequence[tuple[int, int]],
                loss: str) -> tuple[torch.Tensor, list[int]]:
    """Summed loss of each picked example (adapter a's example j), computed in one forward for all adapters."""
    by_adapter: dict[int, list[int]] = {}
    for a, j in picked:
        by_adapter.setdefault(a, []).append(j)
    # one batch mixing adapters: gather the examples' rows as one TeacherSet-like list
    merged = TeacherSet(-1, [], [], [] if loss == "kl" else None)
    owners: list[int] = []
    for a, rows in by_adapter.items():
        part = sets[a].subset(rows)
        merged.prompts += part.prompts
        merged.continuations += part.continuations
        if loss == "kl":
            if part.log_probs is None:
                raise ValueError("kl needs teacher log-probs")
            merged.log_probs += part.log_probs  # type: ignore[operator]
        owners += [a] * len(rows)
    vocab = merged.log_probs[0].shape[-1] if merged.log_probs else 1
    batch = training_batch(merged, range(len(merged)), model.pad_id, vocab)
    return rows_loss(model, batch, loss), owners


def rows_loss(model: BranchedModel, batch: Any, loss: str) -> torch.Tensor:
    """Each row's summed loss over its continuation tokens (`ce`: −log q; `kl`: KL(teacher ‖ model)); also what
    `merge inspect` scores its log-likelihoods with."""
    logits = model.logits(batch.tokens)
    targets = batch.targets.to(model.device)
    mask = targets >= 0
    log_q = torch.log_softmax(logits, dim=-1)
    if loss == "ce":
        picked = log_q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_token = -picked
    else:
        log_p = batch.teacher.to(model.device)
        per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return (per_token * mask).sum(dim=1)


def _held_out_loss(model: BranchedModel, held: Sequence[TeacherSet], coefficients: torch.Tensor, loss: str,
                   batch_size: int) -> float:
    """Mean per-token loss over every held-out example at `coefficients`."""
    total, tokens = 0.0, 0
    with torch.no_grad(), model.using(coefficients):
        for a, examples in enumerate(held):
            for start in range(0, len(examples), batch_size):
                rows = list(range(start, min(len(examples), start + batch_size)))
                per_row, _ = _batch_loss(model, held, [(a, j) for j in rows], loss)
                total += float(per_row.sum())
                tokens += sum(len(examples.continuations[j]) for j in rows)
    return total / max(1, tokens)


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="learning coefficients", unit="step", disable=not enabled, leave=False)
