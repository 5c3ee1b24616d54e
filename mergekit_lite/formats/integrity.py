"""Re-reading a written checkpoint: index and shards agree, headers are sane, files are complete.

A merge checks its staging folder with `check_written` before the atomic rename, so a short write or a
layout bug never reaches the target; `merge verify` and `merge publish` check finished folders with
`read_layout`. Only headers and file sizes are read here; `evaluation/verify.py` adds the checks that read tensor data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import IntegrityError, NotACheckpointError
from .safetensors import INDEX_FILE, SINGLE_FILE, FormatError, SafetensorsIndex, TensorInfo, read_index, read_tensors

__all__ = ["NotACheckpointError", "check_written", "read_layout", "read_shard"]


def read_shard(path: Path) -> dict[str, TensorInfo]:
    """A shard's tensors from its header, which must be sane and describe exactly the file's length."""
    try:
        tensors, data_start = read_tensors(path)
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path}: not a readable safetensors file ({error})") from None
    position = 0  # relative to the data start, as the header's data_offsets are
    for tensor in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        begin = tensor.offset - data_start
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise IntegrityError(f"{path}: tensor '{tensor.name}' {what} (data_offsets start {begin}, "
                                 f"expected {position})")
        position = begin + tensor.nbytes
    size = path.stat().st_size
    if size != data_start + position:
        state = "truncated" if size < data_start + position else "has trailing bytes"
        raise IntegrityError(f"{path}: {size} bytes but its header describes {data_start + position} ({state})")
    return tensors


def _read_index(folder: Path) -> SafetensorsIndex | None:
    """The folder's index, or None for a single-file checkpoint."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return read_index(path)
    except FormatError as error:
        detail = error.__cause__ or "weight_map must map tensor names to file names"
        raise IntegrityError(f"{path}: not a valid safetensors index ({detail})") from None


def read_layout(folder: Path) -> dict[str, dict[str, TensorInfo]]:
    """Shard file -> its tensors, after checking index and shards agree (no missing, stray or escaping file)."""
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    index = _read_index(folder)
    if index is None:
        if SINGLE_FILE not in present:
            raise NotACheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
        if len(present) > 1:
            raise IntegrityError(f"{folder}: {len(present)} safetensors files but no {INDEX_FILE}")
        return {SINGLE_FILE: read_shard(folder / SINGLE_FILE)}
    index_path, weight_map = index.path, index.weight_map
    named = sorted(set(weight_map.values()))
    root = folder.resolve()
    escaping = [name for name in named if not (folder / name).resolve().is_relative_to(root)]
    if escaping:
        tensor = next(t for t, shard in weight_map.items() if shard == escaping[0])
        raise IntegrityError(f"{index_path}: tensor '{tensor}' points outside the folder: '{escaping[0]}'")
    missing = [name for name in named if not (folder / name).is_file()]
    if missing:
        raise IntegrityError(f"{index_path}: names shard(s) that are not in the folder: {', '.join(missing)}")
    stray = [name for name in present if name not in named]
    if stray:
        raise IntegrityError(f"{folder}: safetensors file(s) the index does not name: {', '.join(stray)}")
    layout = {shard: read_shard(folder / shard) for shard in named}
    for shard, tensors in layout.items():
        listed = {name for name, file in weight_map.items() if file == shard}
        extra, absent = sorted(set(tensors) - listed), sorted(listed - set(tensors))
        if absent:
            raise IntegrityError(f"{index_path}: tensor '{absent[0]}' is not in {shard}, which the index names for it"
                                 f"{_more(absent)}")
        if extra:
            raise IntegrityError(f"{folder / shard}: tensor '{extra[0]}' is not in the index{_more(extra)}")
    total = sum(t.nbytes for tensors in layout.values() for t in tensors.values())
    if index.total_size is not None and index.total_size != total:
        raise IntegrityError(f"{index_path}: total_size {index.total_size} but the shards hold {total} bytes "
                             "of tensors")
    return layout


def check_written(folder: Path, expected: Sequence[TensorInfo]) -> None:
    """Re-read the shards just written and prove they hold exactly `expected` (names, dtypes, shapes, sizes)."""
    layout = read_layout(folder)
    where = {name: (shard, tensor) for shard, tensors in layout.items() for name, tensor in tensors.items()}
    for want in expected:
        if want.name not in where:
            raise IntegrityError(f"{folder}: tensor '{want.name}' of the plan is in no shard")
        shard, got = where.pop(want.name)
        if got.dtype != want.dtype:
            raise IntegrityError(f"{folder / shard}: tensor '{want.name}' is {got.dtype}, the plan says {want.dtype}")
        if got.shape != tuple(want.shape):
            raise IntegrityError(f"{folder / shard}: tensor '{want.name}' has shape {list(got.shape)}, "
                                 f"the plan says {list(want.shape)}")
        if got.nbytes != want.nbytes:
            raise IntegrityError(f"{folder / shard}: tensor '{want.name}' holds {got.nbytes} bytes, "
                                 f"the plan says {want.nbytes}")
    if where:
        name, (shard, _) = next(iter(where.items()))
        raise IntegrityError(f"{folder / shard}: tensor '{name}' is not in the plan{_more(list(where))}")


def _more(names: Sequence[str]) -> str:
    """' (and N more)' when a fault repeats, so one line still says how widespread it is."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
