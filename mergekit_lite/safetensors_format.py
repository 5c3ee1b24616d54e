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


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (the JSON header, the absolute offset where tensor data starts) of a safetensors file."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("file too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER:
            raise ValueError(f"safetensors header of {length} bytes is implausibly large")
        raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("truncated safetensors header")
    return json.loads(raw), 8 + length


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

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A tensor, or its rows [start, stop)."""
        entry = self.entries[name]
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
