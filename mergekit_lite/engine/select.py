"""Exact k-th largest magnitude of a tensor seen one chunk at a time (the TIES trim threshold).

On CPU the fast path samples: a strided sample of |τ| (every s-th flat entry, a near-free pass) brackets the
k-th value in a narrow band with a wide safety margin; one pass then counts the entries above the band and
gathers the band itself, where numpy's introselect finds the exact value. When the sample's k-th value fills
the whole band (quantized τ: a bf16 fine-tune's τ takes few distinct values, and a fifth of the entries may tie
at the threshold), the pass counts the entries above it and equal to it per chunk instead of gathering: the
exact threshold when the k-th value is that one, with the ties per chunk for the trim. When the band misses (a
pathological distribution) or is too crowded, or on CUDA, a radix select over the float32 bit patterns
(non-negative floats order like their bits) is the exact fallback: a histogram of the top 16 bits, then
the one bin holding the k-th value. Nothing is sorted whole. With the tie rule of SEMANTICS §3 (lower flat
index first) the kept set is exactly k entries, whatever the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels

Mapper = Callable[..., Iterable[Any]]
BINS = 1 << 16
BAND_LIMIT = 1 << 22
#: entries in the strided sample that brackets the k-th value
SAMPLE = 1 << 18
#: safety margin of the band around the sample's estimate, in binomial standard deviations
MARGIN_SIGMAS = 8.0
MARGIN_ENTRIES = 16


class Lazy:
    """A chunk that a pass builds when it reaches it, in the thread that runs the pass: a pool can then take a
    whole pass's chunks at once (τ rebuilt chunk by chunk, never all held), each worker building its own."""

    __slots__ = ("build", "size", "factors")

    def __init__(self, build: Callable[[], torch.Tensor], size: int,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.build = build
        self.size = size
        #: (left rows, right) when the chunk is the low-rank product left @ right and kernels.per_tile takes them: the
        #: sample and band passes then compute its entries from the factors instead of building it
        self.factors = factors

    def numel(self) -> int:
        """Entries the chunk will have."""
        return self.size


def _tensor(chunk: torch.Tensor | Lazy) -> torch.Tensor:
    """The chunk itself, built when lazy."""
    return chunk.build() if isinstance(chunk, Lazy) else chunk


def _factors(chunk: torch.Tensor | Lazy) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The chunk's low-rank factors, or None (build the chunk). The engine attaches factors only where the per-tile
    kernels take them (kernels.per_tile, checked once per tensor)."""
    return chunk.factors if isinstance(chunk, Lazy) else None


@dataclass(frozen=True)
class Threshold:
    """Keep |τ| bits > `bits`, and the first `equal_keep` (flat order) of the `equal_total` entries equal to it."""

    bits: int
    equal_keep: int
    equal_total: int
    #: entries equal to the threshold in each chunk, in order, when the selection saw them (the sampled band)
    chunk_ties: tuple[int, ...] | None = None

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
    chunks: Callable[[], Iterable[torch.Tensor]], k: int, band_limit: int = BAND_LIMIT, numel: int | None = None,
    mapper: Mapper = map,
) -> Threshold:
    """Exact threshold for keeping the k largest |τ| entries; `chunks()` yields τ row chunks in order.

    `numel` (the entries `chunks()` yields in all) lets the sample pass know its stride; without it a
    counting pass runs first. `mapper` (e.g. a thread pool's map) runs the passes over chunks side by
    side; give it only chunks that already exist (it may take them all at once).
    """
    return kth_largest_magnitudes({0: chunks}, {0: k}, band_limit, numel, mapper)[0]


def kth_largest_magnitudes(
    sources: Mapping[int, Callable[[], Iterable[torch.Tensor]]], ks: Mapping[int, int], band_limit: int = BAND_LIMIT,
    numel: int | None = None, mapper: Mapper = map,
) -> dict[int, Threshold]:
    """`kth_largest_magnitude` of several task vectors of one tensor (same shape) at once.

    Each pass runs over every (task vector, chunk) pair through `mapper`, so a thread pool stays busy
    across task vectors instead of waiting on one task vector's serial steps.
    """
    totals = {}
    for index, k in ks.items():
        totals[index] = numel if numel is not None else sum(chunk.numel() for chunk in sources[index]())
        if k <= 0:
            raise ValueError("k must be positive")
        if k > totals[index]:
            raise ValueError(f"k={k} exceeds the {totals[index]} entries")
    found = _sampled_band(sources, ks, totals, band_limit, mapper) or {}
    return {index: found.get(index) or _radix_select(sources[index], k, totals[index], band_limit)
            for index, k in ks.items()}


def _magnitudes(chunk: torch.Tensor) -> np.ndarray:
    """|x| of a CPU chunk as a flat float32 numpy array (a fresh buffer)."""
    return chunk.reshape(-1).to(torch.float32).abs().numpy()


@dataclass
class _Band:
    """One task vector's sampled-band selection in progress."""

    k: int
    total: int
    stride: int
    high: np.floating | float = math.inf  # the sample's order statistics (float32)
    low: np.floating | float = 0.0
    found: Threshold | None = None


def _chunks_of(sources: Mapping[int, Callable[[], Iterable[torch.Tensor]]], indices: Iterable[int]
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(task vector, flat start, chunk) for every chunk of the given task vectors, in order, one at a time."""
    for index in indices:
        start = 0
        for chunk in sources[index]():
            yield index, start, chunk
            start += chunk.numel()


def _sampled_band(sources: Mapping[int, Callable[[], Iterable[torch.Tensor]]], ks: Mapping[int, int],
                  totals: Mapping[int, int], band_limit: int, mapper: Mapper = map) -> dict[int, Threshold | None]:
    """Exact thresholds via sampled bands; None for a task vector whose band misses or overflows, or on CUDA.

    Three passes, each over all (task vector, chunk) pairs through `mapper`: a strided sample of |τ|, which
    brackets the k-th value in a band; one pass counting the entries above the band and gathering the band;
    then an exact select inside each band. With the builtin `map` the chunks are taken one at a time, so
    chunks built on demand are never all held at once.
    """
    bands: dict[int, _Band] = {}
    for index, k in ks.items():
        first = next(iter(sources[index]()), None)
        tiled = None if first is None else _factors(first)
        if tiled is not None:  # a low-rank chunk on the CPU: its row length without building it
            bands[index] = _Band(k, totals[index], _sample_stride(totals[index], tiled[1].shape[1]))
            continue
        first = None if first is None else _tensor(first)
        if first is not None and first.device.type == "cpu":
            bands[index] = _Band(k, totals[index], _sample_stride(totals[index], first.shape[-1] if first.dim() > 1 else 1))

    # each band's sample lands in one buffer made before the pass: parts kept alive across the pass (one per
    # chunk) would split the heap's free chunk-sized blocks and make the heap grow chunk after chunk
    buffers = {index: np.empty(-(-band.total // band.stride), dtype=np.float32) for index, band in bands.items()}

    transposed: dict[int, torch.Tensor] = {}  # rightᵀ of each low-rank task vector, for its sample

    def sample(item: tuple[int, int, torch.Tensor | Lazy]) -> tuple[int, bool]:
        index, start, lazy = item
        stride = bands[index].stride
        first = (-start) % stride
        slot = (start + first) // stride
        tiled = _factors(lazy)
        if tiled is not None:  # the sampled entries alone, each a rank-long sum, instead of the whole product
            right_t = transposed.get(index)
            if right_t is None:  # made once per task vector (two threads may both make it: the same values)
                right_t = transposed[index] = tiled[1].t().contiguous()
            part = kernels.lowrank_sample(tiled, first, stride, right_t)
            buffers[index][slot:slot + len(part)] = part
            return index, True
        chunk = _tensor(lazy)
        if chunk.device.type != "cpu":
            return index, False
        part = chunk.reshape(-1)[first::stride]
        buffers[index][slot:slot + part.numel()] = part.to(torch.float32).abs().numpy()
        return index, True

    on_cpu = dict.fromkeys(bands, True)
    for index, ok in mapper(sample, _chunks_of(sources, list(bands))):
        on_cpu[index] = on_cpu[index] and ok
    bands = {index: band for index, band in bands.items() if on_cpu[index]}
    list(mapper(lambda index: _bracket(bands[index], buffers[index]), list(bands)))

    def in_band(item: tuple[int, int, torch.Tensor]) -> tuple[int, int, np.ndarray | int | None]:
        index, _, lazy = item
        band = bands[index]
        tiled = _factors(lazy)
        if tiled is not None:  # τ built tile by tile inside the kernel, never in memory
            if band.high == band.low:
                return index, *kernels.lowrank_band_counts(tiled, float(band.high), float(band.low))
            return index, *kernels.lowrank_band(tiled, float(band.high), float(band.low), band_limit)
        chunk = _tensor(lazy)
        if band.high == band.low:  # one value: count the entries equal to it instead of gathering them
            if kernels.usable(chunk):
                return index, *kernels.band_counts(chunk, float(band.high), float(band.low))
            values = _magnitudes(chunk)
            return index, int(np.count_nonzero(values > band.high)), int(np.count_nonzero(values == band.high))
        if kernels.usable(chunk):  # one pass instead of abs, three compares, a count and a gather
            return index, *kernels.band(chunk, float(band.high), float(band.low), band_limit)
        values = _magnitudes(chunk)
        return index, int(np.count_nonzero(values > band.high)), values[(values >= band.low) & (values <= band.high)]

    above = dict.fromkeys(bands, 0)
    gathered: dict[int, list[np.ndarray] | None] = {index: [] for index in bands}
    #: single-value bands (the sample's k-th value ties across the whole margin, as in quantized τ from bf16
    #: fine-tunes): the entries equal to it, per chunk, counted instead of gathered
    equal: dict[int, list[int]] = {index: [] for index, band in bands.items() if band.high == band.low}
    pending = [index for index, band in bands.items() if band.found is None]
    for index, count, inside in mapper(in_band, _chunks_of(sources, pending)):
        above[index] += count
        if index in equal:
            equal[index].append(inside)  # type: ignore[arg-type]
            continue
        parts = gathered[index]
        if parts is None:
            continue
        if inside is None or sum(map(len, parts)) + len(inside) > band_limit:
            gathered[index] = None  # too crowded to gather: the exact fallback takes over
            continue
        parts.append(inside)
    result: dict[int, Threshold | None] = {}
    for index, band in bands.items():
        parts = gathered[index]
        if band.found is not None or parts is None:
            result[index] = band.found
            continue
        if index in equal:
            result[index] = _single_value(band, above[index], equal[index])
            continue
        values = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
        inside_band = above[index] < band.k <= above[index] + len(values)
        found = _select_in(values, band.k, above[index]) if inside_band else None
        if found is not None and found.equal_keep != found.equal_total:  # the band holds every tie: count them
            kth = np.int32(found.bits).view(np.float32)
            found = replace(found, chunk_ties=tuple(int(np.count_nonzero(part == kth)) for part in parts))
        result[index] = found
    return result


def _single_value(band: _Band, above: int, equal: list[int]) -> Threshold | None:
    """The threshold when the band is one value v: `above` entries exceed v and `equal[c]` equal it in chunk c;
    None when the k-th largest is not v (the exact fallback takes over)."""
    ties = sum(equal)
    if not above < band.k <= above + ties:
        return None
    found = Threshold(bits=int(np.float32(band.high).view(np.int32)), equal_keep=band.k - above, equal_total=ties)
    return replace(found, chunk_ties=tuple(equal)) if found.equal_keep != found.equal_total else found


def _bracket(band: _Band, sample: np.ndarray) -> None:
    """Set the band's bounds from its sample (or select directly when the sample is everything)."""
    if band.stride == 1:
        band.found = _select_in(sample, band.k, above=0)
        return
    size = len(sample)
    expected = band.k / band.total * size  # rank of the k-th value within the sample, from the top
    spread = MARGIN_SIGMAS * math.sqrt(max(expected * (1 - band.k / band.total), 1.0)) + MARGIN_ENTRIES
    high_rank, low_rank = math.floor(expected - spread), math.ceil(expected + spread)
    band.high = np.float32(np.inf) if high_rank < 1 else _rank_from_top(sample, high_rank)
    band.low = np.float32(0.0) if low_rank > size else _rank_from_top(sample, low_rank)


def _sample_stride(total: int, row: int) -> int:
    """About total / SAMPLE, and sharing no factor with the row length, so the sample visits every column.

    A low-rank τ = BA has columns of very different scale; a stride dividing the row length would sample a
    few columns only and bracket the wrong band.
    """
    stride = max(1, total // SAMPLE)
    if stride == 1:
        return 1
    stride |= 1
    while math.gcd(stride, row) != 1:
        stride += 2
    return stride


def _rank_from_top(values: np.ndarray, rank: int) -> np.float32:
    """The rank-th largest of `values` (1-based), by introselect on a copy."""
    position = len(values) - rank
    return np.partition(values, position)[position]


def _select_in(values: np.ndarray, k: int, above: int) -> Threshold:
    """The threshold when `values` holds the k-th largest entry and `above` entries lie above all of it."""
    kth = _rank_from_top(values, k - above)
    greater = above + int(np.count_nonzero(values > kth))
    equal_total = int(np.count_nonzero(values == kth))
    return Threshold(bits=int(np.float32(kth).view(np.int32)), equal_keep=k - greater, equal_total=equal_total)


def _radix_select(chunks: Callable[[], Iterable[torch.Tensor]], k: int, total: int, band_limit: int) -> Threshold:
    """The exact fallback: histogram the top 16 bits, then resolve the k-th value inside its bin.

    Pass 2 gathers the entries of that one bin (a narrow band, ≤ 2⁻⁷ relative width) and selects inside
    it; when the bin is too crowded to gather (many equal magnitudes), pass 2 histograms its low 16 bits.
    """
    high_hist: torch.Tensor | None = None
    for chunk in map(_tensor, chunks()):
        counts = torch.bincount(magnitude_bits(chunk) >> 16, minlength=BINS)
        high_hist = counts if high_hist is None else high_hist + counts
    assert high_hist is not None
    high_bin, above_high = _locate(high_hist, k)
    rank = k - above_high  # 1-based rank of the k-th value inside its bin, from the top
    if int(high_hist[high_bin].item()) <= band_limit:
        band = [_in_bin(magnitude_bits(chunk), high_bin).cpu().numpy().view(np.float32) for chunk in map(_tensor, chunks())]
        return _select_in(np.concatenate(band), k, above_high)
    low_hist: torch.Tensor | None = None
    for chunk in map(_tensor, chunks()):
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
    """Applies a Threshold chunk by chunk, with the lower-flat-index rule for entries equal to it.

    When the threshold splits a tie (some equal entries kept, some dropped), each chunk must know how many
    ties come before it. Given `chunks` (the same chunks, in order), the counts are taken up front, so the
    chunks may then be trimmed in any order (side by side); without it, chunks must come in row order.
    """

    def __init__(self, threshold: Threshold, chunks: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
        self.threshold = threshold
        value = np.float32(threshold.value)
        #: the largest float32 below the threshold: |x| > below ⟺ |x| ≥ threshold, exactly
        self._below = float(np.nextafter(value, np.float32(0.0))) if value > 0 else -1.0
        self._equal_seen = 0
        #: flat start of each chunk -> (ties in the chunks before it, ties in it), when counted up front
        self._ties: dict[int, tuple[int, int]] | None = None
        if self.splits_ties and chunks is not None:
            self._ties, seen, start = {}, 0, 0
            counts = iter(threshold.chunk_ties) if threshold.chunk_ties is not None else None
            for chunk in chunks():
                inside = next(counts) if counts is not None else len(self._tie_positions(_tensor(chunk)))
                self._ties[start] = (seen, inside)
                seen += inside
                start += chunk.numel()

    @property
    def below(self) -> float:
        """Entries with |x| > below are kept (before the tie rule); negative when everything is kept."""
        return self._below

    @property
    def splits_ties(self) -> bool:
        """True when some entries equal to the threshold are kept and others dropped."""
        return self.threshold.equal_keep != self.threshold.equal_total

    @property
    def order_free(self) -> bool:
        """True when chunks may be trimmed in any order."""
        return not self.splits_ties or self._ties is not None

    def chunk_below(self, flat_start: int) -> float | None:
        """The `below` that trims the chunk at `flat_start` exactly without looking for its ties, or None when the
        chunk holds the split (some of its ties kept, some dropped: `drop_extra_ties`). Needs the tie counts taken
        up front. A chunk whose ties are all kept uses `below`; one whose ties are all dropped keeps |x| > the
        threshold itself."""
        if not self.splits_ties:
            return self._below
        if self._ties is None:
            return None
        seen, inside = self._ties[flat_start]
        if seen + inside <= self.threshold.equal_keep:
            return self._below
        if seen >= self.threshold.equal_keep:
            return float(np.float32(self.threshold.value))
        return None

    def trim(self, chunk: torch.Tensor, flat_start: int = 0) -> torch.Tensor:
        """τ with the entries outside the kept set zeroed (a new tensor); `flat_start` is the chunk's first
        flat index (chunks in row order when the tie counts were not taken up front).

        One float op (hardshrink keeps x where |x| > λ) instead of a mask built from boolean or
        sign arithmetic; a threshold of 0 keeps everything but the ties beyond the kept count.
        """
        trimmed = F.hardshrink(chunk, self._below) if self._below >= 0 else chunk.clone()
        if self.splits_ties:
            self.drop_extra_ties(chunk, trimmed, flat_start)
        return trimmed

    def kernel_cut(self, chunk: torch.Tensor, flat_start: int = 0) -> float:
        """The cut c for the fused kernel (it keeps |x| > c): the whole-chunk `chunk_below` when the chunk holds
        no split tie, else `below` after the ties beyond the kept count are zeroed in `chunk` itself."""
        whole = self.chunk_below(flat_start)
        if whole is not None:
            return whole
        self.drop_extra_ties(chunk, chunk, flat_start)
        return self._below

    def drop_kept(self, chunk: torch.Tensor, flat_start: int = 0) -> None:
        """Zero, in place, the chunk's entries inside the kept set (|x| above the threshold, and the first
        `equal_keep` ties in flat order): what Breadcrumbs drops. Needs the tie counts taken up front when
        the threshold splits a tie. Entries outside the set are left as they are."""
        flat = chunk.view(-1)
        value = float(np.float32(self.threshold.value))
        flat.masked_fill_(flat.abs() > value, 0.0)
        if self.threshold.equal_keep == 0 or value == 0.0:  # no tie kept, or the ties are zeros already
            return
        take = self.threshold.equal_keep
        if self.splits_ties:
            assert self._ties is not None, "drop_kept needs the tie counts taken up front"
            take -= self._ties[flat_start][0]
        if take > 0:
            flat[self._tie_positions(chunk)[:take]] = 0.0

    def drop_extra_ties(self, chunk: torch.Tensor, out: torch.Tensor, flat_start: int) -> None:
        """Zero, in `out` (may be `chunk` itself), the entries equal to the threshold beyond the first
        `equal_keep` in flat order."""
        seen, inside = self._ties[flat_start] if self._ties is not None else (self._equal_seen, None)
        if seen >= self.threshold.equal_total or (inside is not None and seen + inside <= self.threshold.equal_keep):
            return  # this chunk's ties are all kept, or it has none
        ties = self._tie_positions(chunk)
        take = max(0, min(len(ties), self.threshold.equal_keep - seen))
        out.view(-1)[ties[take:]] = 0.0
        self._equal_seen = seen + len(ties)  # only read when chunks come in row order

    def _tie_positions(self, chunk: torch.Tensor) -> torch.Tensor:
        """Flat positions in the chunk of the entries whose magnitude equals the threshold."""
        if chunk.device.type == "cpu":  # numpy: torch's boolean kernels are slow on CPU
            bits = chunk.reshape(-1).to(torch.float32).abs().numpy().view(np.int32)
            return torch.from_numpy(np.flatnonzero(bits == self.threshold.bits))
        return torch.nonzero(magnitude_bits(chunk) == self.threshold.bits).reshape(-1)
