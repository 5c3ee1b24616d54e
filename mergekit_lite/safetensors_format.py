"""The safetensors file layout, which we read (for raw copies) and write (streamed) ourselves.

A file is: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the tensor bytes. Knowing the layout lets us copy untouched tensors without decoding them and write
shards whose tensors arrive one row chunk at a time.
"""

from __future__ import annotations

import json
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
