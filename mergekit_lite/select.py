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


BAND_LIMIT = 1 << 22


@dataclass(frozen=True)
class Threshold:
    """Keep |τ| bits > `bits`, and the first `equal_keep` (flat order) of the `equal_total` entries equal to it."""

    bits: int
    equal_keep: int
    equal_total: int

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


def kth_largest_magnitude(
    chunks: Callable[[], Iterable[torch.Tensor]], k: int, band_limit: int = BAND_LIMIT
) -> Threshold:
    """Exact threshold for keeping the k largest |τ| entries; `chunks()` yields τ row chunks in order.

    Pass 1 histograms the top 16 bits. Pass 2 gathers the entries of the one bin that holds the k-th value
    (a narrow band, ≤ 2⁻⁷ relative width) and selects inside it; when that bin is too crowded to gather
    (many equal magnitudes), pass 2 histograms its low 16 bits instead. Both are exact.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    high_hist: torch.Tensor | None = None
    for chunk in chunks():
        counts = torch.bincount(magnitude_bits(chunk) >> 16, minlength=BINS)
        high_hist = counts if high_hist is None else high_hist + counts
    assert high_hist is not None
    total = int(high_hist.sum().item())
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} entries")
    high_bin, above_high = _locate(high_hist, k)
    rank = k - above_high  # 1-based rank of the k-th value inside its bin, from the top
    if int(high_hist[high_bin].item()) <= band_limit:
        band = []
        for chunk in chunks():
            band.append(_in_bin(magnitude_bits(chunk), high_bin))
        values = torch.cat(band)
        kth = int(torch.sort(values, descending=True).values[rank - 1].item())
        greater = above_high + int((values > kth).sum().item())
        equal_total = int((values == kth).sum().item())
        return Threshold(bits=kth, equal_keep=k - greater, equal_total=equal_total)
    low_hist: torch.Tensor | None = None
    for chunk in chunks():
        bits = magnitude_bits(chunk)
        counts = torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=BINS)
        low_hist = counts if low_hist is None else low_hist + counts
    assert low_hist is not None
    low_bin, above_low = _locate(low_hist, rank)
    return Threshold(
        bits=(high_bin << 16) | low_bin,
        equal_keep=rank - above_low,
        equal_total=int(low_hist[low_bin].item()),
    )


def _in_bin(bits: torch.Tensor, high_bin: int) -> torch.Tensor:
    """The entries whose top 16 bits are `high_bin` (numpy on the CPU: torch's boolean kernels are slow)."""
    if bits.device.type == "cpu":
        values = bits.numpy()
        return torch.from_numpy(values[(values >> 16) == high_bin])
    return bits[(bits >> 16) == high_bin]


class Trimmer:
    """Applies a Threshold chunk by chunk in flat order, counting ties across chunks."""

    def __init__(self, threshold: Threshold) -> None:
        self.threshold = threshold
        self._value = threshold.value
        self._equal_seen = 0

    def keep(self, chunk: torch.Tensor) -> torch.Tensor:
        """A 0/1 float keep-mask of the chunk's shape; call once per chunk, in row order.

        Float arithmetic, not boolean tensors (whose CPU kernels are many times slower here):
        sign(|x| − v) + 1, clamped to 1, is 1 where |x| ≥ v and 0 below (exact: x − v = 0 only if x = v).
        """
        mask = (chunk.abs() - self._value).sign_().add_(1.0).clamp_(max=1.0)
        if self.threshold.equal_keep == self.threshold.equal_total:  # every tie is kept
            return mask
        ties = torch.nonzero(magnitude_bits(chunk) == self.threshold.bits).reshape(-1)
        take = max(0, min(ties.numel(), self.threshold.equal_keep - self._equal_seen))
        mask.view(-1)[ties[take:]] = 0.0  # ties beyond the first equal_keep (flat order) are dropped
        self._equal_seen += ties.numel()
        return mask
