"""Keep freed chunk buffers in the heap instead of returning them to the OS after every op.

glibc serves allocations over its mmap threshold (128 kB, adapted at run time) with fresh mappings, so each
temporary of a cache-sized chunk costs hundreds of page faults; the sparsifying methods make dozens per
chunk. Raising the thresholds (as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would) makes them reuse
heap memory. Measured on the 492M benchmark: TIES 31.8 s → 21.0 s. No effect where glibc is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Iterator

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit
_TRIM_THRESHOLD = 256 * 2**20
_done = False
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tune_allocator() -> bool:
    """Apply the thresholds once per process; True when glibc accepted them."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
    ok = bool(mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and ok
    ok = bool(mallopt(M_TOP_PAD, 64 * 2**20)) and ok
    _done = ok
    return ok


@contextlib.contextmanager
def mapped_chunks(threshold: int) -> Iterator[None]:
    """Serve allocations of `threshold` bytes and more with their own mappings while the block runs (then back to
    the heap-friendly threshold). For the interpolating methods' passes: their float64 chunk temporaries, made
    and freed in every merge thread, fragmented the threads' heaps into a peak RSS that varied from run to run
    with the threads' timing (SLERP of two 0.49B fine-tunes: 0.42-0.76 GB, capping glibc's arenas at 1 or 2 did
    not help); mapped, each is returned the moment it is freed (0.36-0.37 GB), for no more system time than the
    heap's trims cost. No effect where the thresholds were not applied."""
    if not _done:
        yield
        return
    _mallopt()(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _mallopt()(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


@functools.cache
def _mallopt() -> Callable[[int, int], int]:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


#: resident bytes a heap may hold above its high-water mark before release_free_memory trims it
TRIM_SLACK = 16 * 2**20
_high_water = 0


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim: free pages in the middle of every arena
    too, not only at the top) when the process holds more than it did at its last trim (plus TRIM_SLACK).
    Called between tensors: chunk temporaries freed by a tensor's passes would otherwise stay in each thread's
    arena and creep up the peak RSS; but trimming after every tensor handed back the very pages the next
    tensor's passes fault straight back in (TIES at 0.49B: ~0.3 s of page faults out of ~3 s CPU). So the
    process keeps its high-water set of pages, the largest a tensor needed, and trims only what grows past it."""
    global _high_water
    if not _done:
        return
    resident = _resident_bytes()
    if _high_water and resident <= _high_water + TRIM_SLACK:
        return
    _high_water = max(_high_water, resident)
    _trim()


def _resident_bytes() -> int:
    """This process's resident set (0 where /proc is absent: then every call trims)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def _trim() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
