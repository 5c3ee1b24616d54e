"""Sign conflicts among the entries TIES keeps, streamed over row chunks: the one dense part of `merge inspect`.

TIES at density d keeps, of each τᵢ, exactly kᵢ = ⌊d · numel⌋ largest magnitudes (ties at the threshold: lower
flat index first, SEMANTICS §3). The kept set here is the engine's own: the same τᵢ rows (`TensorDeltas`), the
same exact selection (`kth_largest_magnitudes`) and the same `Trimmer`, so the counts are of exactly the
entries a TIES merge would see. uᵢ = wᵢ · trimmed τᵢ, as TIES weighs them before the sign vote.

Counted per tensor: positions where at least two uᵢ are non-zero (overlapping), those among them whose
non-zero uᵢ do not all share a sign (conflicting), per pair the same two counts, and the kept entries whose
sign differs from the elected one (γ = sign Σuᵢ, +1 at 0), which TIES' disjoint merge drops.

When a tensor's τᵢ fit in the memory budget they are built once (the fused low-rank kernel, a fixed rank
order) into one cache that the selection and the counting read, as the engine caches them for TIES; each
chunk's counts are one histogram of sign patterns, and the histograms add up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..engine.select import Mapper, Trimmer, kth_largest_magnitudes
from ..errors import MergeConfigError
from ..methods.sparsifying import kept_count

ChunkSource = Callable[[], Iterable[torch.Tensor]]


@dataclass
class ConflictCounts:
    """Counts over one tensor (or a sum over many): T adapters, in the order their updates were given."""

    adapters: int
    #: positions where ≥ 2 of the uᵢ are non-zero
    overlapping: int = 0
    #: of those, positions holding both a positive and a negative uᵢ
    conflicting: int = 0
    #: non-zero kept entries, all adapters together
    kept: int = 0
    #: kept entries whose sign differs from the elected γ (dropped by the disjoint merge)
    dropped: int = 0
    #: entries the counts looked at (per adapter): numel, or the sampled entries
    entries: int = 0
    #: per pair (i, j): positions where both are non-zero, and where their signs differ
    pair_both: list[list[int]] = field(default_factory=list)
    pair_opposite: list[list[int]] = field(default_factory=list)
    #: positions by how many uᵢ are non-zero there (index m = 0..T)
    multiplicity: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pair_both:
            self.pair_both = [[0] * self.adapters for _ in range(self.adapters)]
            self.pair_opposite = [[0] * self.adapters for _ in range(self.adapters)]
        if not self.multiplicity:
            self.multiplicity = [0] * (self.adapters + 1)

    @property
    def rate(self) -> float | None:
        """conflicting / overlapping; None when no position is kept by two adapters."""
        return self.conflicting / self.overlapping if self.overlapping else None

    @property
    def dropped_share(self) -> float | None:
        """dropped / kept: the share of kept entries the sign election throws away."""
        return self.dropped / self.kept if self.kept else None

    @property
    def independent_rate(self) -> float | None:
        """The rate independent, fair signs would give on the same kept positions: a position kept by m
        adapters holds both signs with probability 1 − 2^(1−m). The reference the measured rate is read against."""
        if not self.overlapping:
            return None
        expected = sum(count * (1 - 2.0 ** (1 - m)) for m, count in enumerate(self.multiplicity) if m >= 2)
        return expected / self.overlapping

    def pair_rate(self, i: int, j: int) -> float | None:
        """Opposite signs among the positions both adapters keep; None when they share none."""
        both = self.pair_both[i][j]
        return self.pair_opposite[i][j] / both if both else None

    def add(self, other: ConflictCounts, positions: Sequence[int] | None = None) -> None:
        """Add `other` (over adapters `positions` of this one; default the same adapters)."""
        where = list(positions) if positions is not None else list(range(self.adapters))
        self.overlapping += other.overlapping
        self.conflicting += other.conflicting
        self.kept += other.kept
        self.dropped += other.dropped
        self.entries += other.entries
        for m, count in enumerate(other.multiplicity):
            self.multiplicity[m] += count
        for a, i in enumerate(where):
            for b, j in enumerate(where):
                self.pair_both[i][j] += other.pair_both[a][b]
                self.pair_opposite[i][j] += other.pair_opposite[a][b]


#: the sign-pattern histogram has 3^(T+1) bins; more adapters than this are counted directly, pass by pass
MAX_PATTERN_ADAPTERS = 10
#: with this many adapters or fewer the pattern codes fit in a byte (3^5 = 243 bins), and torch counts bytes faster
BYTE_PATTERN_ADAPTERS = 4


def count_chunk(updates: Sequence[torch.Tensor], counts: ConflictCounts) -> None:
    """Add one chunk's counts to `counts`; `updates` are the weighted, trimmed uᵢ of the same positions."""
    if len(updates) > MAX_PATTERN_ADAPTERS:
        count_chunk_directly(updates, counts)
        return
    add_pattern_histogram(pattern_histogram(updates).cpu(), len(updates), counts)


def pattern_histogram(updates: Sequence[torch.Tensor]) -> torch.Tensor:
    """How many positions of the chunk show each sign pattern (≤ MAX_PATTERN_ADAPTERS updates), by pattern.

    A position's pattern is one integer: base-3 digits (−, 0, +) of the elected sign γ = sign Σuᵢ (digit 0)
    and of each uᵢ (digit i + 1). The chunk becomes one histogram in a dozen float passes instead of dozens of
    boolean reductions; every count then follows from the histogram exactly (`add_pattern_histogram`), and
    histograms of chunks simply add up.
    """
    flat = [u.reshape(-1) for u in updates]
    code = flat[0] + flat[1] if len(flat) > 1 else flat[0].clone()
    for u in flat[2:]:
        code.add_(u)  # the vote, summed in the order TIES sums it
    # float arithmetic, exact for these small integers: Σ sign·3^digit, centred on 0 (the pattern minus `centre`)
    torch.sign(code, out=code)
    digit = torch.empty_like(code)
    for position, u in enumerate(flat):
        code.add_(torch.sign(u, out=digit), alpha=3 ** (position + 1))
    bins, centre = 3 ** (len(flat) + 1), (3 ** (len(flat) + 1) - 1) // 2
    if len(flat) > BYTE_PATTERN_ADAPTERS:
        return torch.bincount(code.to(torch.int32).add_(centre), minlength=bins)
    # |code| ≤ 121 fits a signed byte, and its bytes counted as unsigned (−c lands in bin 256 − c) skip the slow
    # float-to-unsigned conversion and the offset pass
    counted = torch.bincount(code.to(torch.int8).view(torch.uint8), minlength=256)
    return torch.cat([counted[256 - centre:], counted[:centre + 1]])


def add_pattern_histogram(histogram: torch.Tensor, adapters: int, counts: ConflictCounts) -> None:
    """Add the counts a sign-pattern histogram stands for (see `pattern_histogram`)."""
    for pattern in torch.nonzero(histogram).reshape(-1).tolist():
        number = int(histogram[pattern])
        elected_negative = pattern % 3 == 0  # γ = +1 where the vote is 0, as TIES elects
        digits = [(pattern // 3 ** (i + 1)) % 3 for i in range(adapters)]
        positive = [d == 2 for d in digits]
        negative = [d == 0 for d in digits]
        kept = sum(positive) + sum(negative)
        counts.entries += number
        counts.multiplicity[kept] += number
        counts.kept += number * kept
        counts.dropped += number * (sum(positive) if elected_negative else sum(negative))
        if kept >= 2:
            counts.overlapping += number
            if any(positive) and any(negative):
                counts.conflicting += number
        for i in range(adapters):
            for j in range(adapters):
                if i != j and digits[i] != 1 and digits[j] != 1:
                    counts.pair_both[i][j] += number
                    if digits[i] != digits[j]:
                        counts.pair_opposite[i][j] += number


def count_chunk_directly(updates: Sequence[torch.Tensor], counts: ConflictCounts) -> None:
    """`count_chunk` pass by pass with boolean masks (for many adapters, and as the tests' second opinion)."""
    positive = [u > 0 for u in updates]
    negative = [u < 0 for u in updates]
    n_positive = torch.stack(positive).sum(0, dtype=torch.int16)
    n_negative = torch.stack(negative).sum(0, dtype=torch.int16)
    n_kept = n_positive + n_negative
    counts.overlapping += int((n_kept >= 2).sum())
    for m, count in enumerate(torch.bincount(n_kept.reshape(-1).to(torch.int64), minlength=len(updates) + 1).tolist()):
        counts.multiplicity[m] += count
    counts.conflicting += int(((n_positive > 0) & (n_negative > 0)).sum())
    vote = updates[0].clone()
    for u in updates[1:]:
        vote.add_(u)
    elected_negative = vote < 0  # γ = +1 where the vote is 0, as TIES elects
    for pos, neg in zip(positive, negative):
        counts.kept += int(pos.sum()) + int(neg.sum())
        counts.dropped += int((pos & elected_negative).sum()) + int((neg & ~elected_negative).sum())
    counts.entries += updates[0].numel()
    for i in range(len(updates)):
        for j in range(i + 1, len(updates)):
            both = int(((positive[i] | negative[i]) & (positive[j] | negative[j])).sum())
            opposite = int(((positive[i] & negative[j]) | (negative[i] & positive[j])).sum())
            counts.pair_both[i][j] += both
            counts.pair_both[j][i] += both
            counts.pair_opposite[i][j] += opposite
            counts.pair_opposite[j][i] += opposite


def trimmers(sources: Sequence[ChunkSource], densities: Sequence[float], numel: int, where: str,
             mapper: Mapper = map) -> list[Trimmer | None]:
    """The engine's exact TIES trim of each τᵢ at its density (None: density 1, everything kept).

    `sources[i]()` yields τᵢ's chunks in flat order, `numel` entries in all; a density that keeps no entry
    is the same config error `merge run` gives, naming the tensor. `mapper` (a thread pool's map) runs the
    selection passes over chunks side by side: give it only chunks that already exist (a cache's slices).
    """
    ks: dict[int, int] = {}
    for index, density in enumerate(densities):
        if density >= 1.0:
            continue
        k = kept_count(density, numel)
        if k == 0:
            raise MergeConfigError(f"{where}: density {density} keeps 0 of its {numel} entries; raise the density "
                                   f"to at least {1 / numel:.3g}")
        ks[index] = k
    found = kth_largest_magnitudes({i: sources[i] for i in ks}, ks, numel=numel, mapper=mapper) if ks else {}
    return [Trimmer(found[i], sources[i]) if i in found else None for i in range(len(sources))]


class TauCache:
    """One float32 buffer on a device for every τᵢ of a tensor, grown to the largest tensor and reused: fresh
    pages would fault on every tensor (as the engine's τ cache)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None

    def take(self, count: int, numel: int) -> torch.Tensor:
        """A count × numel view of the buffer (its contents undefined)."""
        if self._buffer is None or self._buffer.numel() < count * numel:
            self._buffer = None  # drop the smaller one first, so both never coexist
            self._buffer = torch.empty(count * numel, dtype=torch.float32, device=self.device)
        return self._buffer[:count * numel].view(count, numel)


#: builds τ rows [start, stop) of the given adapters as (stop − start) × cols tensors, into `out` when given
RowsBuilder = Callable[[Sequence[int], int, int, Sequence[torch.Tensor] | None], list[torch.Tensor]]


def conflict_counts(build: RowsBuilder, adapters: Sequence[int], ranges: Sequence[tuple[int, int]], cols: int,
                    weights: Sequence[float], densities: Sequence[float], where: str, *,
                    cache: TauCache | None = None, mapper: Mapper = map) -> ConflictCounts:
    """The sign-conflict counts of one tensor over the row `ranges`: the TIES selection of each τᵢ, then one
    counting pass; `weights` and `densities` are those of `adapters`, in order.

    With a `cache`, every τᵢ chunk is built once into its buffer (T × entries float32: the caller checks its
    memory budget, as the engine does for TIES) and the selection and counting passes read slices of it, all
    chunks side by side through `mapper`. Without, each pass rebuilds τᵢ chunk by chunk: the selection one
    adapter per `mapper` task, the counting one row range per task. The counts are the same either way.
    """
    starts, flat = [], 0
    for start, stop in ranges:
        starts.append(flat)
        flat += (stop - start) * cols
    numel, count = flat, len(adapters)
    if cache is not None:
        buffer = cache.take(count, numel)
        chunks = [[buffer[position, first:first + (stop - start) * cols].view(stop - start, cols)
                   for position in range(count)] for first, (start, stop) in zip(starts, ranges)]
        list(mapper(lambda k: build(adapters, *ranges[k], chunks[k]), range(len(ranges))))

        def cached(position: int) -> ChunkSource:
            return lambda: (chunks_k[position] for chunks_k in chunks)

        trims = trimmers([cached(position) for position in range(count)], densities, numel, where, mapper)
        histograms = mapper(lambda k: _histogram(chunks[k], trims, weights, starts[k]), range(len(ranges)))
    else:
        def rebuilt(position: int) -> ChunkSource:
            return lambda: (build([adapters[position]], start, stop, None)[0] for start, stop in ranges)

        def select(position: int) -> Trimmer | None:
            return trimmers([rebuilt(position)], [densities[position]], numel, where)[0]

        trims = list(mapper(select, range(count)))
        histograms = mapper(lambda k: _histogram(build(adapters, *ranges[k], None), trims, weights, starts[k]),
                            range(len(ranges)))
    counts = ConflictCounts(count)
    if count > MAX_PATTERN_ADAPTERS:
        for part in histograms:
            counts.add(part)
        return counts
    total = None
    for part in histograms:
        total = part if total is None else total + part
    if total is not None:
        add_pattern_histogram(total.cpu(), count, counts)
    return counts


def _histogram(taus: Sequence[torch.Tensor], trims: Sequence[Trimmer | None], weights: Sequence[float],
               flat_start: int) -> torch.Tensor | ConflictCounts:
    """One chunk's sign-pattern histogram (or, beyond MAX_PATTERN_ADAPTERS, its counts) of uᵢ = wᵢ · trim(τᵢ)."""
    updates = []
    for tau, trim, weight in zip(taus, trims, weights):
        kept = trim.trim(tau, flat_start) if trim is not None else tau
        if weight != 1.0:
            kept = kept.mul_(float(weight)) if trim is not None else kept * float(weight)
        updates.append(kept)
    if len(updates) > MAX_PATTERN_ADAPTERS:
        counts = ConflictCounts(len(updates))
        count_chunk_directly(updates, counts)
        return counts
    return pattern_histogram(updates)

