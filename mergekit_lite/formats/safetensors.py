"""The safetensors file layout, which we read (for raw copies) and write (streamed) ourselves.

A file is: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the tensor bytes. Knowing the layout lets us copy untouched tensors without decoding them and write
shards whose tensors arrive one row chunk at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
ITEM_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER = 100 * 1024 * 1024


class HeaderError(ValueError):
    """A safetensors header that does not describe a readable file (the caller adds which file and role)."""


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (the checked JSON header, the absolute offset where tensor data starts) of a safetensors file.

    Everything a reader later trusts is checked here, against the file's real size: a known dtype, a shape of
    non-negative ints whose size matches the offsets, offsets inside the file and not overlapping.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise HeaderError(f"file of {size} bytes is too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER:
            raise HeaderError(f"header length {length} bytes is implausibly large (limit {MAX_HEADER})")
        if 8 + length > size:
            raise HeaderError(f"header says {length} bytes but the file has only {size - 8} after the prefix "
                              "(truncated)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise HeaderError(f"header is not valid JSON ({str(error)[:120]})") from None
    check_header(header, size - 8 - length)
    return header, 8 + length


def check_header(header: Any, data_size: int) -> None:
    """Raise HeaderError unless `header` is a well-formed safetensors header for `data_size` bytes of data."""
    if not isinstance(header, dict):
        raise HeaderError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ must be an object of string values")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = _check_entry(name, entry, data_size)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, following) in zip(spans, spans[1:]):
        if begin < end:
            raise HeaderError(f"tensors '{name}' and '{following}' overlap (offsets {end} > {begin})")


def _check_entry(name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """One tensor entry: dtype, shape and offsets, consistent with each other and inside the data."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise HeaderError(f"tensor '{name}': entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise HeaderError(f"tensor '{name}': unknown dtype {dtype!r} (known: {', '.join(ITEM_SIZES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise HeaderError(f"tensor '{name}': data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise HeaderError(f"tensor '{name}': data_offsets [{begin}, {end}] lie outside the {data_size} data bytes "
                          "(truncated file or corrupt header)")
    count = 1
    for dim in shape:
        count *= dim
    if count * ITEM_SIZES[dtype] != end - begin:
        raise HeaderError(f"tensor '{name}': shape {shape} of {dtype} needs {count * ITEM_SIZES[dtype]} bytes but "
                          f"data_offsets span {end - begin}")
    return begin, end


def _is_count(value: Any) -> bool:
    """A JSON integer >= 0 (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included, padded to 8) for tensors laid out in the given order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


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
    """A small safetensors file read with positional reads, not mmap (mapped pages would count in our RSS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header, self._data_start = read_header(path)
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self._descriptor = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header."""
        return tuple(int(d) for d in self.entries[name]["shape"])

    def is_float(self, name: str) -> bool:
        """True for floating-point tensors (the only kind a LoRA factor can be)."""
        return self.entries[name]["dtype"] in FLOAT_DTYPES

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A tensor, or its rows [start, stop)."""
        entry = self.entries[name]
        if entry["dtype"] not in TORCH_DTYPES:
            raise HeaderError(f"{self.path}: tensor '{name}' has dtype {entry['dtype']}, which torch cannot read")
        shape = self.shape(name)
        begin, end = entry["data_offsets"]
        rows = shape[0] if shape else 1
        row_bytes = (end - begin) // max(rows, 1)
        first, last = (start or 0), (rows if stop is None else min(stop, rows))
        buffer = torch.empty(max(last - first, 0) * row_bytes, dtype=torch.uint8)
        if pread_into(self._descriptor, self._data_start + begin + first * row_bytes, memoryview(buffer.numpy())) \
                != buffer.numel():
            raise ValueError(f"{self.path}: truncated while reading tensor '{name}'")
        out_shape = (last - first, *shape[1:]) if shape else ()
        return buffer.view(TORCH_DTYPES[entry["dtype"]]).reshape(out_shape)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1
