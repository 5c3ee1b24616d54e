"""Checks on the output path that fail in a second, before a merge that would fail (or destroy an input) later."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputExistsError, OutputPathError, WriteError
from ..units import format_size
from .failures import nearest_existing

#: Folder names of the Hugging Face cache's entries (models--org--name, ...): their snapshots are inputs
_HF_CACHE_ENTRIES = ("models--", "datasets--", "spaces--")
#: The longest file name most file systems take, and what our temporary folder's name adds to the output's
#: (`.{name}.tmp-` and 16 hex digits, writers.staging)
_NAME_MAX = 255
_TEMPORARY_NAME_EXTRA = 22
#: Room kept beyond the planned bytes for the card, the config copy and the index.
FREE_SPACE_MARGIN = 1 << 20


def preflight_output(target: Path, overwrite: bool, inputs: Iterable[tuple[str, Path]]) -> None:
    """Every check of the output path, once per run and before any input is opened: not a file or under one,
    not an existing output unless `overwrite`, apart from every local input (Hub inputs are checked with
    `check_apart` once resolved), and, to be replaced, empty or a merge output of ours (never a user's folder)."""
    from .ownership import check_replaceable, check_writable

    check_output_path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output {target} already exists; pass --overwrite to replace it")
    check_apart(target, inputs)
    check_replaceable(target)
    check_writable(target.resolve(), "output")


def resolve_output(target: Path, option: str = "output") -> Path:
    """`target` with every symlink resolved; a symlink loop (or a path the system cannot resolve) is one line."""
    try:
        return Path(target).resolve()
    except (RuntimeError, OSError) as error:
        why = "a symlink loop" if isinstance(error, RuntimeError) else error.strerror or str(error)
        raise OutputPathError(f"{option} {target} cannot be resolved ({why}); give a real folder path") from None


def check_output_path(target: Path) -> None:
    """Refuse an output path that is, or lies under, an existing file: the merge could never create it."""
    resolved = resolve_output(target)
    too_long = [part for part in resolved.parts if len(os.fsencode(part)) > _NAME_MAX]
    if too_long or len(os.fsencode(resolved.name)) > _NAME_MAX - _TEMPORARY_NAME_EXTRA:
        raise OutputPathError(f"output {target}: a folder name is longer than the {_NAME_MAX - _TEMPORARY_NAME_EXTRA} "
                              "bytes an output's name may have (its temporary folder adds "
                              f"{_TEMPORARY_NAME_EXTRA}); pick a shorter name")
    existing = nearest_existing(resolved)
    if existing == resolved and not resolved.is_dir():
        raise OutputPathError(f"output {target} is an existing file, not a folder; pick a folder path for the output")
    if not existing.is_dir():
        raise OutputPathError(f"output {target} lies under {existing}, which is a file; pick another output path")
    for folder in (resolved, *resolved.parents):
        if folder.name.startswith(_HF_CACHE_ENTRIES) and (folder / "snapshots").is_dir():
            raise OutputPathError(f"output {target} is or lies inside the Hugging Face cache entry {folder}, which "
                                  "the Hub client owns (its snapshots link into it); pick an output path outside it")


def check_apart(target: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output that is, or lies inside, an input folder, or holds one (--overwrite would delete it).

    `inputs` pairs a description ("the base model", "adapter 'math'") with its local folder; symlinks are resolved.
    """
    out = target.resolve()
    for what, folder in inputs:
        source = folder.resolve()
        if out == source or source in out.parents:
            raise OutputPathError(
                f"output {target} lies inside {what} folder {source}; pick an output path outside the inputs"
            )
        if out in source.parents:
            raise OutputPathError(
                f"{what} folder {source} lies inside the output {target}, which --overwrite would delete; "
                "pick another output path"
            )
        for linked in _link_targets(source):
            if out in linked.parents:
                raise OutputPathError(
                    f"{what} folder {source} links to {linked}, which lies inside the output {target} "
                    "(replacing the output would delete it); pick another output path"
                )


def _link_targets(folder: Path) -> list[Path]:
    """Where the symbolic links at the top of an input folder point (a Hugging Face snapshot's files live in
    the cache's blobs/): an output holding one of those would delete the input's data with it."""
    try:
        with os.scandir(folder) as entries:
            links = [Path(entry.path) for entry in entries if entry.is_symlink()]
    except OSError:  # not a folder (yet): the input's own checks say so
        return []
    targets = []
    for link in links:
        try:
            targets.append(link.resolve())
        except (OSError, RuntimeError):  # a link loop: the input's own checks say so
            continue
    return targets


def check_free_space(target: Path, needed: int) -> None:
    """Refuse to start when the disk the output goes to has less free space than the output needs."""
    where = nearest_existing(target.resolve().parent)
    free = shutil.disk_usage(where).free
    needed += FREE_SPACE_MARGIN
    if free < needed:
        raise WriteError(
            f"not enough space for the output {target}: it needs {format_size(needed)} and the disk holding {where} "
            f"has {format_size(free)} free; free {format_size(needed - free)} or pick another output path"
        )
