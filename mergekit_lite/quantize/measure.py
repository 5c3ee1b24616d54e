"""How much of a merge's change ΔW survives quantization of the merged weight, tensor by tensor, streamed.

For a base tensor W, the merged tensor W + ΔW and a quantizer Q (dequantize ∘ quantize):
    share    s   = ⟨Q(W+ΔW) − Q(W), ΔW⟩ / ‖ΔW‖²      (1: the change arrives whole; 0: erased; < 0: reversed)
    cosine       = cos(Q(W+ΔW) − Q(W), ΔW)          (how much of what arrives is the change, not rounding noise)
    error        = ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖         (the rounding error of the merged weight, in units of ΔW)
Sums run in float64 over row chunks whose boundaries fall on whole quantization blocks, so Q of a chunk is Q of
those rows of the whole tensor; each sum is kept per row and added up once at the end, so the figures are the
same bytes whatever the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .formats import QuantFormat

#: default memory for one chunk's working set (base, merged, their quantized copies, float64 temporaries)
MAX_MEMORY = 256 * 1024 * 1024
#: float64-sized buffers alive per chunk entry: W, M, ΔW, Q(W), Q(M), the change and a product
_BUFFERS = 7

RowsFn = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class Figures:
    """The sums of one tensor (or a group of tensors) under one format; the ratios derive from them."""

    delta_sq: float  # ‖ΔW‖²
    base_sq: float  # ‖W‖²
    inner: float  # ⟨Q(W+ΔW) − Q(W), ΔW⟩
    change_sq: float  # ‖Q(W+ΔW) − Q(W)‖²
    error_sq: float  # ‖Q(W+ΔW) − (W+ΔW)‖²

    @property
    def share(self) -> float:
        """s: the part of ΔW that the quantized merged weight still carries (projected onto ΔW)."""
        return self.inner / self.delta_sq if self.delta_sq else math.nan

    @property
    def cosine(self) -> float:
        """The cosine between what quantization delivers, Q(W+ΔW) − Q(W), and ΔW."""
        denominator = math.sqrt(self.change_sq * self.delta_sq)
        return self.inner / denominator if denominator else math.nan

    @property
    def error(self) -> float:
        """‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖: the merged weight's rounding error measured against the change itself."""
        return math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq else math.nan

    @property
    def relative(self) -> float:
        """‖ΔW‖ / ‖W‖: how large the change is next to the weight it changes."""
        return math.sqrt(self.delta_sq / self.base_sq) if self.base_sq else math.nan

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.delta_sq + other.delta_sq, self.base_sq + other.base_sq, self.inner + other.inner,
                       self.change_sq + other.change_sq, self.error_sq + other.error_sq)

    def as_dict(self) -> dict[str, float]:
        """The ratios (and ‖ΔW‖/‖W‖) for JSON."""
        return {"share": self.share, "cosine": self.cosine, "error": self.error, "relative_norm": self.relative}


ZERO = Figures(0.0, 0.0, 0.0, 0.0, 0.0)


def aligned_chunk_rows(cols: int, formats: Sequence[QuantFormat], max_memory: int = MAX_MEMORY) -> int:
    """Rows per chunk: as many as `max_memory` allows, rounded down to whole blocks of every format (at least one)."""
    multiple = 1
    for fmt in formats:
        multiple = math.lcm(multiple, fmt.row_multiple(cols))
    rows = max_memory // max(1, cols * 8 * (_BUFFERS + 2 * len(formats)))
    return max(multiple, rows // multiple * multiple)


def measure_tensor(rows_of_base: RowsFn, rows_of_merged: RowsFn, shape: Sequence[int],
                   formats: Sequence[QuantFormat], chunk_rows: int | None = None,
                   rows_of_delta: RowsFn | None = None) -> dict[str, Figures]:
    """The figures of one 2-D tensor under each format, read a row chunk at a time.

    `rows_of_base(start, stop)` / `rows_of_merged(...)` give W and W + ΔW rows as stored (their own dtypes:
    the quantizers see what a converter would). ΔW is merged − base in float64, or `rows_of_delta` where the
    change is known exactly (a PEFT adapter's factors). `chunk_rows` must be a multiple of every format's
    `row_multiple`; by default it follows MAX_MEMORY.
    """
    rows, cols = int(shape[0]), int(shape[1])
    step = chunk_rows or aligned_chunk_rows(cols, formats)
    for fmt in formats:
        if step % fmt.row_multiple(cols):
            raise ValueError(f"chunk of {step} rows splits {fmt.name} blocks (rows must be a multiple of "
                             f"{fmt.row_multiple(cols)} for {cols} columns)")
    delta_sq = torch.zeros(rows, dtype=torch.float64)
    base_sq = torch.zeros(rows, dtype=torch.float64)
    sums = {fmt.name: torch.zeros(3, rows, dtype=torch.float64) for fmt in formats}
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        base = rows_of_base(start, stop)
        merged = rows_of_merged(start, stop)
        wide_base, wide_merged = base.to(torch.float64), merged.to(torch.float64)
        delta = rows_of_delta(start, stop).to(torch.float64) if rows_of_delta else wide_merged - wide_base
        delta_sq[start:stop] = delta.square().sum(dim=1)
        base_sq[start:stop] = wide_base.square().sum(dim=1)
        for fmt in formats:
            quantized_merged = fmt.roundtrip(merged).to(torch.float64)
            change = quantized_merged - fmt.roundtrip(base).to(torch.float64)
            out = sums[fmt.name]
            out[0, start:stop] = (change * delta).sum(dim=1)
            out[1, start:stop] = change.square().sum(dim=1)
            out[2, start:stop] = (quantized_merged - wide_merged).square().sum(dim=1)
    total_delta, total_base = float(delta_sq.sum()), float(base_sq.sum())
    return {name: Figures(total_delta, total_base, float(s[0].sum()), float(s[1].sum()), float(s[2].sum()))
            for name, s in sums.items()}
