"""Write a whole folder or nothing: build it beside the target, rename it into place when complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting was asked for (checked before any work starts)."""
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on any failure it vanishes."""
    target = target.resolve()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        retired.rmdir()
        target.rename(retired)
        staging.rename(target)
        if retired.is_dir():
            shutil.rmtree(retired, ignore_errors=True)
        else:
            retired.unlink()
    else:
        staging.rename(target)
