"""The safetensors file layout, which we read (for raw copies) and write (streamed) ourselves.

A file is: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the tensor bytes. Knowing the layout lets us copy untouched tensors without decoding them and write
shards whose tensors arrive one row chunk at a time.

The one vocabulary every reader and writer shares: `DTYPES` (safetensors code, item size, torch dtype, config
name; `TORCH_DTYPES`, `DTYPE_NAMES`, `ITEM_SIZES` and `FLOAT_DTYPES` are views of it), `TensorInfo` (one tensor
of a layout, stored or planned), `read_header`/`read_tensors` (a checked file header) and `read_index` (a
sharded checkpoint's index).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its code in headers, its item size, and what it is to torch and to a merge config."""

    code: str
    item_size: int
    #: the torch dtype it is read as; None where we read no torch dtype (unsigned ints over 8 bits)
    torch_dtype: torch.dtype | None = None
    #: significand bits of a floating type (its precision, for ordering); None for integers and bool
    significand: int | None = None
    #: a float adapters may change and the output may be cast to (8-bit floats are copied as they are)
    mergeable: bool = False
    #: its name as `output.dtype` in a merge config, for the dtypes a merge may write
    config_name: str | None = None


#: every dtype a safetensors header may name, in the order error messages list them
DTYPES: dict[str, DType] = {d.code: d for d in (
    DType("F64", 8, torch.float64, significand=52, mergeable=True),
    DType("F32", 4, torch.float32, significand=23, mergeable=True, config_name="float32"),
    DType("F16", 2, torch.float16, significand=10, mergeable=True, config_name="float16"),
    DType("BF16", 2, torch.bfloat16, significand=7, mergeable=True, config_name="bfloat16"),
    DType("I64", 8, torch.int64),
    DType("I32", 4, torch.int32),
    DType("I16", 2, torch.int16),
    DType("I8", 1, torch.int8),
    DType("U8", 1, torch.uint8),
    DType("BOOL", 1, torch.bool),
    DType("F8_E4M3", 1, torch.float8_e4m3fn, significand=3),
    DType("F8_E5M2", 1, torch.float8_e5m2, significand=2),
    DType("U16", 2),
    DType("U32", 4),
    DType("U64", 8),
)}
# Views of DTYPES under the names the engine and the readers use.
#: code -> torch dtype, for the codes torch can read
TORCH_DTYPES: dict[str, torch.dtype] = {code: d.torch_dtype for code, d in DTYPES.items() if d.torch_dtype is not None}
#: torch dtype -> code
DTYPE_NAMES: dict[torch.dtype, str] = {torch_dtype: code for code, torch_dtype in TORCH_DTYPES.items()}
#: code -> bytes per element
ITEM_SIZES: dict[str, int] = {code: d.item_size for code, d in DTYPES.items()}
#: the floats the merge computes with, merges into and may cast to
FLOAT_DTYPES: set[str] = {code for code, d in DTYPES.items() if d.mergeable}
MAX_HEADER = 100 * 1024 * 1024
#: the file names of a Hugging Face safetensors checkpoint: one file, or shards listed by an index
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def dtype_code(config_name: str | None) -> str | None:
    """The safetensors code of a config's `output.dtype` ("bfloat16" -> "BF16"); None stays None (keep the base's)."""
    if not config_name:
        return None
    return {d.config_name: code for code, d in DTYPES.items() if d.config_name}[config_name]


def is_floating(code: str) -> bool:
    """Floating dtypes, the 8-bit ones included (they can hold NaN and Inf)."""
    return code in DTYPES and DTYPES[code].significand is not None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors layout: what it is, and for a stored tensor, where its bytes are.

    A tensor read from a file has `file` and `offset` (absolute position of its first byte); a tensor of an
    output layout, not yet written, has neither.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None
    offset: int = 0

    @property
    def rows(self) -> int:
        """Number of rows the engine may split the tensor into (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes per row in the stored dtype."""
        return self.nbytes // max(self.rows, 1)

    @property
    def cols(self) -> int:
        """Elements per row."""
        count = 1
        for size in self.shape[1:]:
            count *= size
        return count


class FormatError(ValueError):
    """A safetensors header or index that does not describe a readable file.

    Internal: every reader catches it and raises the error of its role (CheckpointError, AdapterError,
    IntegrityError) with the file's path, so it is never shown as it is.
    """


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (the checked JSON header, the absolute offset where tensor data starts) of a safetensors file.

    Everything a reader later trusts is checked here, against the file's real size: a known dtype, a shape of
    non-negative ints whose size matches the offsets, offsets inside the file and not overlapping.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise FormatError(f"file of {size} bytes is too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER:
            raise FormatError(f"header length {length} bytes is implausibly large (limit {MAX_HEADER})")
        if 8 + length > size:
            raise FormatError(f"header says {length} bytes but the file has only {size - 8} after the prefix "
                              "(truncated)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FormatError(f"header is not valid JSON ({str(error)[:120]})") from None
    check_header(header, size - 8 - length)
    return header, 8 + length


def read_tensors(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """(name -> tensor, in header order; the offset where tensor data starts) of a safetensors file.

    The header is checked by `read_header`; each tensor's `offset` is absolute, so the caller can pread it.
    """
    header, data_start = read_header(path)
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), end - begin, path, data_start + begin)
    return tensors, data_start


def check_header(header: Any, data_size: int) -> None:
    """Raise FormatError unless `header` is a well-formed safetensors header for `data_size` bytes of data."""
    if not isinstance(header, dict):
        raise FormatError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ must be an object of string values")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = _check_entry(name, entry, data_size)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, following) in zip(spans, spans[1:]):
        if begin < end:
            raise FormatError(f"tensors '{name}' and '{following}' overlap (offsets {end} > {begin})")


def _check_entry(name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """One tensor entry: dtype, shape and offsets, consistent with each other and inside the data."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise FormatError(f"tensor '{name}': entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise FormatError(f"tensor '{name}': unknown dtype {dtype!r} (known: {', '.join(ITEM_SIZES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise FormatError(f"tensor '{name}': data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise FormatError(f"tensor '{name}': data_offsets [{begin}, {end}] lie outside the {data_size} data bytes "
                          "(truncated file or corrupt header)")
    count = 1
    for dim in shape:
        count *= dim
    if count * ITEM_SIZES[dtype] != end - begin:
        raise FormatError(f"tensor '{name}': shape {shape} of {dtype} needs {count * ITEM_SIZES[dtype]} bytes but "
                          f"data_offsets span {end - begin}")
    return begin, end


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0 (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_header(tensors: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included, padded to 8) for tensors laid out in the given order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class SafetensorsIndex:
    """A sharded checkpoint's index (model.safetensors.index.json or its pickled twin), as parsed."""

    path: Path
    #: tensor name -> shard file name, as written (the caller checks the names stay inside the folder)
    weight_map: dict[str, str]
    #: metadata.total_size as written, or None when absent (any JSON value: the caller checks it)
    total_size: Any = None


def read_index(path: Path) -> SafetensorsIndex:
    """Parse a weights index: JSON with a `weight_map` of tensor name -> file name.

    Raises FormatError: with the parse failure as its `__cause__` when the file cannot be read as JSON with a
    `weight_map` key, without one when `weight_map` has the wrong type.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        weight_map = document["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise FormatError(f"{type(error).__name__}: {error}") from error
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError("'weight_map' must map tensor names to shard file names")
    metadata = document.get("metadata")
    return SafetensorsIndex(path, weight_map, metadata.get("total_size") if isinstance(metadata, dict) else None)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def pread_into(descriptor: int, position: int, view: memoryview) -> int:
    """Fill `view` from the file at `position` with positional reads (thread-safe, no mmap); bytes read."""
    filled = 0
    while filled < len(view):
        got = os.preadv(descriptor, [view[filled:]], position + filled)
        if not got:
            break
        filled += got
    return filled


class SafetensorsFile:
    """A safetensors file read a tensor or a row range at a time (adapter weights, the shards `merge verify` scans).

    Positional reads, not mmap: mapped pages would count in our RSS.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors, _ = read_tensors(path)
        self._descriptor = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header."""
        return self.tensors[name].shape

    def is_float(self, name: str) -> bool:
        """True for floating-point tensors (the only kind a LoRA factor can be)."""
        return self.tensors[name].dtype in FLOAT_DTYPES

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A tensor, or its rows [start, stop)."""
        info = self.tensors[name]
        if info.dtype not in TORCH_DTYPES:
            raise FormatError(f"{self.path}: tensor '{name}' has dtype {info.dtype}, which torch cannot read")
        first, last = (start or 0), (info.rows if stop is None else min(stop, info.rows))
        buffer = torch.empty(max(last - first, 0) * info.row_bytes, dtype=torch.uint8)
        if pread_into(self._descriptor, info.offset + first * info.row_bytes, memoryview(buffer.numpy())) \
                != buffer.numel():
            raise ValueError(f"{self.path}: truncated while reading tensor '{name}'")
        out_shape = (last - first, *info.shape[1:]) if info.shape else ()
        return buffer.view(TORCH_DTYPES[info.dtype]).reshape(out_shape)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
