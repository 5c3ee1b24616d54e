"""Walk the merge plan once: per touched tensor, the exact geometry from the factors, the base norm (streamed)
and the sign conflicts among the entries TIES keeps (streamed); then the whole-model aggregates."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import PreparedMerge
from ..config import MergeConfig
from ..engine.allocator import tune_allocator
from ..engine.deltas import TensorDeltas
from ..engine.device import single_threaded_torch
from ..engine.plan import BiasShift, LowRank, TensorPlan
from ..engine.schedule import DEFAULT_MAX_MEMORY, default_workers
from ..engine.select import Mapper
from ..errors import MergeConfigError
from ..methods.gradients import LAYER_INDEX, layer_index
from ..progress import byte_progress
from ..sources.checkpoint import BaseCheckpoint
from .conflicts import ConflictCounts, TauCache, conflict_counts
from .geometry import TaskFactors, TensorGeometry, cosine_of, tensor_geometry, vector_inner
from .inputs import portable_folder
from .streamed import base_square_norm, chunk_rows, dense_inner, row_ranges, sample_ranges

logger = logging.getLogger(__name__)

#: the density TIES is assumed to use when neither --density nor the config's method gives one
DEFAULT_DENSITY = 0.5
#: a layer index in a tensor name: model.layers.3., transformer.h.3., encoder.layer.3., blocks.3.
LAYER_PATTERN = LAYER_INDEX  # the one layer-index rule (methods/gradients.py)
LOW_RANK, VECTOR, DENSE = "low_rank", "vector", "dense"
#: batches per worker that a pass over one tensor's chunks is cut into (taken in turn by whichever is free)
BATCHES_PER_WORKER = 8


@dataclass(frozen=True)
class InspectOptions:
    """How to inspect: the TIES density for the conflict rate, an optional sample, memory and device."""

    density: float | None = None
    #: at most this many entries per tensor for the conflict rate (an estimate then); None: every entry
    sample: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: CPU threads working on a tensor's chunks side by side
    workers: int = field(default_factory=default_workers)


@dataclass
class TensorResult:
    """One base tensor some adapter changes."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    #: low_rank (factors only), vector (bias shifts only) or dense (DoRA or a saved tensor among the changes)
    kind: str
    #: the adapters (indices into the config's list) that change this tensor
    adapters: list[int]
    base_norm: float
    #: ⟨τᵢ, τⱼ⟩ over `adapters`, float64
    inner: torch.Tensor
    #: spans, ranks and spectrum (low_rank tensors only)
    geometry: TensorGeometry | None
    #: the adapters with a non-zero weight, over which conflicts are counted (≥ 2, else no counts)
    conflict_adapters: list[int]
    conflicts: ConflictCounts | None

    def position(self, adapter: int) -> int | None:
        """Where `adapter` sits in this tensor's `adapters`, or None when it does not change the tensor."""
        return self.adapters.index(adapter) if adapter in self.adapters else None

    def norm(self, adapter: int) -> float | None:
        """‖τᵢ‖_F of this tensor (None: not changed by that adapter)."""
        p = self.position(adapter)
        return None if p is None else math.sqrt(max(float(self.inner[p, p]), 0.0))

    @property
    def numel(self) -> int:
        """Entries of the tensor."""
        return math.prod(self.shape) if self.shape else 1


@dataclass
class Inspection:
    """Everything `merge inspect` measured; `report` renders it, the aggregates below sum it over tensors."""

    config: MergeConfig
    method_given: bool
    base_folder: str
    labels: list[str]
    weights: list[float]
    densities: list[float]
    adapter_modules: list[list[dict[str, Any]]]
    tensors: list[TensorResult]
    sample: int | None
    timings: dict[str, float]

    # -- whole-model aggregates -------------------------------------------------------------------------
    def square_norm(self, i: int) -> float:
        """‖τᵢ‖²_F over the whole model (the task vector as one long vector)."""
        return sum(t.norm(i) ** 2 for t in self.tensors if i in t.adapters)  # type: ignore[operator]

    def base_square_norm(self, i: int, layer: int | None | str = "all") -> float:
        """‖W‖²_F over the tensors adapter i changes (in one layer, or all)."""
        return sum(t.base_norm ** 2 for t in self.tensors if i in t.adapters and (layer == "all" or t.layer == layer))

    def relative_norm(self, i: int, layer: int | None | str = "all") -> float | None:
        """‖τᵢ‖_F / ‖W‖_F over the tensors adapter i changes (in one layer, or all)."""
        tensors = [t for t in self.tensors if i in t.adapters and (layer == "all" or t.layer == layer)]
        base = sum(t.base_norm ** 2 for t in tensors)
        if not tensors or base <= 0:
            return None
        return math.sqrt(sum(t.norm(i) ** 2 for t in tensors) / base)  # type: ignore[operator]

    def cosine(self, i: int, j: int) -> float | None:
        """cos(τᵢ, τⱼ) of the whole task vectors: Σ_t⟨τᵢ,τⱼ⟩ / (‖τᵢ‖‖τⱼ‖)."""
        inner = 0.0
        for t in self.tensors:
            a, b = t.position(i), t.position(j)
            if a is not None and b is not None:
                inner += float(t.inner[a, b])
        return cosine_of(inner, self.square_norm(i), self.square_norm(j))

    def overlap(self, i: int, j: int, space: str) -> float | None:
        """Mean over the low-rank tensors both change of the `space` ("column" or "row") overlap."""
        values = []
        for t in self.tensors:
            a, b = t.position(i), t.position(j)
            if t.geometry is None or a is None or b is None:
                continue
            value = (t.geometry.column_overlap if space == "column" else t.geometry.row_overlap)[a][b]
            if value is not None:
                values.append(value)
        return sum(values) / len(values) if values else None

    def shared_tensors(self, i: int, j: int) -> int:
        """Tensors both adapters change."""
        return sum(1 for t in self.tensors if i in t.adapters and j in t.adapters)

    def conflicts(self, layer: int | None | str = "all") -> ConflictCounts:
        """The conflict counts summed over tensors (of one layer, or all), per pair over all adapters."""
        total = ConflictCounts(len(self.labels))
        for t in self.tensors:
            if t.conflicts is not None and (layer == "all" or t.layer == layer):
                total.add(t.conflicts, t.conflict_adapters)
        return total

    @property
    def layers(self) -> list[int]:
        """The layer indices of the changed tensors, in order."""
        return sorted({t.layer for t in self.tensors if t.layer is not None})

    @property
    def sampled(self) -> bool:
        """True when some conflict count looked at fewer entries than its tensor holds."""
        return any(t.conflicts is not None and t.conflicts.entries < t.numel for t in self.tensors)


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name, or None (embeddings, the head, final norms)."""
    return layer_index(name)


def densities_for(config: MergeConfig, method_given: bool, density: float | None) -> list[float]:
    """--density for every adapter, else the density the config's method takes (per adapter), else DEFAULT_DENSITY."""
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise MergeConfigError(f"--density {density}: must be in (0, 1]")
        return [density] * len(config.inputs)
    if method_given and all(params.get("density") is not None for params in config.adapter_params):
        return [float(params["density"]) for params in config.adapter_params]
    return [DEFAULT_DENSITY] * len(config.inputs)


def analyse(config: MergeConfig, method_given: bool, inputs: PreparedMerge, options: InspectOptions,
            progress: bool = False) -> Inspection:
    """Measure every touched tensor of the plan (see the module docstring)."""
    started = time.perf_counter()
    weights = config.weights
    densities = densities_for(config, method_given, options.density)
    clock = _Clock()
    touched = [t for t in inputs.plan.tensors if t.touched]
    bar = byte_progress(sum(t.info.nbytes for t in touched), progress, description="inspecting")
    # one tensor at a time (one τ cache in memory), its chunks side by side in single-threaded workers, as the
    # engine's chunk workers run: on a busy machine torch's own thread pool made the many small passes several
    # times slower
    workers = options.workers if options.device.type == "cpu" else 1
    results = []
    cache = TauCache(options.device)
    tune_allocator()  # the chunk passes' temporaries reuse heap memory instead of faulting fresh pages in
    try:  # this thread is one of the workers
        with single_threaded_torch(), ThreadPoolExecutor(max(workers - 1, 1), thread_name_prefix="inspect") as pool:
            for tensor in touched:
                results.append(_tensor(tensor, inputs, weights, densities, options, clock, pool, workers > 1, cache))
                bar.update(tensor.info.nbytes)
    finally:
        bar.close()
    timings = clock.seconds | {"total_s": time.perf_counter() - started}
    modules = [[{"module": m.module, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "embedding": m.embedding,
                 "bias": m.bias_key is not None, "dora": m.magnitude_key is not None,
                 "rslora": bool(adapter.config.get("use_rslora"))}
                for m in adapter.modules.values()] for adapter in inputs.adapters]
    for index, adapter in enumerate(inputs.adapters):
        modules[index] += [{"module": path, "saved": True} for path in adapter.full_tensors]
    base_folder = portable_folder(config, config.base_model, inputs.base.folder)
    return Inspection(config, method_given, base_folder, [a.label for a in inputs.adapters], weights,
                      densities, modules, results, options.sample, timings)


class _Clock:
    """Seconds per part of the work, summed over the threads that did it."""

    PARTS = ("geometry_s", "base_norms_s", "conflicts_s")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._lock = threading.Lock()

    def timed(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function`, adding the seconds each call takes to `part`."""
        def run(*args: Any) -> Any:
            clock = time.perf_counter()
            try:
                return function(*args)
            finally:
                with self._lock:
                    self.seconds[part] += time.perf_counter() - clock
        return run

    def mapper(self, part: str, pool: ThreadPoolExecutor | None, workers: int = 1) -> Mapper:
        """A map that times every call for `part`, shared by this thread and the pool's `workers` − 1 threads: each
        takes the next few items until none is left (a task per item spent more time handing chunks between threads
        than working on them; fixed shares left threads waiting). The pool starts at once, this thread joins when
        the results are first asked for; results come in order. Without a pool, the builtin map."""
        def mapped(function: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
            timed = self.timed(part, function)
            if pool is None:
                return map(timed, *iterables)
            items = list(zip(*iterables))
            results: list[Any] = [None] * len(items)
            size = max(1, len(items) // (BATCHES_PER_WORKER * workers))
            batches = itertools.count()  # next() on it is atomic: each batch is taken once
            failed = threading.Event()

            def drain() -> None:
                try:
                    while not failed.is_set() and (start := next(batches) * size) < len(items):
                        for k in range(start, min(start + size, len(items))):
                            results[k] = timed(*items[k])
                except BaseException:
                    failed.set()
                    raise

            helpers = [pool.submit(drain) for _ in range(workers - 1)]

            def collect() -> Iterator[Any]:
                try:
                    drain()
                finally:
                    for helper in helpers:
                        helper.result()
                yield from results
            return collect()
        return mapped


def _tensor(tensor: TensorPlan, inputs: PreparedMerge, weights: list[float], densities: list[float],
            options: InspectOptions, clock: _Clock, pool: ThreadPoolExecutor, side_by_side: bool,
            cache: TauCache) -> TensorResult:
    info = tensor.info
    rows, cols = info.rows, max(info.cols, 1)
    touching = [i for i, items in enumerate(tensor.by_adapter) if items]
    active = [i for i in touching if weights[i] != 0]
    deltas = TensorDeltas(tensor, inputs.plan.adapters, options.device, torch.float32)
    step = chunk_rows(cols, len(touching), options.max_memory)
    full = row_ranges(rows, step)
    spread = pool if side_by_side else None  # the chunk passes run side by side in the pool, or here
    threads = options.workers if side_by_side else 1

    def build(adapters: Sequence[int], start: int, stop: int, out: Sequence[torch.Tensor] | None = None
              ) -> list[torch.Tensor]:
        wide = (_wide(inputs.base, info.name, start, stop, options.device)
                if any(deltas.needs_base(i) for i in adapters) else None)
        return [deltas.adapter_rows(i, wide, start, stop, out=None if out is None else out[n]  # type: ignore[arg-type, misc]
                                    ).reshape(stop - start, cols) for n, i in enumerate(adapters)]

    # the workers read W for its norm while this thread does the factor math (MKL keeps large per-thread
    # buffers: its QRs and SVDs in one thread only keep that memory to one thread's worth)
    norms = clock.mapper("base_norms_s", spread, threads)(
        lambda start, stop: base_square_norm(inputs.base, info.name, [(start, stop)]), *zip(*full))
    items = [item for i in touching for item in tensor.by_adapter[i]]
    geometry = None
    if all(isinstance(item, LowRank) for item in items):
        kind = LOW_RANK
        factors = [TaskFactors.of(deltas.adapter_factors(i)) for i in touching]
        geometry = clock.timed("geometry_s", tensor_geometry)(factors, [weights[i] for i in touching], (rows, cols))
        inner = geometry.inner
    elif all(isinstance(item, BiasShift) for item in items):
        kind, inner = VECTOR, clock.timed("geometry_s", vector_inner)([deltas.vector(i) for i in touching])
    else:
        kind, inner = DENSE, dense_inner(build, touching, full, clock.mapper("geometry_s", spread, threads))
    base_norm = math.sqrt(sum(norms))

    counts = None
    if len(active) >= 2:
        ranges = full if options.sample is None else sample_ranges(rows, cols, options.sample, step)
        seen = sum(stop - start for start, stop in ranges) * cols
        labels = ", ".join(inputs.adapters[i].label for i in active)
        # every τᵢ built once when they fit in half the budget, as the engine caches them for TIES
        fits = seen * 4 * len(active) <= options.max_memory // 2
        counts = conflict_counts(build, active, ranges, cols, [weights[i] for i in active],
                                 [densities[i] for i in active], f"tensor '{info.name}' (adapters {labels})",
                                 cache=cache if fits else None, mapper=clock.mapper("conflicts_s", spread, threads))
    return TensorResult(info.name, tuple(info.shape), layer_of(info.name), kind, touching, base_norm, inner.cpu(),
                        geometry, active, counts)


def _wide(base: BaseCheckpoint, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """W[start:stop] on the device in float32 (for changes that depend on the base: DoRA, saved tensors)."""
    return base.read_rows(name, start, stop).to(device=device, dtype=torch.float32)
