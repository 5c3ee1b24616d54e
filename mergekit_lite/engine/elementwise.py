"""Streaming one tensor through an elementwise method: sparsify each τᵢ, weight it, combine (SEMANTICS §3–§5).

TIES-style trimming needs each τᵢ's exact k-th largest magnitude before any chunk can be merged, so
`prepare` runs the selection passes; DARE needs no pass: its keep-mask is a pure function of the flat index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeConfigError
from ..methods import ElementwisePhase, MergeMethod
from ..methods._common import kept_count, kept_scale
from ..methods.gradients import evaluate, layer_count, layer_position
from . import kernels
from .finite import all_finite
from .plan import MergePlan
from .rng import UniformStream, stream_key
from .select import Mapper, Trimmer, kth_largest_magnitudes

#: the C kernels an elementwise method may declare (ElementwisePhase.kernel)
KERNELS = {"sum": kernels.SUM, "ties": kernels.TIES}


def check_densities(plan: MergePlan, method: MergeMethod, adapter_params: Sequence[Mapping[str, Any]]) -> None:
    """A density that keeps 0 entries of a tensor an adapter touches is a config error naming the tensor."""
    if method.sparsification is None:
        return
    n_layers = layer_count(t.name for t in plan.tensors)
    for tensor in plan.tensors:
        numel = max(tensor.info.rows * max(tensor.info.cols, 1), 1)
        for index, items in enumerate(tensor.by_adapter):
            density = evaluate(adapter_params[index]["density"], tensor.name, layer_position(tensor.name, n_layers))
            if items and density is not None and kept_count(density, numel) == 0:
                raise MergeConfigError(
                    f"adapters[{index}] ('{plan.adapters[index].label}'): density {density} keeps 0 of the {numel} "
                    f"entries of tensor '{tensor.name}'; raise the density to at least {1 / numel:.3g}"
                )


class SparseTensorMerge:
    """The per-tensor state of a sparsifying method: trim thresholds, DARE streams, weights."""

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
    ) -> None:
        assert isinstance(method.phase, ElementwisePhase)
        self.method = method
        self.phase = method.phase
        self.tensor_name = tensor_name
        self.numel = numel
        self.active = list(active)
        self.weights = weights
        self.global_params = global_params
        self.adapter_params = adapter_params
        self.seed = seed
        self.trimmers: dict[int, Trimmer] = {}
        self.streams = {i: UniformStream(stream_key(seed, i, tensor_name)) for i in self.active}

    def needs_selection(self, index: int) -> bool:
        """True when adapter `index` must be trimmed (magnitude sparsification with density < 1)."""
        return self.method.sparsification == "magnitude" and self.adapter_params[index]["density"] < 1.0

    def prepare(self, index: int, chunks: Callable[[], Iterable[torch.Tensor]], mapper: Mapper = map) -> None:
        """Selection passes over τᵢ's chunks: the exact trim threshold of adapter `index`."""
        self.prepare_many({index: chunks}, mapper)

    def prepare_many(self, sources: Mapping[int, Callable[[], Iterable[torch.Tensor]]], mapper: Mapper = map) -> None:
        """`prepare` for several adapters at once, their passes side by side (chunks must already exist)."""
        ks = {index: kept_count(self.adapter_params[index]["density"], self.numel) for index in sources}
        for index, threshold in kth_largest_magnitudes(sources, ks, numel=self.numel, mapper=mapper).items():
            self.trimmers[index] = Trimmer(threshold, sources[index])

    def chunks_independent(self) -> bool:
        """True when chunks may be merged in any order (every trimmer counted its split ties up front)."""
        return all(trimmer.order_free for trimmer in self.trimmers.values())

    def merged_rows(self, base_rows: torch.Tensor, taus: Mapping[int, torch.Tensor], flat_start: int,
                    out_dtype: torch.dtype, compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
        """W + the merged delta of one chunk, cast to `out_dtype`, and whether all of it is finite.

        `base_rows` is W as read (the fused kernels take float32 and bfloat16 rows as they are; otherwise they
        are widened to `compute_dtype` here). The τᵢ chunks are consumed (they may be changed in place). One
        fused pass when the kernels apply, else the torch steps of `merge_chunk`, then a cast and a check.
        """
        kind = KERNELS.get(self.phase.kernel)  # type: ignore[arg-type]
        chunks = [taus[i] for i in self.active]
        if (kind is None or len(chunks) > kernels.MAX_TAUS or not kernels.rows_usable(base_rows, out_dtype)
                or not kernels.usable(*chunks)):
            merged = base_rows.to(compute_dtype).add_(self.merge_chunk(taus, flat_start).reshape(base_rows.shape))
            out = merged.to(out_dtype)
            return out, all_finite(out)
        below = []
        for index, tau in zip(self.active, chunks):
            trimmer = self.trimmers.get(index)
            cut = -1.0  # the kernel keeps |τ| > cut (all of τ when negative)
            if trimmer is not None:
                whole = trimmer.chunk_below(flat_start)  # every tie of this chunk kept or every one dropped
                if whole is None:
                    cut = trimmer.below
                    trimmer.drop_extra_ties(tau, tau, flat_start)
                else:
                    cut = whole
            elif self.method.sparsification == "dare":
                self._apply_keep(index, tau, flat_start)
            below.append(cut)
        scale = [self._scale(index) for index in self.active]
        params = self.global_params
        out = kernels.output_rows(base_rows, out_dtype)
        not_finite = kernels.consensus_into(
            kind, base_rows, chunks, below, scale, [abs(self.weights[i]) for i in self.active], out=out,
            sign_count=params.get("sign") == "count", normalize=bool(params.get("normalize", False)),
            lam=params["lambda"],
        )
        return out, not_finite == 0

    def merge_chunk(self, taus: Mapping[int, torch.Tensor], flat_start: int) -> torch.Tensor:
        """The merged delta for one chunk; τᵢ chunks must arrive in row order, starting at `flat_start`."""
        updates = []
        for index in self.active:
            tau, scale = taus[index], self._scale(index)
            fresh = False  # True once `tau` is a new tensor this loop owns (then scaled in place)
            if index in self.trimmers:
                tau, fresh = self.trimmers[index].trim(tau, flat_start), True
            elif self.method.sparsification == "dare":
                tau, fresh = self._apply_keep(index, tau.clone(memory_format=torch.contiguous_format), flat_start), True
            updates.append((tau if scale == 1 else tau.mul_(scale)) if fresh else tau * scale)
        active_weights = [self.weights[i] for i in self.active]
        return self.phase.combine(updates, active_weights, self.global_params)

    def _scale(self, index: int) -> float:
        """What adapter `index`'s kept entries are multiplied by: wᵢ, or wᵢ / density for rescaled DARE."""
        return kept_scale(self.weights[index], self.adapter_params[index], self.method.sparsification)

    def _apply_keep(self, index: int, tau: torch.Tensor, flat_start: int) -> torch.Tensor:
        """τᵢ's chunk starting at `flat_start` times DARE's keep-mask (1 kept, 0 dropped), in place; returns it."""
        return self.streams[index].apply_keep(tau, self.adapter_params[index]["density"], flat_start)
