"""Swap two folders in one step, so that a crash between "old out" and "new in" cannot leave neither in place.

Linux has `renameat2(..., RENAME_EXCHANGE)`; elsewhere (or on a filesystem that refuses it) the caller falls
back to two renames.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
#: What renameat2 answers when the kernel or the filesystem cannot exchange: fall back, do not fail.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, or None where libc has none (not Linux, or glibc older than 2.28)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; False (nothing changed) when this system cannot, OSError on failure."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))
