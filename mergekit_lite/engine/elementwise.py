"""Streaming one tensor through an elementwise method: sparsify each τᵢ, weight it, combine (SEMANTICS §3–§5).

How τᵢ is thinned is the method's sparsifier (methods/sparsifiers.py): `prepare` runs the exact selection passes
for the top-k sets it asks for (TIES' trim threshold, Breadcrumbs' two), the random ones draw from the
counter-based streams; the engine only answers the strategy's questions, it never looks at its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from ..methods import ElementwisePhase, MergeMethod
from ..methods.gradients import evaluate, layer_count, layer_position
from ..methods.sparsifiers import NONE, Cut, kept_count
from ..randomness import UniformStream, stream_key
from . import kernels
from .finite import all_finite
from .plan import MergePlan
from .select import Mapper, Trimmer, kth_largest_magnitudes

#: the C kernels an elementwise method may declare (ElementwisePhase.kernel)
KERNELS = {"sum": kernels.SUM, "ties": kernels.TIES}


def check_densities(plan: MergePlan, method: MergeMethod, adapter_params: Sequence[Mapping[str, Any]]) -> None:
    """A density that keeps 0 entries of a tensor an adapter touches is a config error naming the tensor."""
    if method.phase.sparsifier is None:
        return
    n_layers = layer_count(t.name for t in plan.tensors)
    for tensor in plan.tensors:
        numel = max(tensor.info.rows * max(tensor.info.cols, 1), 1)
        for index, items in enumerate(tensor.by_adapter):
            if adapter_params[index].get("density") is None:  # a sparsifier that takes no density
                continue
            density = evaluate(adapter_params[index]["density"], tensor.name, layer_position(tensor.name, n_layers))
            if items and density is not None and kept_count(density, numel) == 0:
                raise MergeConfigError(
                    f"adapters[{index}] ('{plan.adapters[index].label}'): density {density} keeps 0 of the {numel} "
                    f"entries of tensor '{tensor.name}'; raise the density to at least {1 / numel:.3g}"
                )


def row_length(shape: Sequence[int] | None, numel: int) -> int:
    """Entries per row for the per-row sparsifiers: the product of the trailing dims; a 1-D tensor is one row."""
    if shape is None or len(shape) < 2:
        return max(numel, 1)
    length = 1
    for size in shape[1:]:
        length *= size
    return max(length, 1)


class SparseTensorMerge:
    """The per-tensor state of a sparsifying method: the top-k sets its sparsifier asked for, streams, weights."""

    def __init__(
        self,
        method: MergeMethod,
        tensor_name: str,
        numel: int,
        active: Sequence[int],
        weights: Sequence[float],
        global_params: Mapping[str, Any],
        adapter_params: Sequence[Mapping[str, Any]],
        seed: int,
        shape: Sequence[int] | None = None,
    ) -> None:
        assert isinstance(method.phase, ElementwisePhase)
        self.method = method
        self.phase = method.phase
        self.sparsifier = method.phase.sparsifier or NONE
        self.tensor_name = tensor_name
        self.numel = numel
        self.active = list(active)
        self.weights = weights
        self.global_params = global_params
        self.adapter_params = adapter_params
        self.seed = seed
        #: (adapter, the sparsifier's name for the set) -> the exact top-k set, chunk by chunk
        self.trimmers: dict[tuple[int, str], Trimmer] = {}
        fused = kernels.fused_keep()
        self.cuts = {
            i: Cut(adapter_params[i], {}, UniformStream(stream_key(seed, i, tensor_name)),
                   row_length(shape, numel), fused)
            for i in self.active
        }

    def needs_selection(self, index: int) -> bool:
        """True when adapter `index`'s sparsifier needs exact top-k sets (selection passes) on this tensor."""
        return bool(self.sparsifier.ranks(self.adapter_params[index], self.numel))

    def prepare(self, index: int, chunks: Callable[[], Iterable[torch.Tensor]], mapper: Mapper = map) -> None:
        """Selection passes over τᵢ's chunks: the exact top-k sets adapter `index` needs."""
        self.prepare_many({index: chunks}, mapper)

    def prepare_many(self, sources: Mapping[int, Callable[[], Iterable[torch.Tensor]]], mapper: Mapper = map) -> None:
        """`prepare` for several adapters at once, their passes side by side (chunks must already exist)."""
        keyed, ks = {}, {}
        for index, chunks in sources.items():
            for name, k in self.sparsifier.ranks(self.adapter_params[index], self.numel).items():
                keyed[(index, name)], ks[(index, name)] = chunks, k
        for key, threshold in kth_largest_magnitudes(keyed, ks, numel=self.numel, mapper=mapper).items():
            self.trimmers[key] = trimmer = Trimmer(threshold, keyed[key])
            index, name = key
            self.cuts[index].tops = {**self.cuts[index].tops, name: trimmer}

    def chunks_independent(self) -> bool:
        """True when chunks may be merged in any order (every trimmer counted its split ties up front)."""
        return all(trimmer.order_free for trimmer in self.trimmers.values())

    def merged_rows(self, base_rows: torch.Tensor, taus: Mapping[int, torch.Tensor], flat_start: int,
                    out_dtype: torch.dtype, compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
        """W + the merged delta of one chunk, cast to `out_dtype`, and whether all of it is finite.

        `base_rows` is W as read (the fused kernels take float32 and bfloat16 rows as they are; otherwise they
        are widened to `compute_dtype` here). The τᵢ chunks are consumed (they may be changed in place). One
        fused pass when the kernels apply (each τᵢ cut in place first where a magnitude cut cannot say it), else
        the torch steps of `merge_chunk`, then a cast and a check.
        """
        kind = KERNELS.get(self.phase.kernel)  # type: ignore[arg-type]
        chunks = [taus[i] for i in self.active]
        if (kind is None or len(chunks) > kernels.MAX_TAUS or not kernels.rows_usable(base_rows, out_dtype)
                or not kernels.usable(*chunks)):
            merged = base_rows.to(compute_dtype).add_(self.merge_chunk(taus, flat_start).reshape(base_rows.shape))
            out = merged.to(out_dtype)
            return out, all_finite(out)
        below = [self.sparsifier.cut_in_place(tau, flat_start, self.cuts[index])  # the kernel keeps |τ| > below
                 for index, tau in zip(self.active, chunks)]
        scale = [self._scale(index) for index in self.active]
        params = self.global_params
        out = kernels.output_rows(base_rows, out_dtype)
        not_finite = kernels.consensus_into(
            kind, base_rows, chunks, below, scale, [abs(self.weights[i]) for i in self.active], out=out,
            sign_count=params.get("sign") == "count", normalize=bool(params.get("normalize", False)),
            lam=params["lambda"],
        )
        return out, not_finite == 0

    def tiled_cuts(self, flat_start: int) -> list[float] | None:
        """Every active adapter's kernel cut for the chunk at `flat_start` when none needs to see τ (`cut_unseen`)
        and the method has a fused kernel: the chunk can then merge from the factors (`merged_rows_tiled`)."""
        if KERNELS.get(self.phase.kernel) is None or len(self.active) > kernels.MAX_TAUS:  # type: ignore[arg-type]
            return None
        below = [self.sparsifier.cut_unseen(flat_start, self.cuts[index]) for index in self.active]
        return None if any(cut is None for cut in below) else below  # type: ignore[return-value]

    def merged_rows_tiled(self, base_rows: torch.Tensor, factors: Mapping[int, kernels.Factors], below: Sequence[float],
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """`merged_rows` for a chunk whose τᵢ are low-rank products (leftᵢ rows, rightᵢ), built tile by tile inside
        the fused kernel (never in memory): the same bytes. `below` from `tiled_cuts`; `base_rows` and `out_dtype`
        must pass kernels.rows_usable and the factors kernels.per_tile."""
        kind = KERNELS[self.phase.kernel]  # type: ignore[index]
        params = self.global_params
        out = kernels.output_rows(base_rows, out_dtype)
        not_finite = kernels.lowrank_consensus_into(
            kind, base_rows, [factors[i] for i in self.active], below, [self._scale(i) for i in self.active],
            [abs(self.weights[i]) for i in self.active], out=out, sign_count=params.get("sign") == "count",
            normalize=bool(params.get("normalize", False)), lam=params["lambda"],
        )
        return out, not_finite == 0

    def merge_chunk(self, taus: Mapping[int, torch.Tensor], flat_start: int) -> torch.Tensor:
        """The merged delta for one chunk; τᵢ chunks must arrive in row order, starting at `flat_start`."""
        updates = []
        for index in self.active:
            tau, scale = taus[index], self._scale(index)
            cut = self.sparsifier.cut(tau, flat_start, self.cuts[index])  # a new tensor this loop owns, or None
            if cut is None:
                updates.append(tau * scale)
            else:
                updates.append(cut if scale == 1 else cut.mul_(scale))
        active_weights = [self.weights[i] for i in self.active]
        return self.phase.combine(updates, active_weights, self.global_params)

    def _scale(self, index: int) -> float:
        """What adapter `index`'s kept entries are multiplied by (wᵢ, or wᵢ / density for rescaled DARE)."""
        return self.sparsifier.scale(self.weights[index], self.adapter_params[index])
