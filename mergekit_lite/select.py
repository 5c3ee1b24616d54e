"""Exact k-th largest magnitude of a tensor seen one chunk at a time (the TIES trim threshold).

A radix select over the float32 bit patterns of |τ| (non-negative floats order like their bits): one pass
histograms the top 16 bits, a second the low 16 bits inside the one bin that holds the k-th value. Memory
is two 65,536-bin histograms plus one chunk; nothing is sorted. With the tie rule of SEMANTICS §3 (lower
flat index first) the kept set is exactly k entries, whatever the chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

BINS = 1 << 16


@dataclass(frozen=True)
class Threshold:
    """Keep |τ| bits > `bits`, and the first `equal_keep` entries (flat order) whose bits equal `bits`."""

    bits: int
    equal_keep: int

    @property
    def value(self) -> float:
        """The k-th largest magnitude as a float."""
        return float(torch.tensor([self.bits], dtype=torch.int32).view(torch.float32).item())


def magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    """|x| of a float32 chunk as int32 bit patterns, flattened (row-major)."""
    return chunk.reshape(-1).to(torch.float32).abs().view(torch.int32)


def _locate(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in higher bins."""
    from_top = torch.flip(histogram, [0]).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)).item())
    above = int(from_top[position - 1].item()) if position > 0 else 0
    return BINS - 1 - position, above


def kth_largest_magnitude(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """Exact threshold for keeping the k largest |τ| entries; `chunks()` yields τ row chunks in order."""
    if k <= 0:
        raise ValueError("k must be positive")
    high_hist: torch.Tensor | None = None
    for chunk in chunks():
        bits = magnitude_bits(chunk)
        counts = torch.bincount(bits >> 16, minlength=BINS)
        high_hist = counts if high_hist is None else high_hist + counts
    assert high_hist is not None
    total = int(high_hist.sum().item())
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} entries")
    high_bin, above_high = _locate(high_hist, k)
    low_hist: torch.Tensor | None = None
    for chunk in chunks():
        bits = magnitude_bits(chunk)
        inside = bits[(bits >> 16) == high_bin] & 0xFFFF
        counts = torch.bincount(inside, minlength=BINS)
        low_hist = counts if low_hist is None else low_hist + counts
    assert low_hist is not None
    low_bin, above_low = _locate(low_hist, k - above_high)
    return Threshold(bits=(high_bin << 16) | low_bin, equal_keep=k - above_high - above_low)


class Trimmer:
    """Applies a Threshold chunk by chunk in flat order, counting ties across chunks."""

    def __init__(self, threshold: Threshold) -> None:
        self.threshold = threshold
        self._equal_seen = 0

    def keep(self, chunk: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask of the chunk's shape; call once per chunk, in row order."""
        bits = magnitude_bits(chunk)
        equal = bits == self.threshold.bits
        rank = torch.cumsum(equal, 0) - 1 + self._equal_seen
        self._equal_seen += int(equal.sum().item())
        mask = (bits > self.threshold.bits) | (equal & (rank < self.threshold.equal_keep))
        return mask.reshape(chunk.shape)
