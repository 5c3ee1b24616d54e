"""How an elementwise method thins each task vector τᵢ before weighting it: a strategy the method's phase carries.

A sparsifier says what it needs before any chunk can be cut (`ranks`: exact top-k sets by magnitude, from the
engine's selection passes; none for the random ones), how it cuts one chunk (`cut`: torch, a new tensor; or
`cut_in_place`: τ changed in place plus the magnitude cut the fused C kernel applies, |τ| > cut), and what the
kept entries are multiplied by (`scale`). The engine asks these questions and never compares names; a new
sparsifier is one class, in its method's file (breadcrumbs.py, della.py), or here when several methods share it
(TIES' trim, DARE's keep-mask) (SEMANTICS §3, §5).

The same strategy runs on dense matrices (core space, KnOTS' representations) with `DenseTop` for the top-k
sets; the engine passes its streaming `Trimmer`s, which keep the same sets chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import MergeConfigError
from ..randomness import FusedKeep, UniformStream

#: relative slack for ⌊density · numel⌋: the float product of a decimal density may fall an ulp or two short
KEPT_COUNT_SLACK = 2.0**-50


def kept_count(density: float, numel: int) -> int:
    """kᵢ = ⌊density · numel⌋, forgiving the float product's last bits (0.29 of 100 keeps 29, where the binary
    product 28.999… would keep 28); density 1 keeps everything."""
    if density >= 1.0:
        return numel
    return min(numel, math.floor(density * numel * (1.0 + KEPT_COUNT_SLACK)))


class TopSet(Protocol):
    """The exact set of one τᵢ's k largest magnitudes (equal magnitudes: lower flat index first), chunk by chunk."""

    def trim(self, chunk: torch.Tensor, flat_start: int = 0) -> torch.Tensor:
        """A new tensor: the chunk with every entry outside the set zeroed."""
        ...

    def drop_kept(self, chunk: torch.Tensor, flat_start: int = 0) -> None:
        """Zero, in place, every entry of the chunk inside the set."""
        ...

    def kernel_cut(self, chunk: torch.Tensor, flat_start: int = 0) -> float:
        """Zero in place what a magnitude cut cannot tell apart (ties beyond the set), and return the cut c:
        the entries with |x| > c are then exactly the set's entries of the chunk."""
        ...

    def chunk_below(self, flat_start: int) -> float | None:
        """The cut c with |x| > c exactly the set's entries of the chunk at `flat_start`, without looking at the
        chunk, or None when the chunk must be seen (it holds a split tie)."""
        ...


@dataclass
class Cut:
    """What one adapter's sparsifier may use on one tensor: its parameters, its top-k sets (named as `ranks`
    named them), its uniforms, the row length (per-row ranks), and the fused keep kernel when the engine has one."""

    own: Mapping[str, Any]
    tops: Mapping[str, TopSet] = field(default_factory=dict)
    stream: UniformStream | None = None
    #: entries per row: chunks hold whole rows (a 1-D tensor is one row)
    row_length: int = 1
    fused_keep: FusedKeep | None = None


class Sparsifier:
    """No thinning: τᵢ as it is (the base of the strategies below)."""

    #: what `method.sparsification` reports (for display and the callers' own checks; the engine never reads it)
    name = "none"
    #: True when the cut ranks entries within each row (the engine then keeps a 1-D tensor in one chunk)
    whole_rows = False

    def ranks(self, own: Mapping[str, Any], numel: int) -> dict[str, int]:
        """The exact top-k sets the cut needs, by name: {} when no selection pass is needed."""
        return {}

    def scale(self, weight: float, own: Mapping[str, Any]) -> float:
        """What the kept entries are multiplied by (uᵢ = scale · cut τᵢ)."""
        return float(weight)

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        """The cut chunk as a new tensor, or None when the chunk is kept as it is (τ is never changed)."""
        return None

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        """Cut τ in place where a magnitude cut cannot, and return the kernel's cut (negative: keep all)."""
        return -1.0

    @property
    def cuts_unseen(self) -> bool:
        """True when `cut_unseen` answers without τ (bar the odd chunk holding a split tie): the engine then merges
        low-rank τᵢ per tile; otherwise it materialises τᵢ (cached when they fit) for the cut to see."""
        return type(self).cut_unseen is not Sparsifier.cut_unseen or type(self).cut_in_place is Sparsifier.cut_in_place

    def cut_unseen(self, flat_start: int, cut: Cut) -> float | None:
        """The kernel's cut for a chunk whose τ is never built (the per-tile kernels compute τ from its factors),
        or None when this chunk's cut must see or change τ (the caller then builds it and asks `cut_in_place`).
        The base strategy keeps all; a subclass that cuts in place answers None unless it says otherwise."""
        return -1.0 if type(self).cut_in_place is Sparsifier.cut_in_place else None


class Magnitude(Sparsifier):
    """TIES' trim: keep each τᵢ's kᵢ = ⌊densityᵢ · numel⌋ largest magnitudes (exact; ties: lower flat index)."""

    name = "magnitude"

    def ranks(self, own: Mapping[str, Any], numel: int) -> dict[str, int]:
        return {"keep": kept_count(own["density"], numel)} if own["density"] < 1.0 else {}

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        keep = cut.tops.get("keep")
        return None if keep is None else keep.trim(tau, flat_start)

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        keep = cut.tops.get("keep")
        return -1.0 if keep is None else keep.kernel_cut(tau, flat_start)

    def cut_unseen(self, flat_start: int, cut: Cut) -> float | None:
        keep = cut.tops.get("keep")
        return -1.0 if keep is None else keep.chunk_below(flat_start)


class Dare(Sparsifier):
    """DARE: a counter-based Bernoulli(densityᵢ) keep-mask; kept entries × 1/densityᵢ (`rescale`)."""

    name = "dare"

    def scale(self, weight: float, own: Mapping[str, Any]) -> float:
        return float(weight) / own["density"] if own["rescale"] else float(weight)

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        return self._keep(tau.clone(memory_format=torch.contiguous_format), flat_start, cut)

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        self._keep(tau, flat_start, cut)
        return -1.0

    @staticmethod
    def _keep(tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor:
        assert cut.stream is not None
        return cut.stream.apply_keep(tau, cut.own["density"], flat_start, cut.fused_keep)


NONE, MAGNITUDE, DARE = Sparsifier(), Magnitude(), Dare()


class DenseTop:
    """A TopSet of a whole dense tensor (small matrices: core space, KnOTS), by kthvalue and the tie rule."""

    def __init__(self, x: torch.Tensor, k: int) -> None:
        numel = x.numel()
        self.shape = x.shape
        magnitude = x.reshape(-1).abs()
        self.keep = torch.ones(numel, dtype=torch.bool, device=x.device)
        if k < numel:
            threshold = torch.kthvalue(magnitude, numel - k + 1).values  # the k-th largest |x|
            self.keep = magnitude > threshold
            missing = k - int(self.keep.sum())
            if missing > 0:  # entries equal to the threshold: the lower flat indices first
                self.keep[torch.nonzero(magnitude == threshold).reshape(-1)[:missing]] = True

    def trim(self, chunk: torch.Tensor, flat_start: int = 0) -> torch.Tensor:
        flat = chunk.reshape(-1)
        if bool(self.keep.all()):
            return chunk.clone()
        return torch.where(self.keep, flat, torch.zeros_like(flat)).reshape(chunk.shape)

    def drop_kept(self, chunk: torch.Tensor, flat_start: int = 0) -> None:
        chunk.view(-1)[self.keep] = 0.0

    def kernel_cut(self, chunk: torch.Tensor, flat_start: int = 0) -> float:
        raise NotImplementedError("dense top sets run on the torch path only")

    def chunk_below(self, flat_start: int) -> float | None:
        return None  # a position set, not a magnitude cut


def dense_cut(sparsifier: Sparsifier, x: torch.Tensor, own: Mapping[str, Any], stream: UniformStream | None,
              where: str) -> torch.Tensor:
    """`sparsifier` on one whole dense tensor (flat index 0 first): the cut tensor, `x` itself when uncut."""
    ranks = sparsifier.ranks(own, x.numel())
    if ranks and kept_count(own["density"], x.numel()) == 0:
        raise MergeConfigError(f"{where}: density {own['density']} keeps 0 of its {x.numel()} entries; raise the "
                               f"density to at least {1 / x.numel():.3g}")
    tops = {name: DenseTop(x, k) for name, k in ranks.items()}
    row_length = x.shape[-1] if x.dim() > 1 else max(x.numel(), 1)
    out = sparsifier.cut(x, 0, Cut(own, tops, stream, row_length))
    return x if out is None else out
