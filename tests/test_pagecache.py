"""The writer's page-cache release (writers/pagecache.py): advice only, so the same bytes with it or without it, the
advice follows the write position step by step, and a refusal switches it off without failing the write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergekit_lite.formats.safetensors import TensorInfo
from mergekit_lite.writers import pagecache
from mergekit_lite.writers.checkpoint import BackgroundFile, FileRange, ShardedWriter

STEP = 4096


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """4 KiB steps, and every posix_fadvise call recorded (and still made)."""
    monkeypatch.setattr(pagecache, "STEP", STEP)
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def write_pieces(out: BackgroundFile, source: Path, data: bytes) -> None:
    """Odd-sized writes, with a file-to-file copy in the middle (the copy_file_range path)."""
    out.write(data[:1000])
    out.write(memoryview(data)[1000:9000])
    out.write(bytearray(data[9000:20000]))
    descriptor = os.open(source, os.O_RDONLY)
    out.write(FileRange(descriptor, 20000, 13000))  # the writer closes it
    out.write(data[33000:])
    out.close()


def test_same_bytes_and_advice_in_steps(tmp_path: Path, small_steps: list[tuple[int, int, int]]) -> None:
    data = os.urandom(40000 + 123)
    source = tmp_path / "source"
    source.write_bytes(data)
    write_pieces(BackgroundFile(tmp_path / "released", release_cache=True), source, data)
    assert (tmp_path / "released").read_bytes() == data
    assert all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in small_steps)
    assert small_steps[-1] == (0, 0, os.POSIX_FADV_DONTNEED)  # at the end, the whole file: what is on disk goes
    steps = small_steps[:-1]
    assert all(length == STEP for _, length, _ in steps)
    full = len(data) // STEP
    kicked = list(range(0, full * STEP, STEP))
    dropped = list(range(0, (full - pagecache.LAG) * STEP, STEP))
    assert sorted(offset for offset, _, _ in steps) == sorted(kicked + dropped)  # each kicked, dropped LAG steps on


def test_off_by_default(tmp_path: Path, small_steps: list[tuple[int, int, int]]) -> None:
    data = os.urandom(40000)
    source = tmp_path / "source"
    source.write_bytes(data)
    write_pieces(BackgroundFile(tmp_path / "kept"), source, data)
    assert (tmp_path / "kept").read_bytes() == data and small_steps == []


def test_refused_advice_switches_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pagecache, "STEP", STEP)
    calls = []

    def refuse(*args: object) -> None:
        calls.append(args)
        raise OSError(22, "not here")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    data = os.urandom(40000)
    source = tmp_path / "source"
    source.write_bytes(data)
    write_pieces(BackgroundFile(tmp_path / "out", release_cache=True), source, data)
    assert (tmp_path / "out").read_bytes() == data and len(calls) == 1  # refused once, then never asked again


def test_only_outputs_over_a_quarter_of_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert not pagecache.worth_releasing(1 << 20)
    assert pagecache.worth_releasing(memory // 4 + 1)
    seen: list[int] = []
    monkeypatch.setattr("mergekit_lite.writers.checkpoint.worth_releasing", lambda total: seen.append(total) or False)
    ShardedWriter(tmp_path, [TensorInfo("a", "F32", (4, 4), 64, tmp_path / "x")], 1 << 30)
    assert seen == [64]  # the writer asks with the whole output's size
