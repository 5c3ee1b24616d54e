"""Which output folders a command may write into or replace: a new or empty one, or one it wrote itself.

A report folder (`merge inspect`, `merge sweep`, `merge eval`) is ours only when it carries our marker file,
`.mergekit_lite_output.json`, holding a fixed magic key, the command that made it and a format number; a
file of that name with any other content does not count, nor does any other file we would write (a user's
`inspect.json` or `leaderboard.md` is not a report). A merge output (`merge run`) is recognised by its own
provenance instead: the config copy every merge writes, read back as a merge config mapping. Anything else
that is not empty is refused in one line before any work, and so is an output that is, lies inside, or holds
an input, or that cannot be written. A folder that passes is then replaced whole, atomically
(`owned_folder`): killed at any moment, the previous set or the new one is in place, never a mixture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputPathError
from .atomic import atomic_directory
from .failures import nearest_existing
from .output_files import CONFIG_COPY as _CONFIG_COPY
from .preflight import check_apart, check_output_path, resolve_output
from .staging import remove_stale, staging_prefix

if TYPE_CHECKING:
    from ..config import MergeConfig

#: the marker file's name, its magic key and value, and its format
MARKER = ".mergekit_lite_output.json"
MAGIC_KEY = "mergekit_lite_output"
MAGIC = "a folder written by mergekit_lite; the command named here may replace it whole"
FORMAT = 1
#: the commands whose folders carry the marker; "run" stands for a merge output (recognised by provenance)
COMMANDS = ("inspect", "sweep", "eval", "verify")
MERGE = "run"
#: the weights a merge output holds, one of them at least (checkpoint, sharded checkpoint, PEFT-format adapter)
_MERGE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
#: what a merge writes at the top of its output: weights (one file or shards), configs and indexes, the base's
#: tokenizer files, the card, its config copy, a data-aware method's side files (.json, .png); and `eval/`
_MERGE_FILE = re.compile(
    r"[\w.-]+\.(json|png|safetensors)|README\.md|mergekit_lite_config\.yaml|tokenizer\.model|merges\.txt|vocab\.txt"
    r"|chat_template\.jinja")
_MERGE_FOLDERS = ("eval",)
#: a marker is a few hundred bytes (its entries list included); a larger file of that name is not ours
_MAX_MARKER_BYTES = 16384


def marker_data(command: str, entries: Iterable[str] | None = None) -> dict[str, Any]:
    """The marker's content for a folder `command` writes; `entries`: the names it wrote at the folder's top (a
    marker without them, as `claim` and earlier versions write, vouches for the whole folder)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    data: dict[str, Any] = {MAGIC_KEY: MAGIC, "command": command, "format": FORMAT}
    if entries is not None:
        data["entries"] = sorted(set(entries) - {MARKER})
    return data


def write_marker(folder: Path, command: str, entries: Iterable[str] | None = None) -> Path:
    """Put the marker of `command` into `folder` (a staging folder, or one this run just made)."""
    path = folder / MARKER
    path.write_text(json.dumps(marker_data(command, entries), indent=1) + "\n", encoding="utf-8")
    return path


def _marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker when it is exactly ours (magic, a known command, our format, entries as plain names)."""
    path = folder / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or set(data) - {"entries"} != {MAGIC_KEY, "command", "format"}:
        return None
    if data[MAGIC_KEY] != MAGIC or data["format"] != FORMAT or data["command"] not in COMMANDS:
        return None
    entries = data.get("entries", [])
    if not isinstance(entries, list) or not all(isinstance(e, str) and e and "/" not in e for e in entries):
        return None
    return data


def read_marker(folder: Path) -> str | None:
    """The command a folder's marker names, or None when there is no marker or it is not exactly ours."""
    data = _marker(folder)
    return str(data["command"]) if data is not None else None


def unlisted_entries(folder: Path) -> list[str]:
    """The entries of a report folder of ours that its marker does not list (a user's notes or config put there
    since): replacing the folder whole would delete them. Empty for a marker that lists nothing."""
    data = _marker(folder)
    if data is None or "entries" not in data:
        return []
    listed = {*data["entries"], MARKER}
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.name not in listed)


def is_merge_output(folder: Path) -> bool:
    """Whether `folder` is a `merge run` output (a checkpoint or a PEFT-format adapter): its config copy reads as a
    merge config naming a base model, and the weights every merge writes beside it are there as regular files (a
    user's folder that merely holds a file of that name, or a directory or link so named, is not a merge)."""
    import yaml

    path = folder / _CONFIG_COPY
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not (isinstance(data, dict) and isinstance(data.get("base_model"), str) and (
            "adapters" in data or "models" in data)):
        return False
    return any((folder / name).is_file() and not (folder / name).is_symlink() for name in _MERGE_WEIGHTS)


def foreign_entries(folder: Path) -> list[str]:
    """The entries of a merge output that no merge writes (a user's notes, a subfolder, a link), sorted: replacing
    the folder would delete them. A merge writes regular files only (weights, configs, tokenizer files, the card,
    a data-aware method's .json/.png side files) and the `eval/` report of a `merge run` with an `eval:` section."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if not (
            entry.name in _MERGE_FOLDERS and entry.is_dir(follow_symlinks=False)
            or entry.is_file(follow_symlinks=False) and _MERGE_FILE.fullmatch(entry.name)))


def check_replaceable(target: Path, option: str = "output") -> None:
    """Refuse (one line, nothing touched) to replace an existing `target` that is neither empty nor a merge output
    of ours: --overwrite (and `overwrite=True`) may delete only what a merge wrote."""
    resolved = Path(target).resolve()
    if not os.path.lexists(resolved):
        return
    if not resolved.is_dir():
        raise OutputPathError(f"{option} {target} is not a folder (a file was put there), so it is not replaced; "
                              "point the output elsewhere")
    try:
        if is_empty(resolved):
            return
        if owner(resolved) == MERGE:
            foreign = foreign_entries(resolved)
            if not foreign:
                return
            raise OutputPathError(
                f"{option} {target} is a merge output but also holds {foreign[0]!r}, which no merge writes, so even "
                "--overwrite does not replace it (that would delete it); move it out or point the output elsewhere")
    except OSError as error:
        raise OutputPathError(f"{option} {target} cannot be read ({error.strerror or error}), so it is not replaced; "
                              "point the output elsewhere") from None
    mark = read_marker(resolved)
    what = f"not a merge output (no {_CONFIG_COPY} of a merge beside its weights)"
    what = f"a `merge {mark}` report, {what}" if mark else what
    raise OutputPathError(f"{option} {target} is not empty and is {what}, so even --overwrite does not replace it; "
                          "point the output elsewhere or empty the folder")


def owner(folder: Path) -> str | None:
    """Which command wrote `folder` ("inspect", "sweep", "eval", or "run" for a merge output), else None."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    return read_marker(folder) or (MERGE if is_merge_output(folder) else None)


def is_empty(folder: Path) -> bool:
    """An existing folder with nothing in it."""
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def local_inputs(config: MergeConfig) -> list[tuple[str, Path]]:
    """The inputs that are local folders as the config names them (Hub ids are checked once resolved)."""
    from ..hub.resolve import hub_reference

    references = [("the base model", config.base_model)]
    references += [(f"adapter '{spec.label}'", spec.path) for spec in config.adapters]
    references += [(f"model '{spec.label}'", spec.path) for spec in config.models]
    return [(what, config.resolve_path(ref)) for what, ref in references if hub_reference(config, ref) is None]


def check_output_folder(target: Path, command: str, inputs: Iterable[tuple[str, Path]] = (), *,
                        option: str = "--out", accept: Sequence[str] | None = None) -> bool:
    """Refuse, before any work and writing nothing, an output folder `command` may not use; True when it holds
    an earlier output of ours (to be replaced whole or continued), False when it is absent or empty.

    Refused: a file, or a path under a file; an input, a folder inside one, or one holding one; a folder that
    cannot be written; a folder that is not empty and is not ours (`accept`: the owners taken as ours, by default
    `command` alone).
    """
    accepted = tuple(accept) if accept is not None else (command,)
    resolved = resolve_output(target, option)
    try:
        check_output_path(resolved)
    except OutputPathError as error:
        raise OutputPathError(f"{option}: {error}") from None
    try:
        check_apart(resolved, inputs)
    except OutputPathError as error:
        raise OutputPathError(f"{option}: {error}".replace(", which --overwrite would delete", "")) from None
    if resolved.is_symlink():
        raise OutputPathError(f"{option} {target}: a symbolic link; give the folder it points to, or another path")
    exists = resolved.is_dir()
    if exists and not is_empty(resolved) and owner(resolved) not in accepted:
        other = owner(resolved)
        why = (f"it is {'a merge output' if other == MERGE else f'a `merge {other}` report'}, not one of `merge "
               f"{command}`'s" if other else f"it has no {MARKER} of ours")
        raise OutputPathError(
            f"{option} {target}: the folder is not empty and was not written by `merge {command}` ({why}), so "
            "nothing in it is touched; choose a new or empty folder")
    unlisted = unlisted_entries(resolved) if exists else []
    if unlisted:
        raise OutputPathError(
            f"{option} {target}: holds {unlisted[0]!r}, which `merge {command}` did not write there; the report folder "
            "is replaced whole, so nothing in it is touched: move it out or choose a new or empty folder")
    check_writable(resolved, option)
    return exists and not is_empty(resolved)


def check_writable(target: Path, option: str = "--out") -> None:
    """Refuse an output whose folder (or, when new, the closest existing folder above it) cannot be written:
    a probe folder is made there and removed at once, so a read-only place fails now, not after the work."""
    places = [nearest_existing(target.parent)]
    if target.is_dir():
        places.append(target)
    for place in places:
        try:
            probe = tempfile.mkdtemp(prefix=staging_prefix(target) + "probe-", dir=place)
        except OSError as error:
            raise OutputPathError(f"{option} {target}: {place} cannot be written ({error.strerror or error}); "
                                  "choose a folder you can write to") from None
        finally:  # even when a signal lands here (a probe left inside a report folder would be a foreign entry)
            if "probe" in locals():
                os.rmdir(probe)


def check_still_ours(target: Path, command: str, accept: Sequence[str] | None = None) -> None:
    """At the moment of the swap: refuse a target that became foreign (files put there while the command ran)."""
    accepted = tuple(accept) if accept is not None else (command,)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputPathError(f"--out {target}: something else was put there while `merge {command}` ran; "
                              "nothing was replaced")
    if target.is_dir() and not is_empty(target) and (owner(target) not in accepted or unlisted_entries(target)):
        raise OutputPathError(f"--out {target}: files not written by `merge {command}` appeared there while it "
                              "ran; nothing was replaced")


@contextmanager
def owned_folder(target: Path, command: str, keep: Sequence[str] = ()) -> Iterator[Path]:
    """A staging folder (with our marker) that replaces `target` whole when the body succeeds.

    `keep` names entries of the current `target` (a sweep's cache) carried into the new set: each file is
    hard-linked (copied where links are refused), so the old set keeps them until the swap and the new set
    has them after it. The target must have passed `check_output_folder`; it is checked again right before
    the swap. Temporary folders left by a killed run are removed first.
    """
    target = Path(target).resolve()
    remove_stale(target)
    with atomic_directory(target, overwrite=True) as staging:
        write_marker(staging, command)
        yield staging
        for name in keep:
            if (target / name).is_dir() and not (target / name).is_symlink():
                _link_tree(target / name, staging / name)
        # what this set holds, and what the command writes in place (`keep`): anything else is not ours
        write_marker(staging, command, [*os.listdir(staging), *keep])
        check_still_ours(target, command)


def _link_tree(source: Path, destination: Path) -> None:
    """Hard-link every regular file of `source` into `destination` (copy where the filesystem refuses links)."""
    for folder, _, files in os.walk(source):
        there = destination / Path(folder).relative_to(source)
        there.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file() or (there / name).exists():
                continue
            try:
                os.link(path, there / name)
            except OSError:
                shutil.copy2(path, there / name)


def claim(target: Path, command: str, entries: Iterable[str] = ()) -> str | None:
    """Make `target` ours before writing into it in place (a sweep's cache): create it, or mark an empty one, with
    our marker listing `entries` (what the command will write there in place: a file a user adds meanwhile stays
    the user's). Returns what this call added ("folder", "marker" or None), for `release` after a failure."""
    target = Path(target).resolve()
    if not target.exists():
        target.mkdir(parents=True)
        write_marker(target, command, entries)
        return "folder"
    if read_marker(target) is None:
        write_marker(target, command, entries)
        return "marker"
    return None


def release(target: Path, claimed: str | None) -> None:
    """Undo `claim` when the run wrote nothing else: remove the marker it added, and the folder it made."""
    if claimed is None:
        return
    target = Path(target).resolve()
    try:
        if [p.name for p in target.iterdir()] == [MARKER] and read_marker(target) is not None:
            (target / MARKER).unlink()
            if claimed == "folder":
                target.rmdir()
    except OSError:
        pass
