"""The per-tensor schedule: every decision about how one tensor is read, merged and held, made once.

The reader (which row ranges, read as stored or widened), the merge loop (which kernel, which cache) and the
dry run's memory estimate all consume the same `TensorSchedule`, so they cannot fall out of step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeConfigError
from ..formats.safetensors import TORCH_DTYPES
from ..methods import MergeMethod
from . import kernels
from .plan import BiasShift, LowRank, SavedTensor, TensorPlan

DEFAULT_MAX_MEMORY = 512 * 2**20
#: float32 buffers alive per element of a chunk besides the τᵢ: W, the merged delta, W + delta
WORKING_BUFFERS = 3
#: a tensor's τᵢ are cached whole when they take at most this share of the memory budget. Measured (#27): at the
#: 1.57B shape caching the 138 MB of MLP τᵢ saves ~8% of TIES' CPU over computing them per tile; at the 7B shape
#: the 201 MB of attention τᵢ held raised the peak RSS from 0.44 to 0.60 GB for the same wall time (the default
#: 512 MiB budget: 171 MiB here; half the budget, as before, held both)
TAU_CACHE_SHARE = 1 / 3

#: what the engine does with a tensor
COPY, CAST, MERGE = "copy", "cast", "merge"
#: which code merges a tensor's chunks
C_LOWRANK, C_SUM, C_TIES, TORCH = "C low-rank kernel", "C sum kernel", "C TIES kernel", "torch"
_ELEMENTWISE_KERNELS = {"sum": C_SUM, "ties": C_TIES}


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
    #: the fused elementwise kernels work through a chunk in cache-sized blocks themselves, so their chunks are
    #: larger: fewer calls, thread hand-offs and buffers per tensor (measured on the 492M benchmark: TIES ~25% faster)
    cpu_fused_chunk_elements: int = 1 << 20
    #: the low-rank kernel (W + L·R, W as stored) blocks for the cache itself too, but its chunk is read, merged in
    #: place and written by three threads: 1 MiB of bf16 rows still in cache when the writer copies them. Measured at
    #: the 7B width (#27, medians on a shared machine): larger chunks cut the kernel's and the loop's time, smaller
    #: ones the copies' (from 1<<18 to 1<<20: the write copy 0.5 -> 0.7 CPU s per 2 GB); this size cost least in total
    cpu_lowrank_chunk_elements: int = 1 << 19
    #: CPU threads that merge chunks side by side (each runs torch single-threaded); 1 on CUDA
    workers: int = field(default_factory=lambda: default_workers())

    @property
    def merge_threads(self) -> int:
        """Threads merging chunks side by side: the option on CPU, 1 on CUDA (the device does the work)."""
        return self.workers if self.device.type == "cpu" else 1

    @property
    def chunks_in_flight(self) -> int:
        """Chunks held at once: one per merge thread plus the one waiting to be written."""
        return self.merge_threads + 1 if self.merge_threads > 1 else 1


def default_workers() -> int:
    """One merge thread per core this process may use, up to 8 (beyond that the Python glue between torch
    calls dominates)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


@dataclass(frozen=True)
class TensorSchedule:
    """How one base tensor goes through the engine."""

    plan: TensorPlan
    #: COPY (raw bytes, never decoded), CAST (rows converted to the output dtype) or MERGE
    action: str
    #: adapters that change this tensor (they touch it with a non-zero coefficient or weight)
    active: tuple[int, ...] = ()
    #: [start, stop) row chunks, in order (empty for COPY: raw bytes are read in blocks)
    ranges: tuple[tuple[int, int], ...] = ()
    #: the dtype the reader widens rows to off the main thread, or None: rows as stored
    read_dtype: torch.dtype | None = None
    #: True when the kernel takes the base rows as stored and writes the output dtype itself
    raw_rows: bool = False
    #: which code merges the chunks (C_LOWRANK, C_SUM, C_TIES or TORCH)
    kernel: str = TORCH
    #: True when every τᵢ of the tensor is built once and the selection and merge passes slice it
    caches_taus: bool = False
    #: True when every τᵢ is a plain low-rank product and the method has its fused kernel: the selection and merge
    #: passes compute τᵢ tile by tile from the factors inside the kernels, never whole (nor cached)
    tiled: bool = False
    #: bytes held for this tensor at once: the chunks in flight plus any cached τᵢ
    working_set: int = 0

    @property
    def name(self) -> str:
        """The tensor's name in the base and in the output."""
        return self.plan.name

    @property
    def chunk_rows(self) -> int:
        """Rows in the largest chunk (0 when the tensor is copied as bytes)."""
        return max((stop - start for start, stop in self.ranges), default=0)


def active_adapters(tensor: TensorPlan, method: MergeMethod, weights: Sequence[float],
                    params: dict[str, Any]) -> tuple[int, ...]:
    """Adapters that change this tensor: they touch it and their coefficient (or weight) is non-zero."""
    if not tensor.touched:
        return ()
    factors = method.coefficients(weights, params) or weights
    return tuple(i for i, (items, c) in enumerate(zip(tensor.by_adapter, factors)) if items and c != 0)


def rows_per_chunk(plan: TensorPlan, materialized: int, options: EngineOptions, cpu_elements: int | None = None) -> int:
    """Rows per chunk: forced by --chunk-rows, or as many as fit the memory budget (at least one); on CPU at most
    `cpu_elements` elements (default: options.cpu_chunk_elements)."""
    rows = plan.info.rows
    if options.chunk_rows is not None:
        return max(1, min(options.chunk_rows, rows))
    cols = max(plan.info.cols, 1)
    per_row = cols * 4 * (WORKING_BUFFERS + materialized) + plan.info.row_bytes
    size = options.max_memory // per_row
    if options.device.type == "cpu":
        size = min(size, (cpu_elements or options.cpu_chunk_elements) // cols)
    return max(1, min(rows, size))


def chunk_ranges(rows: int, size: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) row ranges covering `rows` in steps of `size`."""
    return tuple((start, min(start + size, rows)) for start in range(0, rows, size))


def only_low_rank(plan: TensorPlan, active: Sequence[int]) -> bool:
    """True when every change of the active adapters to this tensor is a plain low-rank product."""
    return all(isinstance(item, LowRank) for index in active for item in plan.by_adapter[index])


def only_saved(plan: TensorPlan, active: Sequence[int]) -> bool:
    """True when each active adapter changes this tensor by one saved full tensor (full fine-tunes)."""
    return all(len(plan.by_adapter[index]) == 1 and isinstance(plan.by_adapter[index][0], SavedTensor)
               for index in active)


def schedule_tensor(plan: TensorPlan, method: MergeMethod, weights: Sequence[float], params: dict[str, Any],
                    adapter_params: Sequence[dict[str, Any]], options: EngineOptions) -> TensorSchedule:
    """Decide, once, how `plan` is read, merged and held."""
    active = active_adapters(plan, method, weights, params)
    if not active:
        if plan.out_dtype == plan.info.dtype:
            return TensorSchedule(plan, COPY)
        return TensorSchedule(plan, CAST, ranges=chunk_ranges(plan.info.rows, rows_per_chunk(plan, 0, options)))
    cpu_f32 = options.device.type == "cpu" and options.compute_dtype == torch.float32 and kernels.enabled()
    kernel = TORCH
    if method.phase.combines_chunks:  # its own C kernel, when it declares one
        declared = _ELEMENTWISE_KERNELS.get(method.phase.kernel)  # type: ignore[arg-type]
        if declared is not None and cpu_f32 and len(active) <= kernels.MAX_TAUS:
            kernel = declared
    elif cpu_f32 and only_low_rank(plan, active):
        kernel = C_LOWRANK
    elif (cpu_f32 and len(active) <= kernels.MAX_TAUS and only_saved(plan, active)
          and method.coefficients(weights, params) is not None):
        kernel = C_SUM  # a linear merge of full fine-tunes: each τᵢ one subtraction, then the fused sum kernel
    elementwise_c = kernel in (C_SUM, C_TIES)
    materialized = method.phase.buffers(len(active), elementwise_c)  # the phase's own memory multiplier
    elements = (options.cpu_fused_chunk_elements if elementwise_c
                else options.cpu_lowrank_chunk_elements if kernel == C_LOWRANK else options.cpu_chunk_elements)
    ranges = chunk_ranges(plan.info.rows, rows_per_chunk(plan, materialized, options, elements))
    if (method.phase.sparsifier is not None
            and method.phase.sparsifier.whole_rows and len(plan.info.shape) < 2):
        ranges = ((0, plan.info.rows),)  # a 1-D tensor is one row for per-row ranks: one chunk
    raw_rows = (kernel != TORCH and TORCH_DTYPES[plan.info.dtype] in kernels.ROW_TYPES
                and TORCH_DTYPES[plan.out_dtype] in kernels.ROW_TYPES)
    read_dtype = options.compute_dtype if options.device.type == "cpu" and not raw_rows else None
    numel = plan.info.rows * max(plan.info.cols, 1)
    # saved full tensors (full fine-tunes) are rebuilt per pass by a read and a subtraction, about what reading a
    # cache costs: only τᵢ that need computing (low-rank products, DoRA) are worth holding whole
    computed = not only_saved(plan, active)
    sparsifier = method.phase.sparsifier
    selects = sparsifier is not None and any(sparsifier.ranks(adapter_params[i], numel) for i in active)
    # τᵢ held whole when they fit TAU_CACHE_SHARE of the budget (built once, then sliced by every pass: the fewest
    # operations); larger low-rank τᵢ of a method whose cut needs no τ are computed tile by tile inside the kernels
    # of each pass (two products per entry instead of three, none through memory)
    caches = selects and computed and numel * 4 * len(active) <= options.max_memory * TAU_CACHE_SHARE
    tiled = (not caches and elementwise_c and only_low_rank(plan, active) and kernels.per_tile_built()
             and (sparsifier is None or sparsifier.cuts_unseen))
    cols = max(plan.info.cols, 1)
    rows = max(stop - start for start, stop in ranges)
    chunk = rows * (cols * 4 * (WORKING_BUFFERS + materialized) + plan.info.row_bytes)
    working = chunk * options.chunks_in_flight + (numel * 4 * len(active) if caches else 0)
    return TensorSchedule(plan, MERGE, active, ranges, read_dtype, raw_rows, kernel, caches, tiled, working)


def check_phase(tensors: Sequence[TensorPlan], method: MergeMethod, labels: Sequence[str]) -> None:
    """A factored method merges low-rank products (and 1-D bias shifts when it says how): anything else is a
    config error naming the tensor, the adapter and the methods that can merge it, before any work."""
    if not method.phase.factors_from_inputs:
        return
    for tensor in tensors:
        for index, items in enumerate(tensor.by_adapter):
            for item in items:
                if isinstance(item, LowRank) or (isinstance(item, BiasShift) and method.phase.takes_bias_shifts):
                    continue
                what = {"BiasShift": "a lora_bias shift", "Dora": "a DoRA magnitude",
                        "SavedTensor": "a saved full tensor"}.get(type(item).__name__, type(item).__name__)
                raise MergeConfigError(
                    f"method '{method.name}' works on low-rank factors, but adapter '{labels[index]}' changes tensor "
                    f"'{tensor.name}' with {what}; merge these adapters with linear, task_arithmetic, ties, "
                    "dare_ties, dare_linear, magnitude_prune, breadcrumbs, della or model_stock"
                )
