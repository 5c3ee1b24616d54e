"""The saved-tensor kernels (`_saved_kernels.c`) through ctypes: a linear merge of full fine-tunes in one pass.

For task_arithmetic / linear over full fine-tunes the engine used to widen W, subtract it from each model's rows
into a float32 buffer, check each model's rows for NaN/Inf, then sum: about five trips through memory per input.
This kernel reads each model's stored rows (float32 or bfloat16) and W as they are, computes τᵢ inline and does
the same float32 operations in the same order (the bytes do not change: tests/test_saved_kernels.py). It is
built at install when a C compiler is present; without it, or with MERGEKIT_LITE_KERNELS=torch, the engine
takes its other paths (same bytes).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch

from . import kernels
from .kernels import ROW_TYPES

#: the most saved tensors one call sums (the C side's limit)
MAX_SAVED = 64


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernel library with the saved-tensor functions declared, or None when it was not built (no compiler at
    install time, or a library built before them)."""
    library = kernels._library()
    if library is None or not hasattr(library, "mks_saved_sum"):
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.mks_saved_sum.argtypes = [ctypes.c_int, pointer, pointer, pointer, ctypes.c_float, pointer, ctypes.c_int,
                                      pointer, ctypes.c_int, size, ctypes.POINTER(size), ctypes.c_int]
    library.mks_saved_sum.restype = size
    library.mks_saved_tau.argtypes = [pointer, ctypes.c_int, pointer, ctypes.c_int, pointer, size, ctypes.c_int]
    library.mks_saved_tau.restype = size
    return library


def enabled() -> bool:
    """True when the kernels are on (kernels.enabled) and these functions are built."""
    return kernels.enabled() and _library() is not None


def usable(base_rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """True when the kernel is on and can read these base rows as they are (contiguous CPU, ROW_TYPES) and write
    `out_dtype`."""
    return (enabled() and out_dtype in ROW_TYPES and base_rows.dtype in ROW_TYPES and base_rows.device.type == "cpu"
            and base_rows.is_contiguous())


def saved_sum(base: torch.Tensor, saved: Sequence[torch.Tensor], scale: Sequence[float], out: torch.Tensor,
              lam: float = 1.0, portable: bool = False) -> tuple[int, int]:
    """out = base + lam · Σᵢ (savedᵢ − base)·scaleᵢ in float32, rounded once to out's dtype; see _saved_kernels.c.

    base and out pass `usable` (out may be base itself); each savedᵢ is a contiguous CPU tensor of a ROW_TYPES dtype
    with base's numel. Returns (how many outputs are not finite, how many saved entries are not finite).
    `portable` takes the plain C loop even where the AVX2 one would run (for tests).
    """
    library = _library()
    count = len(saved)
    assert library is not None and 1 <= count <= MAX_SAVED and len(scale) == count
    numel = base.numel()
    for rows in saved:
        assert rows.numel() == numel and rows.device.type == "cpu" and rows.is_contiguous() and rows.dtype in ROW_TYPES
    assert out.numel() == numel and out.is_contiguous() and base.is_contiguous()
    bad_inputs = ctypes.c_int64()
    not_finite = library.mks_saved_sum(
        count, (ctypes.c_void_p * count)(*(rows.data_ptr() for rows in saved)),
        (ctypes.c_int * count)(*(ROW_TYPES[rows.dtype] for rows in saved)), (ctypes.c_float * count)(*scale), lam,
        base.data_ptr(), ROW_TYPES[base.dtype], out.data_ptr(), ROW_TYPES[out.dtype], numel, ctypes.byref(bad_inputs),
        int(portable),
    )
    if not_finite < 0:
        raise RuntimeError(f"saved-tensor sum kernel refused {count} tensors")
    return int(not_finite), bad_inputs.value


def saved_tau(saved: torch.Tensor, base: torch.Tensor, out: torch.Tensor, portable: bool = False) -> int:
    """out = f32(saved) − f32(base) (torch.sub's float32 result), returning how many saved entries are not finite:
    τᵢ for the methods that keep it for passes of their own (TIES), the finiteness check of the read in the same
    pass. saved and base: contiguous CPU tensors of ROW_TYPES dtypes; out: contiguous CPU float32; one numel."""
    library = _library()
    assert library is not None and saved.dtype in ROW_TYPES and base.dtype in ROW_TYPES and out.dtype == torch.float32
    numel = base.numel()
    assert saved.numel() == numel == out.numel()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in (saved, base, out))
    bad = library.mks_saved_tau(saved.data_ptr(), ROW_TYPES[saved.dtype], base.data_ptr(), ROW_TYPES[base.dtype],
                                out.data_ptr(), numel, int(portable))
    if bad < 0:
        raise RuntimeError("saved-tensor τ kernel refused its arguments")
    return int(bad)
