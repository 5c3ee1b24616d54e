"""The streaming loop: per base tensor, per row chunk, build τᵢ on the device, merge, cast, check, write.

Memory is bounded by one row chunk per tensor (plus the adapters' small factors), never by the model.
"""

from __future__ import annotations

import functools
import gc
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NonFiniteError
from ..formats.safetensors import TORCH_DTYPES, tensor_bytes
from ..methods import MergeMethod
from ..progress import Progress
from ..sources.checkpoint import COPY_BLOCK, BaseCheckpoint
from ..writers.checkpoint import ShardedWriter
from . import kernels
from .deltas import TensorDeltas, only_low_rank
from .elementwise import SparseTensorMerge, fusable
from .plan import MergePlan, TensorPlan
from .prefetch import Prefetcher

DEFAULT_MAX_MEMORY = 512 * 2**20
#: float32 buffers alive per element of a chunk besides the τᵢ: W, the merged delta, W + delta
WORKING_BUFFERS = 3
#: extra float32 buffers of a sparsifying method per element: the sign vote, the sum, the divisor
SPARSE_BUFFERS = 3


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs: where, in what chunks, and within what memory."""

    device: torch.device
    chunk_rows: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    compute_dtype: torch.dtype = torch.float32
    #: on CPU, chunks of this many elements (1 MiB of float32) stay in a core's L2 cache through the GEMM, the
    #: add, the cast and the check (whole-tensor chunks were 4-5x slower); sparse methods make even more passes
    cpu_chunk_elements: int = 1 << 18
    #: the fused kernels work through a chunk in cache-sized blocks themselves, so their chunks are larger:
    #: fewer calls, thread hand-offs and buffers per tensor (measured on the 492M benchmark: TIES ~25% faster)
    cpu_fused_chunk_elements: int = 1 << 20
    #: CPU threads that merge chunks side by side (each runs torch single-threaded); 1 on CUDA
    workers: int = field(default_factory=lambda: default_workers())


def default_workers() -> int:
    """One merge thread per core this process may use, up to 8 (beyond that the Python glue between torch
    calls dominates)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


@dataclass
class EngineStats:
    """What the engine did, for the summary and the MergeResult."""

    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    max_chunk_rows: int = 0


def rows_per_chunk(plan: TensorPlan, materialized: int, options: EngineOptions, fused_kernels: bool = False) -> int:
    """Rows per chunk: forced by --chunk-rows, or as many as fit the memory budget (at least one)."""
    rows = plan.info.rows
    if options.chunk_rows is not None:
        return max(1, min(options.chunk_rows, rows))
    cols = max(plan.info.cols, 1)
    per_row = cols * 4 * (WORKING_BUFFERS + materialized) + plan.info.row_bytes
    size = options.max_memory // per_row
    if options.device.type == "cpu":
        size = min(size, (options.cpu_fused_chunk_elements if fused_kernels else options.cpu_chunk_elements) // cols)
    return max(1, min(rows, size))


def chunk_ranges(rows: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering `rows` in steps of `size`."""
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


class MergeEngine:
    """Runs one merge plan through the method, writing every tensor in layout order."""

    def __init__(
        self,
        plan: MergePlan,
        base: BaseCheckpoint,
        method: MergeMethod,
        weights: Sequence[float],
        global_params: dict[str, Any],
        adapter_params: list[dict[str, Any]],
        seed: int,
        options: EngineOptions,
    ) -> None:
        self.plan = plan
        self.base = base
        self.method = method
        self.weights = list(weights)
        self.global_params = global_params
        self.adapter_params = adapter_params
        self.seed = seed
        self.options = options
        self.coefficients = method.coefficients(self.weights, global_params) if method.coefficients else None
        self._tau_buffer: torch.Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None

    def merges(self, tensor: TensorPlan) -> bool:
        """True when the method changes this tensor (an adapter touches it with a non-zero coefficient)."""
        return bool(self.active(tensor))

    def active(self, tensor: TensorPlan) -> list[int]:
        """Adapters that change this tensor: they touch it and their coefficient (or weight) is non-zero."""
        factors = self.coefficients if self.coefficients is not None else self.weights
        return [i for i, (items, c) in enumerate(zip(tensor.by_adapter, factors)) if items and c != 0]

    def run(self, writer: ShardedWriter, progress: Progress) -> EngineStats:
        """Merge or copy every base tensor into `writer`, reading ahead in a background thread.

        On CPU with more than one worker, chunks of a tensor are merged side by side in a thread pool (torch
        releases the GIL; each worker runs torch single-threaded) and written in order.
        """
        stats = EngineStats()
        collecting = gc.isenabled()
        gc.disable()  # the loop makes many short-lived objects and no cycles: collections would only cost time
        reads: Prefetcher[Any] = Prefetcher(self._reads())
        threads_before = torch.get_num_threads()
        if self._workers > 1:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="merge")
            torch.set_num_threads(1)
        try:
            for tensor in self.plan.tensors:
                writer.begin(tensor.name)
                if self.merges(tensor):
                    self._merge_tensor(tensor, reads, writer, progress, stats)
                    stats.tensors_merged += 1
                elif tensor.out_dtype == tensor.info.dtype:  # untouched: raw bytes, never decoded
                    for _ in range(0, tensor.info.nbytes, COPY_BLOCK):
                        block = reads.next()
                        writer.write(block)
                        progress.update(len(block))
                    stats.tensors_copied += 1
                else:
                    for _ in self._ranges(tensor):
                        self._emit(reads.next().to(TORCH_DTYPES[tensor.out_dtype]), writer, progress)
                    stats.tensors_copied += 1
        finally:
            reads.close()
            if collecting:
                gc.enable()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
                torch.set_num_threads(threads_before)
        stats.bytes_written = writer.bytes_written
        return stats

    def _materialized(self, tensor: TensorPlan) -> int:
        """float32 buffers per chunk element beyond the working ones: τᵢ and the consensus buffers (the fused
        kernels keep their consensus in registers and small blocks)."""
        if self.coefficients is not None or not self.merges(tensor):
            return 0
        return len(self.active(tensor)) + (0 if self._fused_sparse(tensor) else SPARSE_BUFFERS)

    def _caches_taus(self, tensor: TensorPlan) -> bool:
        """True when a trimming method builds every τᵢ of the tensor once (they fit half the budget)."""
        if self.method.sparsification != "magnitude" or not self.merges(tensor):
            return False
        active = self.active(tensor)
        if all(self.adapter_params[i]["density"] >= 1.0 for i in active):
            return False
        numel = tensor.info.rows * max(tensor.info.cols, 1)
        return numel * 4 * len(active) <= self.options.max_memory // 2

    def working_set_bytes(self, tensor: TensorPlan) -> int:
        """Memory the engine holds for one tensor at a time: a chunk's buffers plus any cached τᵢ."""
        if not self.merges(tensor):
            return 0
        materialized = self._materialized(tensor)
        rows = rows_per_chunk(tensor, materialized, self.options, self._fused_sparse(tensor))
        cols = max(tensor.info.cols, 1)
        chunk = rows * (cols * 4 * (WORKING_BUFFERS + materialized) + tensor.info.row_bytes)
        cached = tensor.info.rows * cols * 4 * len(self.active(tensor)) if self._caches_taus(tensor) else 0
        return chunk * self._chunks_in_flight() + cached

    @property
    def _workers(self) -> int:
        """Threads merging chunks side by side: the option on CPU, 1 on CUDA (the device does the work)."""
        return self.options.workers if self.options.device.type == "cpu" else 1

    def _chunks_in_flight(self) -> int:
        """Chunks merged at once: one per worker plus the one waiting to be written."""
        return self._workers + 1 if self._workers > 1 else 1

    def _ranges(self, tensor: TensorPlan) -> list[tuple[int, int]]:
        """The row chunks of a tensor: sized for the method's working set when merged, else for a cast."""
        return chunk_ranges(tensor.info.rows, rows_per_chunk(tensor, self._materialized(tensor), self.options,
                                                             self._fused_sparse(tensor)))

    def _fused_sparse(self, tensor: TensorPlan) -> bool:
        """True when a non-linear merge of this tensor goes through the fused CPU kernels (see sparse.fusable)."""
        return (self.coefficients is None and self.merges(tensor)
                and fusable(self.method, len(self.active(tensor)), self.options.device, self.options.compute_dtype))

    def _reads(self) -> Iterator[Callable[[], Any]]:
        """Every read of the run, in the order the loop consumes them."""
        for tensor in self.plan.tensors:
            name = tensor.name
            if not self.merges(tensor) and tensor.out_dtype == tensor.info.dtype:
                for offset in range(0, tensor.info.nbytes, COPY_BLOCK):
                    length = min(COPY_BLOCK, tensor.info.nbytes - offset)
                    yield functools.partial(self.base.read_bytes, name, offset, length)
            else:
                # on CPU the read-ahead thread also widens merged rows to the compute dtype, off the main thread
                # (the fused kernels read bfloat16 rows themselves)
                widen = (self.options.compute_dtype if self.merges(tensor) and self.options.device.type == "cpu"
                         and not self._raw_rows(tensor) else None)
                for start, stop in self._ranges(tensor):
                    yield functools.partial(self._read_rows, name, start, stop, widen)

    def _read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
        rows = self.base.read_rows(name, start, stop)
        return rows if dtype is None else rows.to(dtype)

    def _raw_rows(self, tensor: TensorPlan) -> bool:
        """True when the fused kernels take this tensor's base rows as read and write its output dtype."""
        return ((self._fused_sparse(tensor) or self._fused_linear(tensor))
                and TORCH_DTYPES[tensor.info.dtype] in kernels.ROW_TYPES and TORCH_DTYPES[tensor.out_dtype] in kernels.ROW_TYPES)

    def _fused_linear(self, tensor: TensorPlan) -> bool:
        """True when a linear merge of this tensor goes through the fused low-rank kernel (plain LoRA only)."""
        return (self.coefficients is not None and self.merges(tensor) and self.options.device.type == "cpu"
                and self.options.compute_dtype == torch.float32 and kernels.enabled()
                and only_low_rank(tensor, self.coefficients))

    def _merge_tensor(self, tensor: TensorPlan, reads: Prefetcher[Any], writer: ShardedWriter, progress: Progress,
                      stats: EngineStats) -> None:
        device, dtype = self.options.device, self.options.compute_dtype
        out_dtype = TORCH_DTYPES[tensor.out_dtype]
        deltas = TensorDeltas(tensor, self.plan.adapters, device, dtype)
        ranges = self._ranges(tensor)
        stats.max_chunk_rows = max(stats.max_chunk_rows, ranges[0][1] - ranges[0][0])
        row_elems = max(tensor.info.cols, 1)
        sparse, cached = None, None
        if self.coefficients is None:
            sparse, cached = self._prepare_sparse(tensor, deltas, ranges)

        def chunk(base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            """One merged chunk in the output dtype (a pure function of its rows: safe to run side by side)."""
            if sparse is None:
                out, finite = deltas.merged_rows(self.coefficients or [], base_rows, start, stop, out_dtype)
            else:
                if cached is not None:
                    taus = {i: tau[start:stop] for i, tau in cached.items()}
                else:
                    wide = base_rows.to(device, dtype) if any(deltas.needs_base(i) for i in sparse.active) else None
                    taus = self._taus(deltas, sparse.active, wide, start, stop)
                out, finite = sparse.merged_rows(base_rows, taus, start * row_elems, out_dtype, dtype)
            if not finite:
                raise NonFiniteError(
                    f"merged tensor '{tensor.name}' has inf/NaN after the cast to {tensor.out_dtype} "
                    f"(rows {start}-{stop}); lower the adapter weights or use a wider output dtype"
                )
            return out

        pool = self._pool if sparse is None or sparse.chunks_independent() else None
        pending: deque[Future[torch.Tensor]] = deque()
        raw = self._raw_rows(tensor)
        for start, stop in ranges:
            base_rows = reads.next() if raw else reads.next().to(device=device, dtype=dtype)
            if pool is None:
                self._emit(chunk(base_rows, start, stop), writer, progress)
                continue
            pending.append(pool.submit(chunk, base_rows, start, stop))
            if len(pending) > self._workers:
                self._emit(pending.popleft().result(), writer, progress)
        while pending:
            self._emit(pending.popleft().result(), writer, progress)

    def _taus(self, deltas: TensorDeltas, active: list[int], base_rows: torch.Tensor | None,
              start: int, stop: int) -> dict[int, torch.Tensor]:
        """τᵢ[start:stop] of every active adapter."""
        if base_rows is None:
            base_rows = self._base_rows_if_needed(deltas, active, start, stop)
        return {i: deltas.adapter_rows(i, base_rows, start, stop) for i in active}  # type: ignore[misc, arg-type]

    def _base_rows_if_needed(self, deltas: TensorDeltas, active: list[int], start: int, stop: int
                             ) -> torch.Tensor | None:
        """W[start:stop] on the device when some τᵢ depends on the base rows (DoRA, saved tensors), else None."""
        if not any(deltas.needs_base(i) for i in active):
            return None
        return self.base.read_rows(deltas.plan.name, start, stop).to(self.options.device, self.options.compute_dtype)

    def _prepare_sparse(self, tensor: TensorPlan, deltas: TensorDeltas, ranges: list[tuple[int, int]]
                        ) -> tuple[SparseTensorMerge, dict[int, torch.Tensor] | None]:
        """Per-tensor method state and trim thresholds.

        When every τᵢ of the tensor fits in half the memory budget, they are built once (one GEMM each) and
        the selection and merge passes slice them; otherwise each pass rebuilds τᵢ chunk by chunk.
        """
        active = self.active(tensor)
        numel = tensor.info.rows * max(tensor.info.cols, 1)
        sparse = SparseTensorMerge(self.method, tensor.name, numel, active, self.weights, self.global_params,
                                   self.adapter_params, self.seed)
        selecting = [i for i in active if sparse.needs_selection(i)]
        cached = self._cached_taus(deltas, active, ranges) if self._caches_taus(tensor) else None

        if cached is not None:  # the chunks exist: every adapter's passes run over them side by side
            sources = {index: (lambda whole=cached[index]: (whole[start:stop] for start, stop in ranges))
                       for index in selecting}
            sparse.prepare_many(sources, self._pool.map if self._pool is not None else map)
            return sparse, cached

        def select(index: int) -> None:
            def chunks() -> Iterable[torch.Tensor]:
                for start, stop in ranges:
                    yield self._taus(deltas, [index], None, start, stop)[index]
            sparse.prepare(index, chunks)

        if self._pool is not None:  # τᵢ is rebuilt chunk by chunk: one adapter's selection per worker
            list(self._pool.map(select, selecting))
        else:
            for index in selecting:
                select(index)
        return sparse, cached

    def _cached_taus(self, deltas: TensorDeltas, active: list[int], ranges: list[tuple[int, int]]
                     ) -> dict[int, torch.Tensor]:
        """Every τᵢ of the tensor, built chunk by chunk (cache-sized products run several times faster on
        CPU than one whole-tensor one) into one buffer each."""
        shape = (deltas.plan.info.rows, *deltas.plan.info.shape[1:])
        numel = deltas.plan.info.rows * max(deltas.plan.info.cols, 1)
        buffer = self._tau_buffer
        if buffer is None or buffer.numel() < numel * len(active):
            # one buffer, grown to the largest tensor and reused: fresh pages would fault on every tensor
            buffer = self._tau_buffer = None  # drop the smaller one first, so both never coexist
            buffer = self._tau_buffer = torch.empty(numel * len(active), device=self.options.device,
                                                    dtype=self.options.compute_dtype)
        cached = {i: buffer[n * numel:(n + 1) * numel].view(shape) for n, i in enumerate(active)}

        def build(start: int, stop: int) -> None:
            base_rows = self._base_rows_if_needed(deltas, active, start, stop)
            for index in active:
                deltas.adapter_rows(index, base_rows, start, stop,  # type: ignore[arg-type]
                                    out=cached[index][start:stop].reshape(stop - start, -1))

        starts, stops = zip(*ranges)
        list((self._pool.map if self._pool is not None else map)(build, starts, stops))
        return cached

    def _emit(self, rows: torch.Tensor, writer: ShardedWriter, progress: Progress) -> None:
        data = tensor_bytes(rows.cpu())
        writer.write(data)
        progress.update(data.nbytes)

