"""The merged tensors of a `merge run` output against its base, measured under each quantization format.

A checkpoint output gives W + ΔW directly (ΔW = merged − base, both as stored). A PEFT-format output (a merged
adapter) gives ΔW from its factors, s·B·A (transposed for Conv1D / embeddings, decided from the base tensor's
shape); W + ΔW is then what merging it into the base stores: the sum rounded to the base's dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError, NotACheckpointError
from ..progress import byte_progress
from ..sources.adapter import CONFIG_FILE as ADAPTER_CONFIG
from ..sources.adapter import PeftAdapter
from ..writers.output_files import CONFIG_COPY
from ..sources.checkpoint import COPY_BLOCK, BaseCheckpoint
from .formats import QuantFormat
from .measure import MAX_MEMORY, Figures, aligned_chunk_rows, measure_tensor

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class TensorResult:
    """One merged tensor: where it sits, and its figures under each format that could quantize it."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    module: str
    figures: dict[str, Figures]


@dataclass
class MergeQuantization:
    """Every measured tensor of one merge output, and what was left out and why."""

    output: Path
    base: Path
    kind: str  # "checkpoint" or "peft"
    formats: list[QuantFormat]
    tensors: list[TensorResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why)


def layer_and_module(name: str) -> tuple[int | None, str]:
    """(layer index, module path after it) of a tensor name: model.layers.3.mlp.down_proj.weight -> (3, mlp.down_proj)."""
    stem = name.removesuffix(".weight")
    match = _LAYER.search(stem)
    if not match:
        return None, stem
    return int(match.group(1)), stem[match.end():] or stem


def recorded_base(output: Path) -> Path:
    """The base model the output's config copy names, as a local folder (else the user must give --base)."""
    import yaml

    path = output / CONFIG_COPY
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        raise InputError(f"{output}: no {CONFIG_COPY}, so its base is unknown; give --base BASE") from None
    except yaml.YAMLError:
        raise InputError(f"{path}: not valid YAML; give --base BASE") from None
    base = data.get("base_model") if isinstance(data, dict) else None
    if not isinstance(base, str):
        raise InputError(f"{path}: names no base_model; give --base BASE")
    recorded_output = (data.get("output") or {}).get("path") if isinstance(data.get("output"), dict) else None
    folder = Path(base).expanduser()
    candidates = [folder] if folder.is_absolute() else [
        c for c in (_beside_config(output, folder, recorded_output), Path.cwd() / folder) if c is not None]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError(f"{path}: its base_model {base} is not a local folder here; give --base BASE")


def _beside_config(output: Path, base: Path, recorded_output: object) -> Path | None:
    """The base, when relative paths in the config copy are relative to the config's folder: that folder is
    where the recorded output.path leads to `output`, so the base is found from the same ancestor."""
    if not isinstance(recorded_output, str) or Path(recorded_output).is_absolute():
        return None
    out_parts, base_parts = Path(recorded_output).parts, base.parts
    ups = len(out_parts) - len(tail := [p for p in out_parts if p != ".."])
    resolved = output.resolve()
    if out_parts[:ups] != ("..",) * ups or ".." in tail or resolved.parts[-len(tail):] != tuple(tail):
        return None
    ancestor = Path(*resolved.parts[:-len(tail)]) if tail else resolved  # the config folder's ups-th parent
    base_ups = len(base_parts) - len(base_tail := [p for p in base_parts if p != ".."])
    if base_parts[:base_ups] != ("..",) * base_ups or base_ups < ups:
        return None  # the config's own folder name is not recorded: found only when the ".." cancel it
    return ancestor.joinpath(*([".."] * (base_ups - ups)), *base_tail)


def output_kind(output: Path) -> str:
    """"peft" for a merged adapter, "checkpoint" for a merged model; NotACheckpointError for anything else."""
    if not output.is_dir():
        raise NotACheckpointError(f"{output}: not a folder (give the output folder of `merge run`)")
    if (output / ADAPTER_CONFIG).is_file() and not (output / "config.json").is_file():
        return "peft"
    if any(output.glob("*.safetensors")):
        return "checkpoint"
    raise NotACheckpointError(f"{output}: holds no safetensors checkpoint or PEFT adapter, so it is not a merge "
                              "output; give the output folder of `merge run`")


def measure_merge(output: Path, base: Path, formats: Sequence[QuantFormat], *, max_memory: int = MAX_MEMORY,
                  progress: bool = False) -> MergeQuantization:
    """Measure every 2-D tensor the merge changed, under every format that can quantize it."""
    kind = output_kind(output)
    result = MergeQuantization(output, base, kind, list(formats))
    try:
        base_checkpoint = BaseCheckpoint(base)
    except CheckpointError as error:
        raise InputError(f"--base: {error}") from None
    with base_checkpoint:
        if kind == "peft":
            _measure_adapter(output, base_checkpoint, result, max_memory, progress)
        else:
            _measure_checkpoint(output, base_checkpoint, result, max_memory, progress)
    if not result.tensors:
        reasons = "; ".join(f"{name}: {why}" for name, why in result.skipped[:3])
        raise InputError(f"{output}: no quantizable tensor differs from the base {base}, so there is no merged "
                         f"change to measure (is it a merge of this base?){' (' + reasons + ')' if reasons else ''}")
    return result


def _fitting(name: str, shape: tuple[int, ...], formats: Sequence[QuantFormat],
             skipped: list[tuple[str, str]]) -> list[QuantFormat]:
    fitting = []
    for fmt in formats:
        why = fmt.unfit(shape)
        if why is None:
            fitting.append(fmt)
        elif len(shape) == 2:
            skipped.append((name, f"{fmt.name}: {why}"))
    return fitting


def _measure_checkpoint(output: Path, base: BaseCheckpoint, result: MergeQuantization, max_memory: int,
                        progress: bool) -> None:
    try:
        merged = BaseCheckpoint(output)
    except CheckpointError as error:
        raise NotACheckpointError(f"{output}: not a readable merge output ({error})") from None
    with merged:
        candidates = [info for info in merged if len(info.shape) == 2 and info.dtype in ("F32", "F16", "BF16")]
        bar = byte_progress(sum(i.nbytes for i in candidates), progress, "quantizing")
        try:
            for info in candidates:
                bar.update(info.nbytes)
                if info.name not in base:
                    result.skipped.append((info.name, "not in the base"))
                    continue
                if tuple(base.info(info.name).shape) != tuple(info.shape):
                    raise InputError(f"{output}: tensor '{info.name}' has shape {tuple(info.shape)} but the base's has "
                                     f"{tuple(base.info(info.name).shape)}; is {output} a merge of {base.folder}?")
                if _identical(base, merged, info.name):  # no part of the merge's change: not quantized at all
                    continue
                fitting = _fitting(info.name, tuple(info.shape), result.formats, result.skipped)
                if not fitting:
                    continue
                name = info.name
                figures = measure_tensor(lambda a, b, n=name: base.read_rows(n, a, b),
                                         lambda a, b, n=name: merged.read_rows(n, a, b), info.shape, fitting,
                                         aligned_chunk_rows(info.shape[1], fitting, max_memory))
                _keep(result, name, tuple(info.shape), figures)
        finally:
            bar.close()


def _identical(base: BaseCheckpoint, merged: BaseCheckpoint, name: str) -> bool:
    """Whether a merged tensor holds the very bytes of the base's (compared a block at a time, never decoded)."""
    ours, theirs = merged.info(name), base.info(name)
    if ours.dtype != theirs.dtype or ours.nbytes != theirs.nbytes:
        return False
    for offset in range(0, ours.nbytes, COPY_BLOCK):
        length = min(COPY_BLOCK, ours.nbytes - offset)
        if merged.read_bytes(name, offset, length) != base.read_bytes(name, offset, length):
            return False
    return True


def _measure_adapter(output: Path, base: BaseCheckpoint, result: MergeQuantization, max_memory: int,
                     progress: bool) -> None:
    from ..engine.plan import CONV1D_MODEL_TYPES, lora_target  # the merge's own mapping rule, reused

    conv1d_model = str((base.read_json("config.json") or {}).get("model_type", "")) in CONV1D_MODEL_TYPES
    with PeftAdapter(output, output.name) as adapter:
        for name in adapter.full_tensors:
            result.skipped.append((name, "a full tensor saved by the adapter (modules_to_save): not measured"))
        modules = sorted(adapter.modules.values(), key=lambda m: m.module)
        bar = byte_progress(len(modules), progress, "quantizing")
        try:
            for module in modules:
                bar.update(1)
                try:
                    info, transposed = lora_target(base, adapter, module, conv1d_model)
                except InputError as error:
                    raise InputError(f"{output}: {error}") from None
                name = info.name
                if module.magnitude_key is not None:
                    result.skipped.append((name, "a DoRA module: its merged weight is not W + s·B·A; not measured"))
                    continue
                shape = tuple(info.shape)
                fitting = _fitting(name, shape, result.formats, result.skipped)
                if not fitting:
                    continue
                b = adapter.tensor(module.b_key).to(torch.float64) * module.scale
                a = adapter.tensor(module.a_key).to(torch.float64)
                # ΔW = s·B·A, or its transpose for Conv1D and embeddings (lora_embedding_A is (r, vocab))
                left, right = (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)
                dtype = base.read_rows(name, 0, 1).dtype

                def delta_rows(start: int, stop: int, left: torch.Tensor = left, right: torch.Tensor = right
                               ) -> torch.Tensor:
                    return left[start:stop] @ right

                def merged_rows(start: int, stop: int, n: str = name, delta=delta_rows, dtype=dtype) -> torch.Tensor:
                    return (base.read_rows(n, start, stop).to(torch.float64) + delta(start, stop)).to(dtype)

                figures = measure_tensor(lambda s, e, n=name: base.read_rows(n, s, e), merged_rows, shape, fitting,
                                         aligned_chunk_rows(shape[1], fitting, max_memory), rows_of_delta=delta_rows)
                _keep(result, name, shape, figures)
        finally:
            bar.close()


def _keep(result: MergeQuantization, name: str, shape: tuple[int, ...], figures: dict[str, Figures]) -> None:
    """Record a tensor the merge changed (ΔW ≠ 0); an unchanged one is no part of the merge's change."""
    if next(iter(figures.values())).delta_sq == 0.0:
        return
    layer, module = layer_and_module(name)
    result.tensors.append(TensorResult(name, shape, layer, module, figures))
