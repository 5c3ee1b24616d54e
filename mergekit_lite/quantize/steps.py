"""`merge inspect CONFIG --quantize FORMATS`: flag adapters whose changes sit below a format's rounding step.

Per touched 2-D tensor, the format's typical step is the mean over its blocks of absmax / levels of the base W
(streamed a row chunk at a time; int8's block is a whole row); an adapter's change there has RMS ‖τᵢ‖ / √n.
Where RMS(τᵢ) < step, quantizing a merge carries τᵢ only as rounding noise (evals/quantize_near_step.py: at a
tenth of the step the cosine with the change is ~0.35 for q4_0), so the adapter is flagged with the share of its
‖τᵢ‖² that lies in such tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..sources.checkpoint import BaseCheckpoint
from .formats import QuantFormat, resolve
from .measure import MAX_MEMORY

if TYPE_CHECKING:
    from ..inspection.analyse import Inspection


@dataclass(frozen=True)
class AdapterSteps:
    """One adapter under one format: how much of its change lies below the step, and its typical ratio."""

    adapter: str
    format: str
    tensors: int  # tensors of the adapter measured under the format
    below: int  # of which RMS(τᵢ) < step
    below_share: float  # share of the adapter's ‖τᵢ‖² in those tensors
    median_ratio: float  # median over tensors of RMS(τᵢ) / step

    def line(self) -> str:
        """One console line, flagged or not."""
        flag = "BELOW" if self.below_share >= 0.5 else "ok   "
        return (f"  {flag} {self.format:5s} adapter '{self.adapter}': {self.below}/{self.tensors} tensors below the "
                f"step ({self.below_share:.0%} of its ‖τ‖²), RMS τ / step median {self.median_ratio:.2g}")


def mean_step(base: BaseCheckpoint, name: str, fmt: QuantFormat, max_memory: int = MAX_MEMORY) -> float:
    """The format's typical rounding step on base tensor `name`: mean over blocks of absmax / levels."""
    rows, cols = base.info(name).shape
    block = cols if fmt.block == 1 else fmt.block  # int8: one scale per row
    step_rows = max(1, max_memory // max(1, cols * 8))
    total, count = 0.0, 0
    for start in range(0, rows, step_rows):
        chunk = base.read_rows(name, start, min(start + step_rows, rows)).to(torch.float64)
        absmax = chunk.reshape(-1, block).abs().amax(dim=1)
        total += float(absmax.sum())
        count += absmax.numel()
    return total / count / fmt.levels if count else math.nan


def adapter_steps(inspection: Inspection, formats: Sequence[QuantFormat],
                  max_memory: int = MAX_MEMORY) -> list[AdapterSteps]:
    """Per adapter and format, where its per-tensor change sits against the base's rounding step."""
    config = inspection.config
    folder = config.resolve_path(config.base_model)
    if not folder.is_dir():
        raise InputError(f"--quantize: the base {config.base_model} is not a local folder; the step check reads it")
    ratios: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with BaseCheckpoint(folder) as base:
        for tensor in inspection.tensors:
            if len(tensor.shape) != 2 or tensor.name not in base:
                continue
            for fmt in formats:
                if fmt.unfit(tensor.shape) is not None:
                    continue
                step = mean_step(base, tensor.name, fmt, max_memory)
                for adapter in tensor.adapters:
                    norm = tensor.norm(adapter) or 0.0
                    rms = norm / math.sqrt(tensor.numel)
                    ratios.setdefault((adapter, fmt.name), []).append((rms / step if step else math.inf, norm ** 2))
    results = []
    order = {fmt.name: i for i, fmt in enumerate(formats)}
    for (adapter, name), pairs in sorted(ratios.items(), key=lambda item: (item[0][0], order[item[0][1]])):
        energy = sum(e for _, e in pairs)
        below = [(r, e) for r, e in pairs if r < 1.0]
        results.append(AdapterSteps(inspection.labels[adapter], name, len(pairs), len(below),
                                    sum(e for _, e in below) / energy if energy else 0.0,
                                    float(torch.tensor([r for r, _ in pairs], dtype=torch.float64).median())))
    return results


def step_lines(inspection: Inspection, names: str) -> list[str]:
    """The console block `merge inspect --quantize` prints after its report."""
    found = adapter_steps(inspection, resolve(names))
    lines = ["quantization steps (RMS of each adapter's per-tensor change against the base's rounding step):"]
    lines += [item.line() for item in found]
    flagged = sorted({(item.adapter, item.format) for item in found if item.below_share >= 0.5})
    if flagged:
        lines.append("  BELOW: a merge quantized to that format carries most of the adapter only as rounding noise; "
                     "measure the merge with `merge verify OUT --quantize`, or serve the adapters unmerged on the "
                     "quantized base")
    return lines
