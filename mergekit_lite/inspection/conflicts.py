"""Sign conflicts among the entries TIES keeps, streamed over row chunks: the one dense part of `merge inspect`.

TIES at density d keeps, of each τᵢ, exactly kᵢ = ⌊d · numel⌋ largest magnitudes (ties at the threshold: lower
flat index first, SEMANTICS §3). The kept set here is the engine's own: the same τᵢ rows (`TensorDeltas`), the
same exact selection (`kth_largest_magnitudes`) and the same `Trimmer`, so the counts are of exactly the
entries a TIES merge would see. uᵢ = wᵢ · trimmed τᵢ, as TIES weighs them before the sign vote.

Counted per tensor: positions where at least two uᵢ are non-zero (overlapping), those among them whose
non-zero uᵢ do not all share a sign (conflicting), per pair the same two counts, and the kept entries whose
sign differs from the elected one (γ = sign Σuᵢ, +1 at 0), which TIES' disjoint merge drops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..engine.select import Trimmer, kth_largest_magnitudes
from ..errors import MergeConfigError
from ..methods._common import kept_count

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


#: the sign-pattern histogram has 2·3^T bins; more adapters than this are counted directly, pass by pass
MAX_PATTERN_ADAPTERS = 10


def count_chunk(updates: Sequence[torch.Tensor], counts: ConflictCounts) -> None:
    """Add one chunk's counts to `counts`; `updates` are the weighted, trimmed uᵢ of the same positions.

    Each position is encoded as one integer, its sign pattern (a base-3 digit per adapter: −, 0, +) and whether
    the elected sign is negative, and the chunk becomes one histogram: a handful of passes over the chunk
    instead of dozens of boolean reductions. Every count then follows from the histogram exactly.
    """
    if len(updates) > MAX_PATTERN_ADAPTERS:
        count_chunk_directly(updates, counts)
        return
    vote = updates[0].reshape(-1).clone()
    for u in updates[1:]:
        vote.add_(u.reshape(-1))
    # float arithmetic, exact for these small integers: Σ sign(uᵢ)·3^i + (3^T − 1)/2 = Σ (sign(uᵢ) + 1)·3^i
    code = (vote < 0).to(vote.dtype).mul_(3 ** len(updates))  # γ = +1 where the vote is 0, as TIES elects
    for digit, u in enumerate(updates):
        code.add_(torch.sign(u.reshape(-1)), alpha=3**digit)
    code.add_((3 ** len(updates) - 1) / 2)
    histogram = torch.bincount(code.to(torch.int32), minlength=2 * 3 ** len(updates))
    add_pattern_histogram(histogram.cpu(), len(updates), counts)


def add_pattern_histogram(histogram: torch.Tensor, adapters: int, counts: ConflictCounts) -> None:
    """Add the counts a sign-pattern histogram stands for (see `count_chunk`)."""
    for pattern in torch.nonzero(histogram).reshape(-1).tolist():
        number = int(histogram[pattern])
        digits = [(pattern // 3**i) % 3 for i in range(adapters)]
        elected_negative = pattern // 3**adapters == 1
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


def trimmers(sources: Sequence[ChunkSource], densities: Sequence[float], numel: int, where: str
             ) -> list[Trimmer | None]:
    """The engine's exact TIES trim of each τᵢ at its density (None: density 1, everything kept).

    `sources[i]()` yields τᵢ's chunks in flat order, `numel` entries in all; a density that keeps no entry
    is the same config error `merge run` gives, naming the tensor.
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
    found = kth_largest_magnitudes({i: sources[i] for i in ks}, ks, numel=numel) if ks else {}
    return [Trimmer(found[i], sources[i]) if i in found else None for i in range(len(sources))]


def conflict_counts(sources: Sequence[ChunkSource], weights: Sequence[float], densities: Sequence[float],
                    numel: int, where: str) -> ConflictCounts:
    """The sign-conflict counts of one tensor: selection passes over each τᵢ, then one counting pass.

    The chunks of all sources must line up (same row ranges, in order); each source is called afresh per pass.
    """
    trims = trimmers(sources, densities, numel, where)
    counts = ConflictCounts(len(sources))
    flat_start = 0
    for chunks in zip(*(source() for source in sources)):
        updates = []
        for tau, trim, weight in zip(chunks, trims, weights):
            kept = trim.trim(tau, flat_start) if trim is not None else tau
            updates.append(kept * float(weight))
        count_chunk(updates, counts)
        flat_start += chunks[0].numel()
    return counts
