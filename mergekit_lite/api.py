"""The Python API: `merge(config) -> MergeResult`, and the plan a dry run prints."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MergeConfig
from .engine import kernels
from .engine.allocator import tune_allocator
from .engine.device import peak_device_bytes, peak_rss_bytes, resolve_device, single_threaded_torch
from .engine.elementwise import check_densities
from .engine.loop import MergeEngine
from .engine.plan import LowRank, MergePlan, build_plan, check_filters
from .engine.schedule import DEFAULT_MAX_MEMORY, EngineOptions, check_phase, default_workers
from .formats.safetensors import dtype_code
from .methods.registry import Calibrated, CalibrationRun, weights_apart
from .hub.resolve import hub_reference, resolve_model_dir
from .progress import byte_progress
from .sources.adapter import PeftAdapter
from .sources.checkpoint import BaseCheckpoint
from .sources.full_model import FullModel
from .units import format_size, parse_size
from .writers.atomic import atomic_directory
from .writers.card import warm_card_imports, write_calibrated, written_sections
from .writers.checkpoint import shard_layout
from .writers.kinds import CONFIG_COPY, output_kind, write_output
from .writers.preflight import check_apart, check_free_space, preflight_output
from .writers.ownership import check_replaceable, local_inputs as _local_inputs
from .writers.staging import remove_stale

logger = logging.getLogger(__name__)
__all__ = ["CONFIG_COPY", "MergeResult", "PreparedMerge", "describe_plan", "merge", "prepare"]


@dataclass(frozen=True)
class MergeResult:
    """Everything a run decided and measured; the CLI prints it, tests and the card read it."""

    config: MergeConfig
    output_dir: Path | None
    device: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int = 0
    chunk_rows: int = 0
    shards: int = 0
    dry_run: bool = False
    touched: dict[str, list[str]] = field(default_factory=dict)
    #: `output.format`: "checkpoint" or "peft"
    output_format: str = "checkpoint"
    #: what the output kind adds to the summary (a compressed adapter's kept energy)
    notes: str = ""
    #: the card sections the writer wrote besides the method's (an adapter's ranks, a calibration), kept when
    #: `merge run` with an `eval:` section renders the card again
    card_sections: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One human line for the end of `merge run`."""
        device_peak = f", peak {format_size(self.peak_device_bytes)} on {self.device}" if self.peak_device_bytes else ""
        return (
            f"merged {self.tensors_merged} tensors, copied {self.tensors_copied}, wrote "
            f"{format_size(self.bytes_written)} in {self.shards} shard(s) to {self.output_dir} in {self.seconds:.1f} s "
            f"(peak RSS {format_size(self.peak_rss_bytes)}{device_peak}, device {self.device})"
            + (f"; {self.notes}" if self.notes else "")
        )


@dataclass
class PreparedMerge:
    """A config with its inputs opened and its plan built: all that can fail fast has been checked.

    A context manager: leaving it closes every file the inputs opened (no reliance on garbage collection).
    """

    config: MergeConfig
    base: BaseCheckpoint
    #: every input in merge order: the PEFT adapters, then the full models (`config.inputs`)
    adapters: list[PeftAdapter | FullModel]
    plan: MergePlan
    #: a data-aware method's result (`CalibratedPhase`): what the engine streams instead of the config's weights
    calibrated: Calibrated | None = None

    def calibrate(self, run: CalibrationRun) -> None:
        """A data-aware method's forward passes (learned, regmean), once: every engine made after streams their
        result. Nothing to do for a data-free method."""
        method = self.config.merge_method.calibrated
        if method is not None and self.calibrated is None:
            self.calibrated = method.calibrate(self, run)

    def close(self) -> None:
        """Close the base checkpoint's and the adapters' open files."""
        for adapter in self.adapters:
            adapter.close()
        self.base.close()

    def __enter__(self) -> PreparedMerge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def prepare(config: MergeConfig, allow_pickle: bool = False, method_checks: bool = True) -> PreparedMerge:
    """Open the base and adapters lazily and build the plan (reads headers, configs and adapter factors).

    `allow_pickle` is the user's explicit opt-in to read pickled .bin inputs (with weights_only=True); it is an
    argument, never a config key, so a config file from a stranger cannot switch it on. Whatever was opened
    is closed again if a check fails; on success the caller closes it (use the result as a context manager).
    `method_checks=False` (`merge inspect`) opens and checks the inputs only: no method or output dtype applies.
    """
    with ExitStack() as stack, single_threaded_torch():
        base = BaseCheckpoint(resolve_model_dir(config, config.base_model, kind="base"), allow_pickle=allow_pickle)
        stack.callback(base.close)
        adapters: list[PeftAdapter | FullModel] = []
        for spec in config.adapters:
            adapter = PeftAdapter(resolve_model_dir(config, spec.path, kind="adapter"), spec.label,
                                  allow_pickle=allow_pickle)
            stack.callback(adapter.close)
            adapters.append(adapter)
        for spec in config.models:
            model = FullModel(resolve_model_dir(config, spec.path, kind="base"), spec.label, allow_pickle=allow_pickle)
            stack.callback(model.close)
            model.check_against(base)
            adapters.append(model)
        out_dtype = dtype_code(config.output.dtype) if method_checks else None
        plan = build_plan(base, adapters, out_dtype)  # type: ignore[arg-type]
        if method_checks:
            check_filters(plan, config)
            check_densities(plan, config.merge_method, config.adapter_params)
            check_phase(plan.tensors, config.merge_method, [a.label for a in adapters])
        stack.pop_all()  # checks passed: the caller owns the open files now
    return PreparedMerge(config, base, adapters, plan)


def merge(
    config: MergeConfig,
    *,
    out: str | Path | None = None,
    device: str | torch.device = "auto",
    chunk_rows: int | None = None,
    workers: int | None = None,
    max_memory: int | str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge the adapters into the base as `config` says and write the output atomically.

    The output path is checked once, before any input is opened or downloaded (a file in the way, an existing
    output without `overwrite`, an output inside a local input or holding one; `overwrite` replaces only an empty
    folder or a merge output of ours, checked again at the swap); Hub inputs are checked against it once
    resolved, then the free space.
    """
    started = time.perf_counter()
    if out is not None:
        config = config.with_output_path(out)
    target = config.output_path
    resolved_device = resolve_device(device)
    kind = output_kind(config)
    if not dry_run:
        remove_stale(target.resolve())
        preflight_output(target, overwrite, _local_inputs(config))
    with prepare(config, allow_pickle) as prepared:
        touched = {a.label: names for a, names in zip(prepared.adapters, prepared.plan.touched_by)}
        engine = engine_for(prepared, resolved_device, chunk_rows, max_memory, workers)
        layout = kind.layout(engine)
        if dry_run:
            return MergeResult(
                config, None, str(resolved_device), dry_run=True, touched=touched,
                shards=len(shard_layout(layout, config.output.shard_size)),
            )
        check_apart(target, _hub_inputs(config, prepared))
        needed = sum(t.nbytes for t in layout) + kind.side_file_bytes(prepared.base.folder)
        check_free_space(target, needed)
        if config.merge_method.calibrated is not None:  # data-aware: forward passes first, then the same stream
            prepared.calibrate(CalibrationRun(resolved_device, progress))
            engine = engine_for(prepared, resolved_device, chunk_rows, max_memory, workers)
        if resolved_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(resolved_device)
        tune_allocator()
        warm_card_imports()
        with atomic_directory(target, overwrite, needed, may_replace=check_replaceable) as staging:
            bar = byte_progress(sum(t.nbytes for t in layout), progress)
            stats, shards = write_output(kind, engine, staging, prepared.base.folder, config, layout, bar)
            if prepared.calibrated is not None:
                write_calibrated(staging, prepared.calibrated, config, kind)
    result = MergeResult(
        config=config,
        output_dir=target,
        device=str(resolved_device),
        tensors_merged=stats.tensors_merged,
        tensors_copied=stats.tensors_copied,
        bytes_written=stats.bytes_written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=peak_device_bytes(resolved_device),
        chunk_rows=stats.max_chunk_rows,
        shards=shards,
        touched=touched,
        output_format=kind.name,
        notes="; ".join(n for n in (kind.summary(), prepared.calibrated.summary if prepared.calibrated else "") if n),
        card_sections=written_sections(kind, prepared.calibrated),
    )
    logger.info(result.summary())
    return result


def describe_plan(config: MergeConfig, device: str | torch.device = "auto", chunk_rows: int | None = None,
                  max_memory: int | str | None = None, allow_pickle: bool = False, workers: int | None = None) -> str:
    """The dry-run report: what each adapter touches, output size and shards, and a memory estimate."""
    with prepare(config, allow_pickle) as prepared:
        return _describe(prepared, device, chunk_rows, max_memory, workers)


def _describe(prepared: PreparedMerge, device: str | torch.device, chunk_rows: int | None,
              max_memory: int | str | None, workers: int | None) -> str:
    config, plan = prepared.config, prepared.plan
    engine = engine_for(prepared, resolve_device(device), chunk_rows, max_memory, workers)
    options = engine.options
    peak_chunk = max((engine.working_set_bytes(tensor) for tensor in plan.tensors), default=0)
    kind = output_kind(config)
    layout = kind.layout(engine)
    shards = shard_layout(layout, kind.shard_size(config))
    touched_any = sum(1 for t in plan.tensors if t.touched)
    lines = [
        f"plan: {config.merge_method.display_name} ({config.method}) of {_inputs_phrase(config)} into "
        f"{prepared.base.folder}",
        f"  parameters: {config.global_params}  seed: {config.seed}",
    ]
    for spec, adapter, names, own in zip(config.inputs, plan.adapters, plan.touched_by, config.adapter_params):
        extra = f" {own}" if own else ""
        weight = f"{spec.weight:g}" if isinstance(spec.weight, float) else str(spec.weight)
        what = "model" if isinstance(adapter, FullModel) else "adapter"
        lines.append(f"  {what} '{adapter.label}' weight {weight}{extra}: {adapter.describe()}; "
                     f"touches {len(names)} tensor(s)")
        for name in names:
            lines.append(f"    {name}")
    lines += [
        f"  base tensors: {len(plan.tensors)} ({touched_any} touched, {len(plan.tensors) - touched_any} copied as is)",
        f"  output: {config.output_path}{_format_line(config)} ({format_size(sum(t.nbytes for t in layout))} in "
        f"{len(shards)} file(s), dtype {config.output.dtype or ('float32' if kind.name == 'peft' else 'as base')})",
        f"  memory: device {options.device}"
        f"{f', {options.workers} workers' if options.device.type == 'cpu' else ''}, working set up to {format_size(peak_chunk)} per tensor "
        f"(budget {format_size(options.max_memory)}{', forced ' + str(chunk_rows) + ' rows' if chunk_rows else ''})",
    ]
    method = config.merge_method
    if options.device.type == "cpu" and method.phase.combines_chunks:
        lines.append(f"  cpu kernels: {kernels.describe() if method.phase.kernel else 'torch'}")
    if method.calibrated is not None and method.calibrated.describe is not None:  # its own work, said by itself
        lines += method.calibrated.describe(prepared)
    elif method.phase.factors_from_inputs:
        lines += _core_lines(engine)
    lines.append("  dry run: nothing written")
    return "\n".join(lines)


def _inputs_phrase(config: MergeConfig) -> str:
    """'3 adapter(s)', '2 full model(s)' or both."""
    parts = [f"{len(config.adapters)} adapter(s)"] if config.adapters else []
    parts += [f"{len(config.models)} full model(s)"] if config.models else []
    return " and ".join(parts)


def _format_line(config: MergeConfig) -> str:
    """How an adapter output is written (checkpoints say nothing more)."""
    if config.output.format != "peft":
        return ""
    method = config.merge_method
    if config.output.rank is None:
        return " as one PEFT adapter, exact factors"
    if method.phase.combines_chunks:  # a full-rank delta
        return (f" as one PEFT adapter at rank {config.output.rank}: a seeded randomized SVD of each tensor's whole "
                "delta (one tensor's delta held at a time)")
    return f" as one PEFT adapter at rank {config.output.rank}: the Eckart–Young cut of each factored delta's core"


def _core_lines(engine: MergeEngine) -> list[str]:
    """Per merged tensor, the core a factored method works in: R = Σ rᵢ, and its decompositions (never m×n)."""
    lines = ["  factored: per tensor, thin QRs of the m×R and n×R stacked factors, then SVDs of R×R cores "
             "(float64); the delta L·R is streamed like task arithmetic"]
    for schedule in engine.schedules:
        if schedule.action != "merge":
            continue
        info = schedule.plan.info
        ranks = [item.module.rank for i in schedule.active for item in schedule.plan.by_adapter[i]
                 if isinstance(item, LowRank)]
        shape = "x".join(map(str, info.shape))
        work = f"core R={sum(ranks)} ({len(ranks)} adapter(s))" if ranks else "1-D: mean of the adapters' shifts"
        lines.append(f"    {schedule.name} [{shape}]: {work}")
    return lines


def engine_for(prepared: PreparedMerge, device: torch.device, chunk_rows: int | None,
               max_memory: int | str | None, workers: int | None = None) -> MergeEngine:
    """The engine for a prepared merge (no I/O until it runs); `merge sweep` drives it tensor by tensor."""
    config = prepared.config
    options = EngineOptions(
        device=device,
        chunk_rows=chunk_rows,
        max_memory=parse_size(max_memory) if max_memory is not None else DEFAULT_MAX_MEMORY,
        workers=workers or default_workers(),
    )
    method, weights, params, adapter_params = config.merge_method, config.weights, config.global_params, config.adapter_params
    if getattr(config.merge_method.phase, "weights_apart", False):  # NuSLERP, Multi-SLERP read wᵢ themselves
        weights, params = weights_apart(weights, params)
    if prepared.calibrated is not None:  # learned / regmean: the calibration's weights (and phase)
        method, weights, params, adapter_params = prepared.calibrated.streamed(method, params, adapter_params)
    return MergeEngine(prepared.plan, prepared.base, method, weights, params,
                       adapter_params, config.seed, options)


def _hub_inputs(config: MergeConfig, prepared: PreparedMerge) -> list[tuple[str, Path]]:
    """The inputs that were Hub ids, as resolved local folders (the local ones were checked before opening)."""
    folders = [("the base model", config.base_model, prepared.base.folder)]
    folders += [(f"input '{a.label}'", spec.path, a.folder) for spec, a in zip(config.inputs, prepared.adapters)]
    return [(what, folder) for what, ref, folder in folders if hub_reference(config, ref) is not None]
