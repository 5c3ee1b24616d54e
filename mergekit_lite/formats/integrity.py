"""Re-reading a written checkpoint: index and shards agree, headers are sane, files are complete.

A merge checks its staging folder with `check_written` before the atomic rename, so a short write or a
layout bug never reaches the target; `merge verify` and `merge publish` check finished folders with
`read_layout`. Only headers and file sizes are read here; `evaluation/verify.py` adds the checks that read tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, IntegrityError
from ..sources.checkpoint import INDEX_FILE, SINGLE_FILE
from .safetensors import read_header

if TYPE_CHECKING:
    from ..writers.checkpoint import OutputTensor


class NotACheckpointError(InputError):
    """The folder holds no safetensors checkpoint at all (nothing to verify or publish)."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a shard's header describes it (offsets relative to the data start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.end - self.begin


def read_shard(path: Path) -> dict[str, StoredTensor]:
    """A shard's tensors from its header, which must be sane and describe exactly the file's length."""
    try:
        header, data_start = read_header(path)
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path}: not a readable safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {name: _entry(path, name, entry) for name, entry in header.items()}
    position = 0
    for tensor in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if tensor.begin != position:
            what = "overlaps the tensor before it" if tensor.begin < position else "leaves a gap before it"
            raise IntegrityError(f"{path}: tensor '{tensor.name}' {what} (data_offsets start {tensor.begin}, "
                                 f"expected {position})")
        position = tensor.end
    size = path.stat().st_size
    if size != data_start + position:
        state = "truncated" if size < data_start + position else "has trailing bytes"
        raise IntegrityError(f"{path}: {size} bytes but its header describes {data_start + position} ({state})")
    return tensors


def read_index(folder: Path) -> dict[str, str] | None:
    """The index's weight map (tensor -> shard file), or None for a single-file checkpoint."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"{path}: not a valid safetensors index ({error})") from None
    return weight_map


def read_layout(folder: Path) -> dict[str, dict[str, StoredTensor]]:
    """Shard file -> its tensors, after checking index and shards agree (no missing, stray or escaping file)."""
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    weight_map = read_index(folder)
    if weight_map is None:
        if SINGLE_FILE not in present:
            raise NotACheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
        if len(present) > 1:
            raise IntegrityError(f"{folder}: {len(present)} safetensors files but no {INDEX_FILE}")
        return {SINGLE_FILE: read_shard(folder / SINGLE_FILE)}
    index_path = folder / INDEX_FILE
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
    _check_total_size(index_path, layout)
    return layout


def check_written(folder: Path, expected: Sequence[OutputTensor]) -> None:
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


def _entry(path: Path, name: str, entry: Any) -> StoredTensor:
    """One header entry, already checked by read_header (known dtype, shape matching the offsets)."""
    begin, end = entry["data_offsets"]
    return StoredTensor(name, entry["dtype"], tuple(entry["shape"]), begin, end)


def _check_total_size(index_path: Path, layout: dict[str, dict[str, StoredTensor]]) -> None:
    """The index's metadata.total_size, when given, is the bytes of all tensors."""
    try:
        declared = json.loads(index_path.read_text()).get("metadata", {}).get("total_size")
    except (OSError, ValueError, AttributeError):
        declared = None
    total = sum(t.nbytes for tensors in layout.values() for t in tensors.values())
    if declared is not None and declared != total:
        raise IntegrityError(f"{index_path}: total_size {declared} but the shards hold {total} bytes of tensors")


def _more(names: Sequence[str]) -> str:
    """' (and N more)' when a fault repeats, so one line still says how widespread it is."""
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
