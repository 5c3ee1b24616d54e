"""The fused CPU kernels (`_kernels.c`) through ctypes, and when the engine may use them.

A TIES chunk costs torch about 30 elementwise passes (trim, weight, vote, agree, sum, divide, add), each a
trip through memory; the kernel does them in one, and the selection band pass likewise. The kernels are
built at install when a C compiler is present. They repeat the torch path's float32 operations in the same
order, so the output is the same bytes either way (tests/test_kernels.py). Without them, or with
MERGEKIT_LITE_KERNELS=torch, the engine runs its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

ENV = "MERGEKIT_LITE_KERNELS"
#: the most task vectors one kernel call combines (the C side's stack buffers)
MAX_TAUS = 64
SUM, TIES = 0, 1
#: the types the consensus kernel reads base rows in and writes results in (the C enum)
ROW_TYPES = {torch.float32: 0, torch.bfloat16: 1}

_buffers = threading.local()


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they were not built (no compiler at install time)."""
    spec = importlib.util.find_spec("mergekit_lite.engine._kernels")
    if spec is None or not spec.origin:
        return None
    library = ctypes.CDLL(spec.origin)  # ctypes.CDLL releases the GIL during every call
    pointer, size, single = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.mkl_band.argtypes = [pointer, size, single, single, pointer, size, ctypes.POINTER(size)]
    library.mkl_band.restype = size
    library.mkl_consensus.argtypes = [ctypes.c_int, ctypes.c_int, pointer, pointer, pointer, pointer,
                                      ctypes.c_int, ctypes.c_int, single, pointer, ctypes.c_int, pointer,
                                      ctypes.c_int, size]
    library.mkl_consensus.restype = size
    library.mkl_lowrank.argtypes = [pointer, size, size, pointer, size, pointer]
    library.mkl_lowrank.restype = None
    library.mkl_lowrank_add.argtypes = [pointer, size, size, pointer, size, pointer, ctypes.c_int, pointer, ctypes.c_int]
    library.mkl_lowrank_add.restype = size
    if hasattr(library, "mkl_lowrank_band"):  # τ per tile (a library built before them lacks them)
        library.mkl_lowrank_band.argtypes = [pointer, size, size, pointer, size, single, single, pointer, size,
                                             ctypes.POINTER(size)]
        library.mkl_lowrank_band.restype = size
        library.mkl_lowrank_consensus.argtypes = [ctypes.c_int, ctypes.c_int, pointer, pointer, pointer, size, size,
                                                  pointer, pointer, pointer, ctypes.c_int, ctypes.c_int, single,
                                                  pointer, ctypes.c_int, pointer, ctypes.c_int]
        library.mkl_lowrank_consensus.restype = size
        library.mkl_lowrank_sample.argtypes = [pointer, size, pointer, size, size, size, size, pointer]
        library.mkl_lowrank_sample.restype = None
    if hasattr(library, "mkl_dare_keep"):
        library.mkl_dare_keep.argtypes = [pointer, size, size, pointer, single]
        library.mkl_dare_keep.restype = None
    return library


def enabled() -> bool:
    """True when the fused kernels are built and not switched off (read on every call, so tests can flip it)."""
    return os.environ.get(ENV, "auto") != "torch" and _library() is not None


def describe() -> str:
    """Which CPU path the engine takes, for `merge run --dry-run` and the logs."""
    if os.environ.get(ENV, "auto") == "torch":
        return f"torch ({ENV}=torch)"
    if _library() is None:
        return "torch (the fused C kernels were not built: no C compiler at install time)"
    return "fused C kernels"


def usable(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """True when the kernels are on and every tensor is a contiguous CPU tensor of one of `dtypes`."""
    return enabled() and all(t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous() for t in tensors)


def rows_usable(base_rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """True when the kernels can read these base rows as they are and write `out_dtype` (ROW_TYPES)."""
    return out_dtype in ROW_TYPES and usable(base_rows, dtypes=tuple(ROW_TYPES))


def output_rows(base_rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where a kernel writes W + delta: over the base rows themselves when the dtype stays, else a new tensor."""
    return base_rows if base_rows.dtype == out_dtype else torch.empty(base_rows.shape, dtype=out_dtype)


def band(chunk: torch.Tensor, high: float, low: float, limit: int) -> tuple[int, np.ndarray | None]:
    """(how many |x| > high, the |x| in [low, high] in flat order); None for the band when it holds more
    than `limit` entries. `chunk` must pass `usable`."""
    library = _library()
    assert library is not None
    numel = chunk.numel()
    capacity = min(numel, limit) + 1  # the C copy loop writes one slot past the last kept entry
    out = getattr(_buffers, "band", None)
    if out is None or len(out) < capacity:
        out = _buffers.band = np.empty(max(capacity, 1 << 18), dtype=np.float32)
    above = ctypes.c_int64()
    gathered = library.mkl_band(chunk.data_ptr(), numel, high, low, out.ctypes.data, capacity, ctypes.byref(above))
    return above.value, (None if gathered < 0 else out[:gathered].copy())


def band_counts(chunk: torch.Tensor, high: float, low: float) -> tuple[int, int]:
    """(how many |x| > high, how many |x| in [low, high]) of a chunk passing `usable`: `band` without the copy
    of the band (the per-thread buffer holds a whole chunk, so the count is never cut short)."""
    library = _library()
    assert library is not None
    numel = chunk.numel()
    capacity = numel + 1
    out = getattr(_buffers, "band", None)
    if out is None or len(out) < capacity:
        out = _buffers.band = np.empty(max(capacity, 1 << 18), dtype=np.float32)
    above = ctypes.c_int64()
    gathered = library.mkl_band(chunk.data_ptr(), numel, high, low, out.ctypes.data, capacity, ctypes.byref(above))
    assert gathered >= 0
    return above.value, int(gathered)


def consensus_into(
    kind: int,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    below: Sequence[float],
    scale: Sequence[float],
    abs_weights: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    sign_count: bool = False,
    normalize: bool = True,
    lam: float = 1.0,
) -> int:
    """out = base + the consensus (SUM or TIES) of uᵢ = trim(τᵢ, belowᵢ)·scaleᵢ, in one pass; see _kernels.c.

    τᵢ must pass `usable`; base and out (default: base itself) are float32 or bfloat16 (ROW_TYPES), all
    with base's numel. A negative belowᵢ keeps all of τᵢ. Returns how many outputs are not finite.
    """
    library = _library()
    out = base if out is None else out
    assert library is not None and 1 <= len(taus) <= MAX_TAUS
    count = len(taus)
    numel = base.numel()
    assert all(t.numel() == numel for t in taus) and out.numel() == numel
    floats = ctypes.c_float * count
    not_finite = library.mkl_consensus(
        kind, count, (ctypes.c_void_p * count)(*(t.data_ptr() for t in taus)),
        floats(*below), floats(*scale), floats(*abs_weights), int(sign_count), int(normalize), lam,
        base.data_ptr(), ROW_TYPES[base.dtype], out.data_ptr(), ROW_TYPES[out.dtype], numel,
    )
    if not_finite < 0:
        raise RuntimeError(f"fused consensus kernel refused {count} task vectors")
    return int(not_finite)


def dare_keep(tau: torch.Tensor, start: int, seeds: Sequence[int], density: float) -> None:
    """τ ← τ · keep-mask in place, drawing torch.rand's uniforms of the given blocks itself (one pass); the
    `fused` argument of randomness.UniformStream.apply_keep. τ: a contiguous CPU float32 chunk."""
    library = _library()
    assert library is not None
    array = (ctypes.c_uint64 * len(seeds))(*seeds)
    library.mkl_dare_keep(tau.data_ptr(), start, tau.numel(), array, density)


def fused_keep() -> Callable[[torch.Tensor, int, Sequence[int], float], None] | None:
    """The fused keep-mask kernel, unless the kernels are missing or switched off (MERGEKIT_LITE_KERNELS=torch)."""
    library = _library() if enabled() else None
    return dare_keep if library is not None and hasattr(library, "mkl_dare_keep") else None


def lowrank(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = left @ right (2-D, all passing `usable`) with a fixed summation order (see _kernels.c); returns out."""
    library = _library()
    assert library is not None and left.dim() == 2 and right.dim() == 2 and left.shape[1] == right.shape[0]
    rows, rank = left.shape
    cols = right.shape[1]
    assert out.numel() == rows * cols and rank >= 1
    library.mkl_lowrank(left.data_ptr(), rows, rank, right.data_ptr(), cols, out.data_ptr())
    return out


def lowrank_add(left: torch.Tensor, right: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> int:
    """out = base + left @ right (rank sum in mkl_lowrank's order, base added once); left and right pass
    `usable`, base and out are contiguous CPU float32 or bfloat16. Returns how many outputs are not finite."""
    library = _library()
    assert library is not None and left.dim() == 2 and right.dim() == 2 and left.shape[1] == right.shape[0]
    rows, rank = left.shape
    cols = right.shape[1]
    assert base.numel() == out.numel() == rows * cols
    not_finite = library.mkl_lowrank_add(left.data_ptr(), rows, rank, right.data_ptr(), cols, base.data_ptr(),
                                         ROW_TYPES[base.dtype], out.data_ptr(), ROW_TYPES[out.dtype])
    if not_finite < 0:
        raise RuntimeError("fused low-rank kernel refused its arguments")
    return int(not_finite)


# -- τ built per tile from its low-rank factors (never materialised whole) --------------------------------------

Factors = tuple[torch.Tensor, torch.Tensor]


def per_tile_built() -> bool:
    """True when the per-tile kernels are built and on."""
    library = _library() if enabled() else None
    return library is not None and hasattr(library, "mkl_lowrank_band")


def per_tile(*factors: Factors) -> bool:
    """True when the per-tile kernels can take these (left rows, right) pairs: built, on, CPU float32 contiguous."""
    return (per_tile_built()
            and all(usable(left, right) and left.dim() == right.dim() == 2 and left.shape[1] == right.shape[0] >= 1
                    for left, right in factors))


def _band_buffer(capacity: int) -> np.ndarray:
    out = getattr(_buffers, "band", None)
    if out is None or len(out) < capacity:
        out = _buffers.band = np.empty(max(capacity, 1 << 18), dtype=np.float32)
    return out


def lowrank_band(factors: Factors, high: float, low: float, limit: int) -> tuple[int, np.ndarray | None]:
    """`band` of τ = left @ right, built tile by tile from the factors (`per_tile` must hold): the same count and
    the same band values (not in flat order)."""
    library = _library()
    assert library is not None
    left, right = factors
    rows, rank = left.shape
    cols = right.shape[1]
    capacity = min(rows * cols, limit) + 1
    out = _band_buffer(capacity)
    above = ctypes.c_int64()
    gathered = library.mkl_lowrank_band(left.data_ptr(), rows, rank, right.data_ptr(), cols, high, low,
                                        out.ctypes.data, capacity, ctypes.byref(above))
    if gathered < -1:
        raise RuntimeError("per-tile band kernel refused its factors")
    return above.value, (None if gathered < 0 else out[:gathered].copy())


def lowrank_band_counts(factors: Factors, high: float, low: float) -> tuple[int, int]:
    """`band_counts` of τ = left @ right, built tile by tile from the factors."""
    library = _library()
    assert library is not None
    left, right = factors
    rows, rank = left.shape
    cols = right.shape[1]
    capacity = rows * cols + 1
    out = _band_buffer(capacity)
    above = ctypes.c_int64()
    gathered = library.mkl_lowrank_band(left.data_ptr(), rows, rank, right.data_ptr(), cols, high, low,
                                        out.ctypes.data, capacity, ctypes.byref(above))
    assert gathered >= 0
    return above.value, int(gathered)


def lowrank_sample(factors: Factors, first: int, stride: int, right_t: torch.Tensor | None = None) -> np.ndarray:
    """|τ[first::stride]| of τ = left @ right (flat, row-major) from the factors: the selection's strided sample
    without building τ (a fresh float32 array). `right_t`: rightᵀ contiguous, when the caller made it once for
    several chunks."""
    library = _library()
    assert library is not None
    left, right = factors
    rows, rank = left.shape
    cols = right.shape[1]
    if right_t is None:
        right_t = right.t().contiguous()
    assert right_t.shape == (cols, rank) and right_t.is_contiguous()
    total = rows * cols
    count = 0 if first >= total else (total - 1 - first) // stride + 1
    out = np.empty(count, dtype=np.float32)
    if count:
        library.mkl_lowrank_sample(left.data_ptr(), rank, right_t.data_ptr(), cols, first, stride, count,
                                   out.ctypes.data)
    return np.abs(out, out=out)


def lowrank_consensus_into(
    kind: int,
    base: torch.Tensor,
    factors: Sequence[Factors],
    below: Sequence[float],
    scale: Sequence[float],
    abs_weights: Sequence[float],
    *,
    out: torch.Tensor | None = None,
    sign_count: bool = False,
    normalize: bool = True,
    lam: float = 1.0,
) -> int:
    """`consensus_into` with each τᵢ = leftᵢ @ rightᵢ built tile by tile from its factors (`per_tile` must hold):
    the same bytes, without τ in memory. base: the chunk's W rows (rows × cols)."""
    library = _library()
    out = base if out is None else out
    assert library is not None and 1 <= len(factors) <= MAX_TAUS
    count = len(factors)
    rows, cols = factors[0][0].shape[0], factors[0][1].shape[1]
    assert all(left.shape[0] == rows and right.shape[1] == cols for left, right in factors)
    assert base.numel() == out.numel() == rows * cols
    floats, pointers = ctypes.c_float * count, ctypes.c_void_p * count
    not_finite = library.mkl_lowrank_consensus(
        kind, count, pointers(*(left.data_ptr() for left, _ in factors)),
        (ctypes.c_int64 * count)(*(left.shape[1] for left, _ in factors)),
        pointers(*(right.data_ptr() for _, right in factors)), rows, cols,
        floats(*below), floats(*scale), floats(*abs_weights), int(sign_count), int(normalize), lam,
        base.data_ptr(), ROW_TYPES[base.dtype], out.data_ptr(), ROW_TYPES[out.dtype],
    )
    if not_finite < 0:
        raise RuntimeError(f"per-tile consensus kernel refused {count} task vectors")
    return int(not_finite)
