"""A lazy reader of a base checkpoint: one model.safetensors or shards + model.safetensors.index.json.

Only headers are read up front; tensors are read a row range at a time, or copied as raw bytes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats.safetensors import (
    DTYPE_NAMES,
    INDEX_FILE,
    ITEM_SIZES,
    SINGLE_FILE,
    TORCH_DTYPES,
    FormatError,
    TensorInfo,
    pread_into,
    read_index,
    read_tensors,
)
from .files import dangling, inside_folder, load_pickled

__all__ = ["COPY_BLOCK", "INDEX_FILE", "PICKLED_INDEX", "SINGLE_FILE", "BaseCheckpoint", "TensorInfo"]

PICKLED_INDEX = "pytorch_model.bin.index.json"
COPY_BLOCK = 8 * 1024 * 1024


class BaseCheckpoint:
    """The base model folder: tensor layout from headers, lazy row reads, raw byte copies."""

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = folder
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, int] = {}
        self._opening = threading.Lock()
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._weight_map: dict[str, str] = {}
        if not folder.is_dir():
            raise CheckpointError(f"base model folder not found: {folder}")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._index_file(file)
        self._check_weight_map()

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            return self._indexed_files(index)
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return [inside_folder(self.folder, SINGLE_FILE, single)]
        loose = sorted(self.folder.glob("*.safetensors"))
        if len(loose) == 1:
            return [inside_folder(self.folder, loose[0].name, loose[0])]
        pickled = self._pickled_files()
        if pickled and not self.allow_pickle:
            raise CheckpointError(
                f"{self.folder} holds only pickled weights ({pickled[0].name}); mergekit_lite never unpickles "
                "files by default, since a pickle can run code. Convert the base to safetensors (load it once with "
                "transformers and save_pretrained(..., safe_serialization=True)), or, if you trust the file, pass "
                "--allow-pickle (it is then loaded with torch.load(weights_only=True))."
            )
        if pickled:
            return [inside_folder(self.folder, path.name, path) for path in pickled]
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in base model folder {self.folder}"
                              f"{dangling(single) or dangling(index)}")

    def _pickled_files(self) -> list[Path]:
        """Pickled weight files, in the usual names (looked at only to refuse them, or with allow_pickle)."""
        index = self.folder / PICKLED_INDEX
        if index.is_file():
            return self._indexed_files(index)
        for name in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (self.folder / name).is_file():
                return [self.folder / name]
        return sorted(self.folder.glob("pytorch_model-*.bin"))

    def _indexed_files(self, index: Path) -> list[Path]:
        """The shards an index names, each checked to be a plain file inside the model folder."""
        try:
            weight_map = read_index(index).weight_map
        except FormatError as error:
            what = f"not a valid weights index ({error})" if error.__cause__ else str(error)
            raise CheckpointError(f"{index}: {what}") from None
        files = []
        for name in dict.fromkeys(weight_map.values()):
            path = inside_folder(self.folder, name, self.folder / name, where=f"{index}: shard")
            if not path.is_file():
                raise CheckpointError(f"{index}: names shard '{name}', which does not exist in {self.folder}")
            files.append(path)
        self._weight_map = weight_map
        return files

    def _index_file(self, file: Path) -> None:
        if file.suffix != ".safetensors":
            self._index_pickled(file)
            return
        try:
            tensors, _ = read_tensors(file)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
        for info in sorted(tensors.values(), key=lambda t: t.offset):
            self._add(info)

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise CheckpointError(
                f"tensor '{info.name}' appears in two shards: {self.tensors[info.name].file.name}, {info.file.name}"
            )
        self.tensors[info.name] = info

    def _check_weight_map(self) -> None:
        """Every tensor the index names must be in the shard it names (a stale index is a broken model)."""
        for name, shard in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != Path(shard).name:
                where = f"is in {info.file.name}" if info else "is in no shard"
                raise CheckpointError(f"{self.folder / INDEX_FILE}: says tensor '{name}' is in {shard}, but it {where}")

    def _index_pickled(self, file: Path) -> None:
        """Register the tensors of a pickled shard (only reached with allow_pickle)."""
        tensors = load_pickled(file, CheckpointError)
        self._pickled[file] = tensors
        for name, tensor in tensors.items():
            dtype = DTYPE_NAMES.get(tensor.dtype)
            if dtype is None:
                raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}, which cannot be stored")
            nbytes = tensor.numel() * ITEM_SIZES[dtype]
            self._add(TensorInfo(name, dtype, tuple(tensor.shape), nbytes, file))

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """What is known of tensor `name` before reading it: dtype, shape, size, file and offset."""
        return self.tensors[name]

    def read_rows(self, name: str, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, as stored: a fresh CPU tensor, or a view of `scratch` (a uint8 buffer
        of at least the rows' bytes, reused by the caller) when given."""
        info = self.tensors[name]
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {info.dtype}, which cannot be merged")
        # plain positional reads, not mmap: mapped pages would count in our RSS; pread is thread-safe
        size = (stop - start) * info.row_bytes
        buffer = torch.empty(size, dtype=torch.uint8) if scratch is None else scratch[:size]
        self._read_into(info, start * info.row_bytes, memoryview(buffer.numpy()))
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return buffer.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def read_bytes(self, name: str, offset: int, length: int) -> bytearray:
        """Stored bytes [offset, offset + length) of a tensor, undecoded (for raw copies)."""
        info = self.tensors[name]
        buffer = bytearray(length)
        self._read_into(info, offset, memoryview(buffer))
        return buffer

    def stored_raw(self, name: str) -> bool:
        """True when a tensor's bytes lie in a file as stored (safetensors), so `stored_range` can hand them out."""
        return self.tensors[name].file not in self._pickled

    def stored_range(self, name: str) -> tuple[int, int] | None:
        """(open file descriptor, offset in the file) of a tensor's stored bytes, for a copy by the kernel; None
        when it is not stored as raw bytes in a file (pickled weights)."""
        info = self.tensors[name]
        if info.file in self._pickled:
            return None
        return self._descriptor(info), info.offset

    def _descriptor(self, info: TensorInfo) -> int:
        descriptor = self._handles.get(info.file)
        if descriptor is None:
            with self._opening:  # reads run in several threads: one descriptor per file, none left open twice
                descriptor = self._handles.get(info.file)
                if descriptor is None:
                    descriptor = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        return descriptor

    def _read_into(self, info: TensorInfo, offset: int, view: memoryview) -> None:
        if info.file in self._pickled:
            flat = self._pickled[info.file][info.name].contiguous().reshape(-1).view(torch.uint8)
            view[:] = memoryview(flat[offset:offset + len(view)].numpy())
            return
        if pread_into(self._descriptor(info), info.offset + offset, view) != len(view):
            raise CheckpointError(f"{info.file}: truncated while reading tensor '{info.name}'")

    def close(self) -> None:
        """Close the file descriptors opened for reading (idempotent)."""
        for descriptor in self._handles.values():
            os.close(descriptor)
        self._handles.clear()

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_json(self, filename: str) -> dict | None:
        """A JSON file of the base folder (config.json, ...) or None when absent."""
        path = self.folder / filename
        if dangling(path):  # not absent: a broken link would silently drop the file from the output
            raise CheckpointError(f"{path}: cannot be read{dangling(path)}")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from None
