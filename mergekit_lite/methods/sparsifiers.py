"""How an elementwise method thins each task vector τᵢ before weighting it: a strategy the method's phase carries.

A sparsifier says what it needs before any chunk can be cut (`ranks`: exact top-k sets by magnitude, from the
engine's selection passes; none for the random ones), how it cuts one chunk (`cut`: torch, a new tensor; or
`cut_in_place`: τ changed in place plus the magnitude cut the fused C kernel applies, |τ| > cut), and what the
kept entries are multiplied by (`scale`). The engine asks these questions and never compares names; a new
sparsifier is one class here (SEMANTICS §3, §5).

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

    #: the name shown on cards and by `method.sparsification`
    name = "none"
    #: True when the cut ranks entries within each row (the engine then keeps a 1-D tensor in one chunk)
    whole_rows = False
    #: True when the cut draws from the counter-based uniforms (the engine gives each adapter its stream)
    random = False

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


class Dare(Sparsifier):
    """DARE: a counter-based Bernoulli(densityᵢ) keep-mask; kept entries × 1/densityᵢ (`rescale`)."""

    name = "dare"
    random = True

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


def dropped_count(gamma: float, density: float, numel: int) -> int:
    """Breadcrumbs' gᵢ = ⌊gammaᵢ · numel⌋ largest magnitudes dropped (the same forgiving floor as kᵢ), at most
    numel − kᵢ so that kᵢ entries remain below them."""
    return min(kept_count(gamma, numel) if gamma > 0 else 0, numel - kept_count(density, numel))


class Breadcrumbs(Sparsifier):
    """Model Breadcrumbs: drop the gᵢ largest magnitudes (outliers) and keep the next kᵢ; the rest is zeroed.

    Two exact top sets: "keep" (the gᵢ + kᵢ largest) and "drop" (the gᵢ largest); kept = keep \\ drop. The cut
    trims to "keep" first, then zeroes "drop" (in that order: both may tie at one magnitude)."""

    name = "breadcrumbs"

    def ranks(self, own: Mapping[str, Any], numel: int) -> dict[str, int]:
        drop = dropped_count(own["gamma"], own["density"], numel)
        keep = drop + kept_count(own["density"], numel)
        return {**({"keep": keep} if keep < numel else {}), **({"drop": drop} if drop > 0 else {})}

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        keep, drop = cut.tops.get("keep"), cut.tops.get("drop")
        if keep is None and drop is None:
            return None
        out = keep.trim(tau, flat_start) if keep is not None else tau.clone(memory_format=torch.contiguous_format)
        if drop is not None:
            drop.drop_kept(out, flat_start)
        return out

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        keep, drop = cut.tops.get("keep"), cut.tops.get("drop")
        below = -1.0 if keep is None else keep.kernel_cut(tau, flat_start)
        if drop is not None:
            drop.drop_kept(tau, flat_start)
        return below


class MagPrune(Sparsifier):
    """DELLA's MagPrune: within each row, the entry of magnitude rank d (0 = largest; equal magnitudes: lower flat
    index first) of n is kept with probability qᵢ(d) = densityᵢ + εᵢ − 2εᵢ·d/(n − 1) (densityᵢ for n = 1), when
    its uniform u < q; kept entries × 1/q (`rescale`). Rows are whole in every chunk, so no selection pass."""

    name = "magprune"
    whole_rows = True
    random = True

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        out = tau.clone(memory_format=torch.contiguous_format)
        self._apply(out, flat_start, cut)
        return out

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        self._apply(tau, flat_start, cut)
        return -1.0

    @staticmethod
    def _apply(tau: torch.Tensor, flat_start: int, cut: Cut) -> None:
        assert cut.stream is not None and tau.is_contiguous()
        count = tau.numel()
        if count == 0:
            return
        length = cut.row_length
        rows = tau.view(-1, length)
        q = keep_probabilities(rows, cut.own["density"], cut.own["epsilon"])
        u = cut.stream.uniforms(flat_start, count).view(rows.shape).to(torch.float64)
        kept = rows.to(torch.float64) / q if cut.own["rescale"] else rows.to(torch.float64)
        rows.copy_(torch.where(u.to(rows.device) < q, kept, torch.zeros_like(kept)))


def keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """qᵢ per entry (float64, rows' shape): linear in the magnitude rank within the row, from density + ε (the
    largest) down to density − ε (the smallest); a stable sort gives equal magnitudes lower flat index first."""
    length = rows.shape[1]
    if length == 1 or epsilon == 0.0:
        return torch.full(rows.shape, float(density), dtype=torch.float64, device=rows.device)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=rows.device).expand_as(order).contiguous())
    return (density + epsilon) - (2.0 * epsilon / (length - 1)) * rank.to(torch.float64)


NONE, MAGNITUDE, DARE, BREADCRUMBS, MAGPRUNE = Sparsifier(), Magnitude(), Dare(), Breadcrumbs(), MagPrune()


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
