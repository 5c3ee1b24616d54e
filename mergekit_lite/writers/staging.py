"""Temporary folders beside the target, locked for the life of their run, so a later run can tell stale from live.

A run builds its output in `.{name}.tmp-XXXX` (and, where the system cannot swap folders in one step, moves the
previous output aside to `.{name}.old-XXXX`). It holds an exclusive `flock` on each such folder while it lives;
the kernel drops the lock when the process dies, however it dies. So a folder of ours whose lock can be taken
belongs to a dead run and can go; and only folders named exactly as a run names them (a random tail of its
own shape), so a user's `.out.tmp-notes` is never taken for ours.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so stale folders are left alone
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


#: the random tails of our temporary names: `secrets.token_hex(8)` for a staging folder, `tempfile.mkdtemp`'s eight
#: characters for a previous output moved aside or a write probe. Only folders named exactly so are ever removed or
#: restored: a user's own `.out.tmp-notes` beside the output is not ours.
_STAGING_TAIL = re.compile(r"[0-9a-f]{16}|probe-[a-z0-9_]{8}")
_RETIRED_TAIL = re.compile(r"[a-z0-9_]{8}")


def is_ours(entry: Path, target: Path) -> bool:
    """Whether `entry` is named like a temporary folder a run of ours made for `target`."""
    name = entry.name
    if name.startswith(staging_prefix(target)):
        return bool(_STAGING_TAIL.fullmatch(name[len(staging_prefix(target)):]))
    if name.startswith(retired_prefix(target)):
        return bool(_RETIRED_TAIL.fullmatch(name[len(retired_prefix(target)):]))
    return False


def staging_prefix(target: Path) -> str:
    """Name prefix of the folders a run builds `target` in."""
    return f".{target.name}.tmp-"


def retired_prefix(target: Path) -> str:
    """Name prefix of a previous output moved aside while the new one takes its place."""
    return f".{target.name}.old-"


def lock_folder(path: Path, *, blocking: bool) -> int | None:
    """An open descriptor holding an exclusive lock on folder `path`, or None when a live process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new folder beside `target`, locked while the body runs and removed when the body fails.

    Its name is chosen before it is made, so that a signal at any point finds something to clean up.
    """
    fd: int | None = None
    staging = target.parent / f"{staging_prefix(target)}{secrets.token_hex(8)}"
    try:
        while fd is None:
            staging = target.parent / f"{staging_prefix(target)}{secrets.token_hex(8)}"
            staging.mkdir()
            fd = _lock_new(staging)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _lock_new(folder: Path) -> int | None:
    """Lock a folder just made; None when another run took it for a stale one and removed it before the lock."""
    try:
        fd = lock_folder(folder, blocking=True)
    except FileNotFoundError:
        return None
    assert fd is not None
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(folder)):
            return fd
    except FileNotFoundError:
        pass
    os.close(fd)
    return None


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporary folders killed runs left beside `target` (never a live run's); return them.

    A previous output moved aside by a run killed before its replacement arrived is put back instead.
    """
    parent = target.parent
    try:
        if fcntl is None or not parent.is_dir():
            return []
    except OSError:  # a name too long for the system: the output checks say so in one line
        return []
    cleaned = []
    for entry in sorted(parent.iterdir()):
        if not is_ours(entry, target) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = lock_folder(entry, blocking=False)
        except OSError:  # gone meanwhile (its run finished) or not ours to open
            continue
        if fd is None:
            logger.info("kept %s: a merge still running is writing it", entry)
            continue
        try:
            if entry.name.startswith(retired_prefix(target)) and not os.path.lexists(target):
                try:
                    entry.rename(target)
                except OSError as error:  # keep it: it may be the user's only copy
                    logger.warning("could not put back the previous output %s from %s: %s", target, entry, error)
                    continue
                logger.warning("restored the previous output %s from %s, left by a merge that was killed", target, entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("removed %s, left by a merge that was killed", entry)
        finally:
            os.close(fd)
        cleaned.append(entry)
    return cleaned

