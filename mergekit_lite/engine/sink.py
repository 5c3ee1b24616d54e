"""Where the engine's output goes: the protocol it writes to, not a writer it knows.

The engine streams each tensor as `begin(name)` then its bytes in order (`write`), row chunk by row chunk in the
output dtype. `merge run` hands it the sharded safetensors writer (writers.checkpoint.ShardedWriter, a
`FileSink`: it can also copy an untouched tensor's bytes file to file); `merge sweep` hands `merge_into` an
in-memory collector (sweep.memory), which is a `TensorSink` only.
"""

from __future__ import annotations

from typing import Protocol


class TensorSink(Protocol):
    """Takes one tensor after another: `begin(name)`, then its bytes, in order, in one or more `write`s."""

    def begin(self, name: str) -> None:
        """The next tensor starts (the caller writes tensors in the order the sink expects)."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the current tensor (the caller may reuse `data`'s buffer once this returns)."""
        ...


class FileSink(TensorSink, Protocol):
    """A sink backed by files: it can copy a byte range of an open file, and counts what it wrote."""

    bytes_written: int

    def copy(self, descriptor: int, offset: int, length: int) -> None:
        """The next `length` bytes of the current tensor are bytes [offset, offset + length) of `descriptor`."""
        ...
