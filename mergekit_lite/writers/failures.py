"""Turn an OS error while writing the output (disk full, file size limit, permissions) into one WriteError line.

The message names the file, the output folder and what to do; by the time it is raised the temporary folder is
gone, so the free space it reports is what the user really has.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import WriteError
from ..units import format_size
from .staging import retired_prefix, staging_prefix

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no rlimits
    resource = None  # type: ignore[assignment]


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised while writing `path` that path as its filename (a failed write() names none)."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (where the output's bytes will land)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_output_path(path: str | os.PathLike[str], target: Path) -> bool:
    """True for the target, its ancestors, and anything in our temporary folders beside it."""
    candidate = Path(path)
    if candidate == target or candidate in target.parents:
        return True
    try:
        first = candidate.relative_to(target.parent).parts[0]
    except (ValueError, IndexError):
        return False
    return first == target.name or first.startswith((staging_prefix(target), retired_prefix(target)))


def as_write_error(error: OSError, target: Path, needed: int) -> WriteError | None:
    """The WriteError for an OSError raised while writing `target`, or None when the error is not about the output."""
    if error.filename is None or not is_output_path(error.filename, target):
        return None
    name = Path(error.filename).name if Path(error.filename).parent != target.parent else Path(error.filename)
    parent = nearest_existing(target.parent)
    kept = f"nothing was written to {target}" if not target.exists() else f"{target} was left as it was"
    reason = error.strerror or os.strerror(error.errno or 0)
    if error.errno == errno.ENOSPC:
        free = shutil.disk_usage(parent).free
        short = f"free {format_size(needed - free)} there" if needed > free else "free some space there"
        advice = (f"the disk holding {parent} is full: the output needs {format_size(needed)} and "
                  f"{format_size(free)} is free; {short} or pick another output path")
    elif error.errno == errno.EDQUOT:
        advice = (f"your disk quota for {parent} is used up: the output needs {format_size(needed)}; "
                  "free space within your quota or pick another output path")
    elif error.errno == errno.EFBIG:
        limit = _file_size_limit()
        cap = f" ({format_size(limit)})" if limit is not None else ""
        advice = (f"the file size limit{cap} of this process (ulimit -f) or of the filesystem was reached; "
                  "raise the limit, pick a smaller output.shard_size, or pick another output path")
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"pick another output path, or one you may write to in {parent}"
    else:
        advice = "check the disk, or pick another output path"
    return WriteError(f"writing {name} for the output {target} failed: {reason}; {kept}; {advice}")


def _file_size_limit() -> int | None:
    """This process's RLIMIT_FSIZE in bytes, or None when there is none."""
    if resource is None:  # pragma: no cover
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit
