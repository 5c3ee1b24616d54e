"""Sharded safetensors written as a stream: headers first (all shapes are known from the plan), then bytes.

`safetensors.save_file` needs every tensor of a shard in memory at once; writing the layout ourselves keeps
memory at one row chunk, whatever the model size.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..formats.safetensors import INDEX_FILE, SINGLE_FILE, TensorInfo, encode_header
from .failures import naming
from .pagecache import TrailingWriteback, worth_releasing

SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def shard_layout(tensors: list[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most `shard_size` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """HF names: model.safetensors alone, else model-0000k-of-0000n.safetensors."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


@dataclass(frozen=True)
class FileRange:
    """Bytes [offset, offset + length) of an open file (a descriptor the writer owns and closes), copied into the
    output by the kernel (copy_file_range) instead of through a buffer of ours."""

    descriptor: int
    offset: int
    length: int


#: copy_file_range's refusals that mean "not between these two files": the bytes then go through a buffer
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_FALLBACK_BLOCK = 8 * 1024 * 1024

Item = Union[bytes, bytearray, memoryview, FileRange]


#: bytes of output that may wait for the writer thread: enough to cover a sparsifying method's selection passes over
#: the next tensor (no output then), so the merge pass seldom blocks on the writer and the disk keeps writing
#: meanwhile (1.57B TIES: 4.2 s in process instead of 4.4–4.6 with two 2 MB chunks; +0.02 GB peak RSS measured).
#: Bytes, not chunks: a CUDA chunk can be tens of MB.
WRITE_BYTES = 32 * 2**20
#: chunks that may always wait, however large
WRITE_DEPTH = 2


def _size(data: Item) -> int:
    """Bytes a queued item holds in memory (a FileRange holds none)."""
    return 0 if isinstance(data, FileRange) else memoryview(data).nbytes


class BackgroundFile:
    """A file written by a background thread, so that disk writes overlap reading and computing.

    At most `queue_bytes` of buffers wait in the queue, or `depth` buffers when they are larger (bounded memory).
    A failed write (disk full, file size limit)
    stops the writing at once and surfaces, naming the file, on the caller's next call; the thread keeps
    draining the queue, so the caller never blocks on a dead writer. Buffers must not change after they are
    handed over (the engine never reuses an emitted chunk). With `release_cache`, the file's pages are written back
    as they come and dropped once on disk (pagecache.py: a large output does not flood the page cache).
    """

    def __init__(self, path: Path, depth: int = WRITE_DEPTH, release_cache: bool = False,
                 queue_bytes: int = WRITE_BYTES) -> None:
        self.path = path
        with naming(path):
            self._file = open(path, "wb")  # noqa: SIM115 - closed by the thread
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._depth, self._queue_bytes = depth, queue_bytes
        self._room = threading.Condition()
        self._waiting, self._waiting_bytes = 0, 0  # items handed over and not yet written
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._error: BaseException | None = None
        self._aborted = False
        self._trail = TrailingWriteback(self._file.fileno()) if release_cache else None
        self._position = 0  # bytes handed to the file so far
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                break
            if isinstance(data, FileRange):
                if self._error is None and not self._aborted:
                    self._attempt(self._copy, data)
                    self._position += data.length
                os.close(data.descriptor)
            elif self._error is None and not self._aborted:
                self._attempt(self._file.write, data)
                self._position += memoryview(data).nbytes
            if self._trail is not None and self._error is None and not self._aborted:
                self._trail.advance(self._position)
            with self._room:
                self._waiting -= 1
                self._waiting_bytes -= _size(data)
                self._room.notify()
        if self._trail is not None and self._error is None and not self._aborted:
            self._attempt(self._file.flush)
            self._trail.finish()
        self._attempt(self._file.close)

    def _copy(self, source: FileRange) -> None:
        """Append a range of another file: in the kernel where it can (no read into and write from a buffer of
        ours: ~0.1 s a GB less, and no page faults), else through one reused block."""
        done = 0
        if self._kernel_copy:
            self._file.flush()
            target = self._file.fileno()
            try:
                while done < source.length:
                    got = os.copy_file_range(source.descriptor, target, source.length - done, source.offset + done)
                    if got == 0:
                        raise OSError(errno.EIO, "the source ended early")
                    done += got
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                self._kernel_copy = False  # e.g. another file system, or a special file: buffers from here on
            self._file.seek(0, os.SEEK_END)  # the buffered file's idea of its position, after the kernel's writes
        while done < source.length:
            block = os.pread(source.descriptor, min(_FALLBACK_BLOCK, source.length - done), source.offset + done)
            if not block:
                raise OSError(errno.EIO, "the source ended early")
            self._file.write(block)
            done += len(block)

    def _attempt(self, action: Callable[..., object], *args: object) -> None:
        """Run a file operation in the thread, keeping the first error (with the file's name) for the caller."""
        try:
            with naming(self.path):
                action(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            if self._error is None:
                self._error = error

    def write(self, data: Item) -> None:
        """Queue bytes (or a FileRange) for writing (blocks while the queue is full: `queue_bytes`, or `depth` larger
        buffers); raise an earlier write's error."""
        if self._error is not None:
            raise self._error
        size = _size(data)
        with self._room:
            while self._waiting >= self._depth and self._waiting_bytes + size > self._queue_bytes:
                self._room.wait()  # the thread keeps draining after an error too: this always ends
            self._waiting += 1
            self._waiting_bytes += size
        self._queue.put(data)

    def close(self) -> None:
        """Flush everything queued, close the file, and raise any write error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is still queued, close the file, and stop the thread (after a failure elsewhere)."""
        self._aborted = True
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join()


class ShardedWriter:
    """Receives tensors in layout order, a chunk of bytes at a time, and writes shards plus the index."""

    def __init__(self, folder: Path, tensors: list[TensorInfo], shard_size: int) -> None:
        self.folder = folder
        self.shards = shard_layout(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self._queue = [(shard, tensor) for shard, members in enumerate(self.shards) for tensor in members]
        self._position = -1
        self._remaining = 0
        self._shard = -1
        self._file: BackgroundFile | None = None
        self.bytes_written = 0
        #: a large output is written back as it comes and dropped from the page cache (pagecache.py)
        self._release_cache = worth_releasing(sum(t.nbytes for t in tensors))

    def begin(self, name: str) -> None:
        """Start the next tensor of the layout; it must be `name`."""
        if self._remaining:
            raise RuntimeError(f"tensor '{self._queue[self._position][1].name}' is incomplete")
        self._position += 1
        shard, tensor = self._queue[self._position]
        if tensor.name != name:
            raise RuntimeError(f"writer expected tensor '{tensor.name}', got '{name}'")
        if shard != self._shard:
            self._open_shard(shard)
        self._remaining = tensor.nbytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes of the current tensor."""
        size = memoryview(data).nbytes
        if size > self._remaining:
            raise RuntimeError(f"too many bytes for tensor '{self._queue[self._position][1].name}'")
        assert self._file is not None
        self._file.write(data)
        self._remaining -= size
        self.bytes_written += size

    def copy(self, descriptor: int, offset: int, length: int) -> None:
        """Append bytes [offset, offset + length) of an open file to the current tensor, copied by the writer
        thread (from a duplicate of `descriptor`: the caller may close its own)."""
        if length > self._remaining:
            raise RuntimeError(f"too many bytes for tensor '{self._queue[self._position][1].name}'")
        assert self._file is not None
        duplicate = os.dup(descriptor)
        try:
            self._file.write(FileRange(duplicate, offset, length))
        except BaseException:
            os.close(duplicate)
            raise
        self._remaining -= length
        self.bytes_written += length

    def _open_shard(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = shard
        self._file = BackgroundFile(self.folder / self.names[shard], release_cache=self._release_cache)
        self._file.write(encode_header(self.shards[shard], {"format": "pt"}))

    def close(self) -> None:
        """Finish the last shard and write the index when there are several shards."""
        if self._remaining or self._position != len(self._queue) - 1:
            raise RuntimeError("the writer was closed before every tensor was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[k] for k, members in enumerate(self.shards) for t in members}
            total = sum(t.nbytes for members in self.shards for t in members)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with naming(self.folder / INDEX_FILE):
                (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the open file after a failure (the staging folder is removed by the caller)."""
        if self._file is not None:
            self._file.abort()
            self._file = None


def write_side_files(base_folder: Path, out_folder: Path, out_dtype: str | None) -> list[str]:
    """Copy config.json (dtype updated), generation_config.json and tokenizer files; return what was copied."""
    copied = []
    config_path = base_folder / "config.json"
    if config_path.is_file():
        config: dict[str, Any] = json.loads(config_path.read_text())
        if out_dtype:
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = out_dtype
        with naming(out_folder / "config.json"):
            (out_folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied.append("config.json")
    for name in SIDE_FILES:
        source = base_folder / name
        if source.is_file():
            with naming(out_folder / name):
                shutil.copyfile(source, out_folder / name)
            copied.append(name)
    return copied


def side_file_bytes(base_folder: Path) -> int:
    """Bytes `write_side_files` will copy from `base_folder` (for the free-space check)."""
    names = ("config.json", *SIDE_FILES)
    return sum((base_folder / name).stat().st_size for name in names if (base_folder / name).is_file())
