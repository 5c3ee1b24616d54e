"""A lazy reader of a base checkpoint: one model.safetensors or shards + model.safetensors.index.json.

Only headers are read up front; tensors are read a row range at a time, or copied as raw bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..safetensors_format import ITEM_SIZES, TORCH_DTYPES, pread_into, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
COPY_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one base tensor lives and what it is, from the safetensors header alone."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    data_start: int
    nbytes: int

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


class BaseCheckpoint:
    """The base model folder: tensor layout from headers, lazy row reads, raw byte copies."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise CheckpointError(f"base model folder not found: {folder}")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._index_file(file)
        self._handles: dict[Path, int] = {}

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
            return [self.folder / f for f in files]
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return [single]
        loose = sorted(self.folder.glob("*.safetensors"))
        if len(loose) == 1:
            return loose
        pickled = [name for name in PICKLED if (self.folder / name).exists()] + [
            p.name for p in self.folder.glob("pytorch_model-*.bin")
        ]
        if pickled:
            raise CheckpointError(
                f"{self.folder} holds only pickled weights ({pickled[0]}); mergekit_lite never unpickles "
                "files it did not make. Convert the base to safetensors first (e.g. load it once with "
                "transformers and save_pretrained(..., safe_serialization=True))."
            )
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in base model folder {self.folder}")

    def _index_file(self, file: Path) -> None:
        try:
            header, data_start = read_header(file)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        )
        for name, entry in entries:
            if name in self.tensors:
                raise CheckpointError(f"tensor '{name}' appears in two shards: {self.tensors[name].file.name}, {file.name}")
            begin, end = entry["data_offsets"]
            shape = tuple(int(s) for s in entry["shape"])
            count = 1
            for size in shape:
                count *= size
            if entry["dtype"] not in ITEM_SIZES or count * ITEM_SIZES[entry["dtype"]] != end - begin:
                raise CheckpointError(f"{file.name}: tensor '{name}' has an inconsistent dtype/shape/offsets")
            self.tensors[name] = TensorInfo(name, file, entry["dtype"], shape, data_start + begin, end - begin)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """The header entry of tensor `name`."""
        return self.tensors[name]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, as stored (a fresh CPU tensor)."""
        info = self.tensors[name]
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}, which cannot be merged")
        # plain positional reads, not mmap: mapped pages would count in our RSS; pread is thread-safe
        buffer = torch.empty((stop - start) * info.row_bytes, dtype=torch.uint8)
        self._read_into(info, start * info.row_bytes, memoryview(buffer.numpy()))
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return buffer.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def read_bytes(self, name: str, offset: int, length: int) -> bytearray:
        """Stored bytes [offset, offset + length) of a tensor, undecoded (for raw copies)."""
        info = self.tensors[name]
        buffer = bytearray(length)
        self._read_into(info, offset, memoryview(buffer))
        return buffer

    def _read_into(self, info: TensorInfo, offset: int, view: memoryview) -> None:
        descriptor = self._handles.get(info.file)
        if descriptor is None:
            descriptor = os.open(info.file, os.O_RDONLY)
            self._handles[info.file] = descriptor
        if pread_into(descriptor, info.data_start + offset, view) != len(view):
            raise CheckpointError(f"{info.file}: truncated while reading tensor '{info.name}'")

    def close(self) -> None:
        """Close the file descriptors opened for reading (idempotent)."""
        for descriptor in self._handles.values():
            os.close(descriptor)
        self._handles.clear()

    def __del__(self) -> None:  # file descriptors go back when the checkpoint is dropped
        if "_handles" in self.__dict__:
            self.close()

    def read_json(self, filename: str) -> dict | None:
        """A JSON file of the base folder (config.json, ...) or None when absent."""
        path = self.folder / filename
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from None
