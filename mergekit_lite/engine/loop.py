"""The streaming loop: per base tensor, per row chunk, build τᵢ on the device, merge, cast, check, write.

Memory is bounded by one row chunk per tensor (plus the adapters' small factors), never by the model. Every
decision about a tensor (chunks, read dtype, kernel, caches) is made once in its `TensorSchedule`; the loop
only follows it, in the method's phase: linear and factored methods stream W + L·R, elementwise methods
combine τᵢ chunk by chunk.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeConfigError, NonFiniteError
from ..formats.safetensors import TORCH_DTYPES, tensor_bytes
from ..methods import FactoredContext, FactoredPhase, InterpolationPhase, MergeMethod
from ..methods.gradients import TensorParams, any_setting, layer_count, layer_position, resolve_tensor
from ..progress import Progress
from ..sources.checkpoint import COPY_BLOCK, BaseCheckpoint
from . import kernels, saved_kernels
from .allocator import mapped_chunks, release_free_memory
from .deltas import StreamedDelta, TensorDeltas, scratch
from .elementwise import SparseTensorMerge
from .finite import all_finite
from .plan import MergePlan, TensorPlan
from .prefetch import Prefetcher
from .schedule import CAST, COPY, MERGE, EngineOptions, TensorSchedule, schedule_tensor
from .select import Lazy, Trimmer, kth_largest_magnitude
from .sink import FileSink, TensorSink


#: a sparsifying method's per-tensor state: (deltas, selection, cached τᵢ or None, per-tile factors or None)
SparseState = tuple[TensorDeltas, SparseTensorMerge, "dict[int, torch.Tensor] | None", "dict[int, Any] | None"]


@dataclass
class EngineStats:
    """What the engine did, for the summary and the MergeResult."""

    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    max_chunk_rows: int = 0


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
        #: per tensor, the weights and parameters with every per-layer gradient and filter evaluated (§3d)
        self._varying = any_setting(self.weights, global_params, adapter_params)
        self._params = self._tensor_params(plan)
        self.coefficients = None if self._varying else method.coefficients(self.weights, global_params)
        self.schedules = [schedule_tensor(tensor, method, p.weights, p.params, p.adapter_params, options)
                          for tensor, p in ((t, self.params_of(t.name)) for t in plan.tensors)]
        self._by_name = {schedule.name: schedule for schedule in self.schedules}
        self._tau_buffer: torch.Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: factored methods: the next tensors' deltas, computed ahead in one background thread
        self._ahead: ThreadPoolExecutor | None = None
        self._factored: dict[str, Future[StreamedDelta]] = {}
        self._upcoming: Iterator[TensorSchedule] = iter(())
        #: sparsifying methods: the next tensor's selection passes, run while this one merges (`_look_ahead`)
        self._selector: ThreadPoolExecutor | None = None
        self._selected: dict[str, Future[SparseState]] = {}
        merged = [s for s in self.schedules if s.action == MERGE]
        self._next_merged = {a.name: b for a, b in zip(merged, merged[1:])}

    def _tensor_params(self, plan: MergePlan) -> dict[str, TensorParams]:
        """Every touched tensor's resolved parameters when some weight or parameter varies by layer or name, else
        {}; the method's own checks (Σ w ≠ 0, …) run per tensor here, before any work. (Untouched tensors are
        copied: a filter list need not match them.)"""
        if not self._varying:
            return {}
        n_layers = layer_count(t.name for t in plan.tensors)
        resolved = {}
        for tensor in plan.tensors:
            if not tensor.touched:
                continue
            params = resolve_tensor(tensor.name, layer_position(tensor.name, n_layers), self.weights,
                                    self.global_params, self.adapter_params)
            if self.method.validate is not None:
                try:
                    self.method.validate(params.weights, params.params, params.adapter_params)
                except MergeConfigError as error:
                    raise MergeConfigError(f"tensor '{tensor.name}': {error}") from None
            resolved[tensor.name] = params
        return resolved

    def params_of(self, name: str) -> TensorParams:
        """Tensor `name`'s weights and parameters (the config's own when nothing varies by tensor)."""
        params = self._params.get(name)
        if params is None:
            return TensorParams(tuple(self.weights), self.global_params, self.adapter_params)
        return params

    def _coefficients(self, name: str) -> list[float] | None:
        """The linear cᵢ of tensor `name` (None for the other phases)."""
        if not self._varying:
            return self.coefficients
        params = self.params_of(name)
        return self.method.coefficients(params.weights, params.params)

    def schedule(self, tensor: TensorPlan) -> TensorSchedule:
        """The schedule decided for `tensor`."""
        return self._by_name[tensor.name]

    def working_set_bytes(self, tensor: TensorPlan) -> int:
        """Memory the engine holds for one tensor at a time: the chunks in flight plus any cached τᵢ."""
        return self.schedule(tensor).working_set

    def run(self, writer: FileSink, progress: Progress) -> EngineStats:
        """Merge or copy every base tensor into `writer`, reading ahead in a background thread.

        On CPU with more than one worker, chunks of a tensor are merged side by side in a thread pool (torch
        releases the GIL; each worker runs torch single-threaded) and written in order.
        """
        stats = EngineStats()
        collecting = gc.isenabled()
        gc.disable()  # the loop makes many short-lived objects and no cycles: collections would only cost time
        side_by_side = self.options.merge_threads > 1
        # OpenMP's thread count is per thread: a Python thread starts at the default (every core), so each thread
        # of ours sets 1 itself when chunks run side by side (else 2 workers x 2 OpenMP teams spin on 2 cores:
        # SLERP's float64 passes ran 2x slower)
        single = _single_threaded if side_by_side else None
        reads: Prefetcher[Any] = Prefetcher(self._reads(), initializer=single)
        threads_before = torch.get_num_threads()
        if side_by_side:
            self._pool = ThreadPoolExecutor(self.options.merge_threads, thread_name_prefix="merge", initializer=single)
            torch.set_num_threads(1)
        if self.method.phase.factors_from_inputs:  # each tensor's core math runs while the previous one streams
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="core", initializer=single)
            self._queue_factored(iter(s for s in self.schedules if s.action == MERGE))
        if self.method.phase.combines_chunks and side_by_side:  # the next tensor's selection while this one merges
            self._selector = ThreadPoolExecutor(1, thread_name_prefix="select", initializer=single)
        scoped = contextlib.ExitStack()
        try:
            if self.method.phase.statistics_pass:  # chunk-sized temporaries mapped: a flat, repeatable peak RSS
                scoped.enter_context(mapped_chunks(self.options.cpu_chunk_elements * 4))
            for schedule in self.schedules:
                writer.begin(schedule.name)
                if schedule.action == COPY and self._copied_in_kernel(schedule):  # untouched, stored raw
                    descriptor, offset = self.base.stored_range(schedule.name)  # type: ignore[misc]
                    writer.copy(descriptor, offset, schedule.plan.info.nbytes)
                    progress.update(schedule.plan.info.nbytes)
                    stats.tensors_copied += 1
                elif schedule.action == COPY:  # untouched: raw bytes, never decoded
                    for _ in range(0, schedule.plan.info.nbytes, COPY_BLOCK):
                        block = reads.next()
                        writer.write(block)
                        progress.update(len(block))
                    stats.tensors_copied += 1
                elif schedule.action == CAST:
                    for _ in schedule.ranges:
                        self._emit(reads.next().to(TORCH_DTYPES[schedule.plan.out_dtype]), writer, progress)
                    stats.tensors_copied += 1
                else:
                    self._merge_tensor(schedule, reads, writer, progress, stats)
                    stats.tensors_merged += 1
        finally:
            reads.close()
            scoped.close()
            if collecting:
                gc.enable()
            if self._ahead is not None:
                self._ahead.shutdown(wait=True, cancel_futures=True)
                self._ahead, self._factored = None, {}
            if self._selector is not None:
                self._selector.shutdown(wait=True, cancel_futures=True)
                self._selector, self._selected = None, {}
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
                torch.set_num_threads(threads_before)
        stats.bytes_written = writer.bytes_written
        return stats

    def _reads(self) -> Iterator[Callable[[], Any]]:
        """Every read of the run, in the order the loop consumes them (the schedules' ranges and read dtypes)."""
        for schedule in self.schedules:
            name = schedule.name
            if schedule.action == COPY and self._copied_in_kernel(schedule):
                continue  # the writer copies its bytes file to file
            if schedule.action == COPY:
                for offset in range(0, schedule.plan.info.nbytes, COPY_BLOCK):
                    length = min(COPY_BLOCK, schedule.plan.info.nbytes - offset)
                    yield functools.partial(self.base.read_bytes, name, offset, length)
            else:
                for start, stop in schedule.ranges:
                    yield functools.partial(self._read_rows, name, start, stop, schedule.read_dtype)

    def _copied_in_kernel(self, schedule: TensorSchedule) -> bool:
        """True when an untouched tensor's bytes go from the base's file to the output's without passing through
        us (the writer thread copies them with copy_file_range, or through its own buffer where it cannot)."""
        return self.base.stored_raw(schedule.name)

    def _read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
        rows = self.base.read_rows(name, start, stop)
        return rows if dtype is None else rows.to(dtype)

    def _merge_tensor(self, schedule: TensorSchedule, reads: Prefetcher[Any], writer: TensorSink,
                      progress: Progress, stats: EngineStats) -> None:
        tensor = schedule.plan
        device, dtype = self.options.device, self.options.compute_dtype
        out_dtype = TORCH_DTYPES[tensor.out_dtype]
        deltas = TensorDeltas(tensor, self.plan.adapters, device, dtype)  # loads nothing until asked
        ranges = list(schedule.ranges)
        stats.max_chunk_rows = max(stats.max_chunk_rows, schedule.chunk_rows)
        row_elems = max(tensor.info.cols, 1)
        sparse, cached, streamed, interpolation, tiled = None, None, None, None, None
        coefficients = self._coefficients(tensor.name)
        if self.method.phase.statistics_pass:
            interpolation = self._interpolation_state(schedule, deltas)
        elif self.method.phase.combines_chunks:
            deltas, sparse, cached, tiled = self._take_selected(schedule)  # its own deltas (maybe made ahead)
            self._look_ahead(schedule)
        elif coefficients is not None:
            streamed = deltas.linear_delta(coefficients)
        else:
            streamed = self._take_factored(schedule, deltas)

        def chunk(base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            """One merged chunk in the output dtype (a pure function of its rows: safe to run side by side)."""
            if interpolation is not None:
                out = interpolation(base_rows, start, stop).to(out_dtype)
                finite = all_finite(out)
            elif sparse is None:
                assert streamed is not None
                out, finite = deltas.merged_rows(streamed, base_rows, start, stop, out_dtype)
            elif (tiled is not None and (below := sparse.tiled_cuts(start * row_elems)) is not None
                  and kernels.rows_usable(base_rows, out_dtype)):  # τᵢ built tile by tile inside the kernel
                factors = {i: (f.left[start:stop], f.right) for i, f in tiled.items()}
                out, finite = sparse.merged_rows_tiled(base_rows, factors, below, out_dtype)
            else:
                if cached is not None:
                    taus = {i: tau[start:stop] for i, tau in cached.items()}
                else:
                    wide = self._wide_for(deltas, sparse.active, base_rows) \
                        if any(deltas.needs_base(i) for i in sparse.active) else None
                    taus = self._taus(deltas, sparse.active, wide, start, stop, reuse=True)
                out, finite = sparse.merged_rows(base_rows, taus, start * row_elems, out_dtype, dtype)
            if not finite:
                raise NonFiniteError(
                    f"merged tensor '{tensor.name}' has inf/NaN after the cast to {tensor.out_dtype} "
                    f"(rows {start}-{stop}); lower the adapter weights or use a wider output dtype"
                )
            return out

        pool = self._pool if sparse is None or sparse.chunks_independent() else None
        pending: deque[Future[torch.Tensor]] = deque()
        for start, stop in ranges:
            base_rows = reads.next() if schedule.raw_rows else reads.next().to(device=device, dtype=dtype)
            if pool is None:
                self._emit(chunk(base_rows, start, stop), writer, progress)
                continue
            pending.append(pool.submit(chunk, base_rows, start, stop))
            if len(pending) > self.options.merge_threads:
                self._emit(pending.popleft().result(), writer, progress)
        while pending:
            self._emit(pending.popleft().result(), writer, progress)
        if (sparse is not None and sparse.trimmers) or interpolation is not None:
            release_free_memory()  # the selection / statistics passes' temporaries: handed back before the next tensor

    # -- one tensor at a time, for outputs other than a checkpoint (a PEFT adapter) --------------------------

    def tensor_delta(self, schedule: TensorSchedule) -> StreamedDelta:
        """The merged delta of one tensor as the linear path streams it (linear and factored phases only):
        factors (L, R) plus any dense parts."""
        deltas = TensorDeltas(schedule.plan, self.plan.adapters, self.options.device, self.options.compute_dtype)
        coefficients = self._coefficients(schedule.name)
        if coefficients is not None:
            return deltas.linear_delta(coefficients)
        return self._factored_delta(schedule, deltas)

    def dense_delta(self, schedule: TensorSchedule) -> torch.Tensor:
        """The whole merged delta of one tensor in the compute dtype, shaped rows × cols (or 1-D): holds one
        tensor's delta, for a low-rank approximation of a full-rank merge or a 1-D change."""
        tensor = schedule.plan
        device, dtype = self.options.device, self.options.compute_dtype
        rows, cols = tensor.info.rows, max(tensor.info.cols, 1)
        deltas = TensorDeltas(tensor, self.plan.adapters, device, dtype)
        out = torch.empty(rows, cols, device=device, dtype=dtype)
        if not self.method.phase.combines_chunks:
            streamed = self.tensor_delta(schedule)
            for start, stop in schedule.ranges:
                base_rows = self._wide_rows(tensor, start, stop) if streamed.dense else None
                part = deltas.delta_rows(streamed, base_rows, start, stop)
                out[start:stop] = 0.0 if part is None else part.reshape(stop - start, cols)
            return out.reshape(tensor.info.shape)
        sparse, cached = self._prepare_sparse(schedule, deltas)
        for start, stop in schedule.ranges:  # merge_chunk leaves its inputs as they are: cached slices will do
            if cached is not None:
                taus = {i: tau[start:stop] for i, tau in cached.items()}
            else:
                taus = self._taus(deltas, sparse.active, None, start, stop)
            out[start:stop] = sparse.merge_chunk(taus, start * cols).reshape(stop - start, cols)
        return out.reshape(tensor.info.shape)

    def merge_into(self, schedule: TensorSchedule, writer: TensorSink, progress: Progress) -> None:
        """W + the merged delta of one tensor, in the output dtype, streamed into `writer` (reads in order)."""
        self._merge_tensor(schedule, _DirectReads(self, schedule), writer, progress, EngineStats())

    def _wide_rows(self, tensor: TensorPlan, start: int, stop: int) -> torch.Tensor:
        """W[start:stop] on the device in the compute dtype."""
        return self.base.read_rows(tensor.name, start, stop).to(self.options.device, self.options.compute_dtype)

    def _queue_factored(self, upcoming: Iterator[TensorSchedule]) -> None:
        """Start computing the deltas of the next two merged tensors in the background."""
        self._upcoming = upcoming
        for _ in range(2):
            self._submit_next()

    def _submit_next(self) -> None:
        schedule = next(self._upcoming, None)
        if schedule is not None and self._ahead is not None:
            self._factored[schedule.name] = self._ahead.submit(self.tensor_delta, schedule)

    def _take_factored(self, schedule: TensorSchedule, deltas: TensorDeltas) -> StreamedDelta:
        """This tensor's factored delta: computed ahead when the run started the background thread."""
        future = self._factored.pop(schedule.name, None)
        if future is None:
            return self._factored_delta(schedule, deltas)
        self._submit_next()
        return future.result()

    def _factored_delta(self, schedule: TensorSchedule, deltas: TensorDeltas) -> StreamedDelta:
        """The factored phase: the method's (L, R) from the active adapters' factors, or its merge of 1-D
        changes (bias shifts), as a delta the linear path streams."""
        phase = self.method.phase
        assert isinstance(phase, FactoredPhase)
        active = schedule.active
        params = self.params_of(schedule.name)
        weights = [params.weights[i] for i in active]
        context = FactoredContext(schedule.name, (schedule.plan.info.rows, max(schedule.plan.info.cols, 1)), self.seed,
                                  tuple(active), tuple(params.adapter_params[i] for i in active), params.weights)
        if all(not deltas.adapter_factors(i) for i in active):  # 1-D changes (bias shifts) only
            assert phase.vectors is not None  # schedule.check_phase refused the rest before any work
            merged = phase.vectors([deltas.vector(i) for i in active], weights, params.params, context)
            merged = merged.to(device=self.options.device, dtype=self.options.compute_dtype)
            return StreamedDelta(None, (lambda _rows, start, stop: merged[start:stop].clone(),))
        factors = [deltas.adapter_factors(i) for i in active]
        if any(len(f) != 1 for f in factors):
            raise AssertionError(f"tensor '{schedule.name}': one low-rank change per adapter expected")
        left, right = phase.factors([f[0] for f in factors], weights, params.params, context)
        left = left.to(device=self.options.device, dtype=self.options.compute_dtype)
        right = right.to(device=self.options.device, dtype=self.options.compute_dtype)
        rows, cols = schedule.plan.info.rows, max(schedule.plan.info.cols, 1)
        if left.shape[0] != rows or right.shape[1] != cols or left.shape[1] != right.shape[0]:
            raise AssertionError(f"method '{self.method.name}' returned factors {tuple(left.shape)} @ "
                                 f"{tuple(right.shape)} for tensor '{schedule.name}' ({rows}x{cols})")
        return StreamedDelta.of(left, right)

    def _taus(self, deltas: TensorDeltas, active: list[int], base_rows: torch.Tensor | None,
              start: int, stop: int, reuse: bool = False) -> dict[int, torch.Tensor]:
        """τᵢ[start:stop] of every active adapter; with `reuse`, saved full tensors' τᵢ land in this thread's
        reused buffers on CPU (valid until this thread's next call: for a pass that drops them at once)."""
        if base_rows is None:
            base_rows = self._base_rows_if_needed(deltas, active, start, stop)
        if not reuse or self.options.device.type != "cpu" or self.options.compute_dtype != torch.float32:
            return {i: deltas.adapter_rows(i, base_rows, start, stop) for i in active}  # type: ignore[misc, arg-type]
        rows = (stop - start, max(deltas.plan.info.cols, 1))
        taus = {}
        for n, i in enumerate(active):
            out = scratch(("tau", n), rows[0] * rows[1], torch.float32).view(rows) if deltas.saved_only(i) else None
            taus[i] = deltas.adapter_rows(i, base_rows, start, stop, out=out)  # type: ignore[arg-type]
        return taus  # type: ignore[return-value]

    def _wide_for(self, deltas: TensorDeltas, active: list[int], base_rows: torch.Tensor) -> torch.Tensor:
        """W rows for building these τᵢ: as stored when every τᵢ that needs W is a saved full tensor and the
        saved-tensor kernel reads W as stored (it widens each entry itself), else widened (`_scratch_wide`)."""
        if (self.options.device.type == "cpu" and self.options.compute_dtype == torch.float32
                and saved_kernels.usable(base_rows, torch.float32)
                and all(deltas.saved_only(i) for i in active if deltas.needs_base(i))):
            return base_rows
        return self._scratch_wide(base_rows)

    def _scratch_wide(self, base_rows: torch.Tensor) -> torch.Tensor:
        """W rows in the compute dtype, on CPU in this thread's reused buffer (rows already wide as they are)."""
        if self.options.device.type != "cpu" or base_rows.dtype == self.options.compute_dtype:
            return base_rows.to(self.options.device, self.options.compute_dtype)
        return scratch("wide", base_rows.numel(), self.options.compute_dtype).view(base_rows.shape).copy_(base_rows)

    def _base_rows_if_needed(self, deltas: TensorDeltas, active: list[int], start: int, stop: int
                             ) -> torch.Tensor | None:
        """W[start:stop] on the device when some τᵢ depends on the base rows (DoRA, saved tensors), else None."""
        if not any(deltas.needs_base(i) for i in active):
            return None
        return self._wide_rows(deltas.plan, start, stop)

    def _sparse_state(self, schedule: TensorSchedule) -> SparseState:
        """A sparsifying method's per-tensor state: the tensor's deltas, its selection (the trim thresholds), any
        cached τᵢ, and the τᵢ factors when the merge pass builds τᵢ per tile."""
        deltas = TensorDeltas(schedule.plan, self.plan.adapters, self.options.device, self.options.compute_dtype)
        factors = self._row_factors(schedule, deltas)  # the selection passes compute τᵢ from them
        sparse, cached = self._prepare_sparse(schedule, deltas, factors)
        return deltas, sparse, cached, factors if schedule.tiled else None  # ... and the merge pass too

    def _take_selected(self, schedule: TensorSchedule) -> SparseState:
        """This tensor's sparse state: selected in the background while the previous tensor merged, or now."""
        future = self._selected.pop(schedule.name, None)
        return future.result() if future is not None else self._sparse_state(schedule)

    def _look_ahead(self, schedule: TensorSchedule) -> None:
        """Start the next merged tensor's selection passes in the background: their chunks share the merge pool
        with this tensor's merge pass, so both cores stay busy while this tensor's rows are read and written. Not
        for a next tensor whose τᵢ are cached (one cache buffer, this tensor's may be in use); the thresholds are
        exact, so the bytes do not depend on it."""
        following = self._next_merged.get(schedule.name)
        if self._selector is None or following is None or following.caches_taus:
            return
        self._selected[following.name] = self._selector.submit(self._sparse_state, following)

    def _row_factors(self, schedule: TensorSchedule, deltas: TensorDeltas) -> dict[int, Any] | None:
        """Every active τᵢ's row factors (left @ right) when each is one plain low-rank product the per-tile kernels
        take, else None."""
        if schedule.caches_taus or not kernels.per_tile_built():
            return None
        factors = {i: deltas.row_factors(i) for i in schedule.active}
        if any(f is None for f in factors.values()):
            return None
        if not kernels.per_tile(*((f.left, f.right) for f in factors.values())):  # type: ignore[union-attr]
            return None
        return factors

    def _prepare_sparse(self, schedule: TensorSchedule, deltas: TensorDeltas, factors: dict[int, Any] | None = None
                        ) -> tuple[SparseTensorMerge, dict[int, torch.Tensor] | None]:
        """Per-tensor method state and trim thresholds.

        When every τᵢ of the tensor fits in TAU_CACHE_SHARE of the memory budget, they are built once and
        the selection and merge passes slice them; otherwise each pass rebuilds τᵢ chunk by chunk, or, for
        low-rank τᵢ (`factors`), the selection passes compute its entries from the factors inside the kernels.
        """
        tensor, active, ranges = schedule.plan, list(schedule.active), list(schedule.ranges)
        numel = tensor.info.rows * max(tensor.info.cols, 1)
        params = self.params_of(tensor.name)
        sparse = SparseTensorMerge(self.method, tensor.name, numel, active, params.weights, params.params,
                                   params.adapter_params, self.seed, shape=tensor.info.shape)
        selecting = [i for i in active if sparse.needs_selection(i)]
        cached = self._cached_taus(deltas, active, ranges) if schedule.caches_taus else None

        if cached is not None:  # the chunks exist: every adapter's passes run over them side by side
            sources = {index: (lambda whole=cached[index]: (whole[start:stop] for start, stop in ranges))
                       for index in selecting}
            sparse.prepare_many(sources, self._pool.map if self._pool is not None else map)
            return sparse, cached

        # τᵢ is rebuilt chunk by chunk, each chunk in the thread that runs the pass over it (a few chunks in
        # flight per worker): the passes of every adapter run side by side over all chunks
        row_elems = max(tensor.info.cols, 1)

        def lazy_chunks(index: int) -> Callable[[], Iterable[Lazy]]:
            def build(start: int, stop: int) -> torch.Tensor:  # into this thread's buffers: a pass reads it, then drops it
                wide = None
                if deltas.needs_base(index):
                    wide = self._wide_for(deltas, [index], self.base.read_rows(
                        tensor.name, start, stop, scratch("base", (stop - start) * tensor.info.row_bytes)))
                return self._taus(deltas, [index], wide, start, stop, reuse=True)[index]
            own = None if factors is None else factors[index]
            return lambda: (Lazy(functools.partial(build, start, stop), (stop - start) * row_elems,
                                 None if own is None else (own.left[start:stop], own.right))
                            for start, stop in ranges)

        sparse.prepare_many({index: lazy_chunks(index) for index in selecting}, self._bounded_map)
        return sparse, cached

    def _bounded_map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """map() through the merge pool, in order, with a few items in flight per worker (items built lazily are
        then never all held at once); the builtin map without a pool."""
        if self._pool is None:
            yield from map(function, items)
            return
        pending: deque[Future[Any]] = deque()
        ahead = 2 * self.options.merge_threads
        for item in items:
            pending.append(self._pool.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _interpolation_state(self, schedule: TensorSchedule, deltas: TensorDeltas
                             ) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        """An interpolating method's first pass (per-row statistics over every chunk, summed over rows in order, so
        the same for any chunk size), and the per-chunk function of its second pass: base rows -> merged rows."""
        phase = self.method.phase
        assert isinstance(phase, InterpolationPhase)
        params = self.params_of(schedule.name)
        device, dtype = self.options.device, self.options.compute_dtype

        def weighted(wide: torch.Tensor, start: int, stop: int) -> list[torch.Tensor | None]:
            taus = self._taus(deltas, list(schedule.active), wide, start, stop)
            return [taus[i] * params.weights[i] if i in taus else None for i in range(len(params.weights))]

        starts, stops = zip(*schedule.ranges)
        keep = self._selection(schedule, weighted, phase, params.params)

        def updates(wide: torch.Tensor, start: int, stop: int) -> list[torch.Tensor | None]:
            raw = weighted(wide, start, stop)
            return raw if keep is None else keep(wide, raw, start)

        def statistics(start: int, stop: int) -> torch.Tensor:
            wide = self._wide_rows(schedule.plan, start, stop)
            return phase.statistics(wide, updates(wide, start, stop), params.params)

        parts = list((self._pool.map if self._pool is not None else map)(statistics, starts, stops))
        state = phase.finish(torch.cat(parts).sum(dim=0), params.params)

        def merged(base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            wide = base_rows.to(device, dtype)
            return phase.combine(wide, updates(wide, start, stop), state, params.params)
        return merged

    def _selection(self, schedule: TensorSchedule, weighted: Callable[..., list[torch.Tensor | None]],
                   phase: InterpolationPhase, params: dict[str, Any]
                   ) -> Callable[..., list[torch.Tensor | None]] | None:
        """An interpolating method's selection (SCE's select), or None when it selects nothing for this tensor:
        a pass counts the nonzero scores, the exact k-th selection (engine/select.py) ranks the scores, rebuilt
        from every uᵢ chunk by chunk, and the function returned zeroes, in a chunk's uᵢ, the entries outside
        the kept set (k largest scores, lower flat index first on ties: the same set for any chunking)."""
        share = phase.select_share(params) if phase.select_share is not None else None
        if share is None:
            return None
        assert phase.score is not None
        row_elems = max(schedule.plan.info.cols, 1)
        ranges = list(schedule.ranges)

        def score(start: int, stop: int) -> torch.Tensor:
            wide = self._wide_rows(schedule.plan, start, stop)
            return phase.score(weighted(wide, start, stop), params).reshape(-1).to(torch.float32)

        def nonzero(bounds: tuple[int, int]) -> int:
            return int(torch.count_nonzero(score(*bounds)).item())

        def chunks() -> Iterator[Lazy]:
            return (Lazy(functools.partial(score, start, stop), (stop - start) * row_elems) for start, stop in ranges)

        k = int(sum(self._bounded_map(nonzero, ranges)) * share) if share > 0 else 0
        trimmer = None
        if k > 0:
            numel = schedule.plan.info.rows * row_elems
            trimmer = Trimmer(kth_largest_magnitude(chunks, k, numel=numel, mapper=self._bounded_map), chunks)

        def keep(wide: torch.Tensor, raw: list[torch.Tensor | None], start: int) -> list[torch.Tensor | None]:
            if trimmer is None:
                return [None if u is None else torch.zeros_like(u) for u in raw]
            kept = trimmer.trim(phase.score(raw, params).reshape(-1).to(torch.float32), start * row_elems) != 0
            return [None if u is None else u.masked_fill_(~kept.view(u.shape), 0.0) for u in raw]  # u: fresh copies
        return keep

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

    def _emit(self, rows: torch.Tensor, writer: TensorSink, progress: Progress) -> None:
        data = tensor_bytes(rows.cpu())
        writer.write(data)
        progress.update(data.nbytes)


def _single_threaded() -> None:
    """A pool thread's initializer: torch (OpenMP) single-threaded in this thread."""
    torch.set_num_threads(1)


class _DirectReads:
    """The reads of one tensor's chunks in order, without a read-ahead thread (one tensor at a time)."""

    def __init__(self, engine: MergeEngine, schedule: TensorSchedule) -> None:
        self._rows = iter([functools.partial(engine._read_rows, schedule.name, start, stop, schedule.read_dtype)
                           for start, stop in schedule.ranges])

    def next(self) -> Any:
        """The next chunk's base rows."""
        return next(self._rows)()
