"""Untouched tensors are copied file to file by the writer thread (copy_file_range, or its own buffer where the
kernel refuses): the same bytes either way, errors surface as before, no descriptor is left open."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mergekit_lite.writers import checkpoint
from mergekit_lite.writers.checkpoint import BackgroundFile, FileRange


def _copy_through(tmp_path: Path, source: bytes, offset: int, length: int) -> bytes:
    (tmp_path / "source").write_bytes(source)
    descriptor = os.open(tmp_path / "source", os.O_RDONLY)
    out = BackgroundFile(tmp_path / "out")
    out.write(b"head")
    out.write(FileRange(descriptor, offset, length))
    out.write(b"tail")
    out.close()
    with pytest.raises(OSError):
        os.fstat(descriptor)  # the writer closed the descriptor it was handed
    return (tmp_path / "out").read_bytes()


@pytest.mark.parametrize("refusal", [None, errno.EXDEV, errno.ENOSYS, errno.EINVAL])
def test_a_range_lands_between_the_buffers_whether_or_not_the_kernel_copies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int | None
) -> None:
    source = os.urandom(3 * checkpoint._FALLBACK_BLOCK // 2 + 17)
    if refusal is not None:
        def refuse(*_args: object) -> int:
            raise OSError(refusal, os.strerror(refusal))
        monkeypatch.setattr(os, "copy_file_range", refuse)
    assert _copy_through(tmp_path, source, 5, len(source) - 9) == b"head" + source[5:-4] + b"tail"


def test_a_short_source_is_an_error_not_a_short_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="ended early"):
        _copy_through(tmp_path, b"x" * 100, 50, 100)


def test_a_full_disk_during_a_kernel_copy_is_the_write_error(tmp_path: Path) -> None:
    (tmp_path / "source").write_bytes(b"y" * (1 << 20))
    descriptor = os.open(tmp_path / "source", os.O_RDONLY)
    out = BackgroundFile(Path("/dev/full"))
    out.write(FileRange(descriptor, 0, 1 << 20))
    with pytest.raises(OSError) as raised:
        out.close()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/dev/full"
