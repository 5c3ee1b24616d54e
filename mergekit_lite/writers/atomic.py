"""Write a whole folder or nothing: build it beside the target, swap it into place when complete.

Killed at any moment, a run leaves at the target either the complete previous output or the complete new one
(or nothing, when there was none); its temporary folder beside the target is removed by the next run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError
from .failures import as_write_error
from .staging import lock_folder, retired_prefix, staging_folder
from .swap import exchange


@contextmanager
def atomic_directory(target: Path, overwrite: bool, needed_bytes: int = 0,
                     may_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on any failure it vanishes.

    The output path was checked by `preflight.preflight_output` before the inputs were opened; here only an
    output that appeared since then is refused (without `overwrite`), at the moment of the swap, and with
    `may_replace` (which raises) a target that became something we may not replace while the body ran (a
    user's files put there meanwhile). An OS error while writing the output becomes a WriteError saying what to
    do (`needed_bytes`: the output's size, for the free-space advice).
    """
    target = target.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(target) as staging:
            yield staging
            if not overwrite and os.path.lexists(target):
                raise OutputExistsError(f"output {target} appeared while merging; pass --overwrite to replace it")
            if may_replace is not None and os.path.lexists(target):
                may_replace(target)
            _commit(staging, target)
    except OSError as error:
        failure = as_write_error(error, target, needed_bytes)
        if failure is None:
            raise
        raise failure from error


def _commit(staging: Path, target: Path) -> None:
    """Put the finished `staging` at `target`: one atomic exchange where the system has it, else two renames."""
    if not os.path.lexists(target):
        staging.rename(target)
        return
    held = lock_folder(target, blocking=True)  # the previous output, once moved aside, is not stale to others
    try:
        if exchange(staging, target):
            retired = staging  # the previous output now sits at the staging name
        else:
            retired = Path(tempfile.mkdtemp(prefix=retired_prefix(target), dir=target.parent))
            retired.rmdir()
            target.rename(retired)
            try:
                staging.rename(target)
            except BaseException:
                retired.rename(target)
                raise
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        if held is not None:
            os.close(held)
