"""The sweep's results cache: one JSON file per finished evaluation, written atomically, checked when read.

A key is the sha256 of the job's identity: its kind and split, the resolved merge config (every parameter and
weight, each input folder replaced by its files' fingerprint, so a cache moves with a checkout) and the evaluation
settings. An entry is written to a
temporary file, flushed and renamed into place, so a sweep killed at any moment (SIGKILL included) leaves whole
entries only. Each entry carries the sha256 of its own content: an entry that fails the check (edited,
truncated, for another key) is reported and evaluated again, never trusted. JSON only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1


def canonical(data: Any) -> str:
    """The one JSON text of `data` that keys and checksums are computed over (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(data: Any) -> str:
    """sha256 of the canonical JSON of `data`."""
    return hashlib.sha256(canonical(data).encode()).hexdigest()


#: files up to this size are hashed whole; larger ones by size, their first and last MiB (a safetensors header
#: with every name, shape and offset is at the start)
WHOLE_FILE_BYTES = 64 * 2**20
_EDGE = 2**20


def fingerprint(folder: str | Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of a model folder's weight and config files, independent of where the folder lives:
    the same inputs key the same entries in any checkout, and a changed file changes the key."""
    path = Path(folder)
    if not path.is_dir():
        return []
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
    out = []
    for file in files:
        size = file.stat().st_size
        digest_ = hashlib.sha256()
        with file.open("rb") as handle:
            if size <= WHOLE_FILE_BYTES:
                digest_.update(handle.read())
            else:
                digest_.update(handle.read(_EDGE))
                handle.seek(size - _EDGE)
                digest_.update(handle.read(_EDGE))
        out.append((file.name, size, digest_.hexdigest()))
    return out


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def valid_result(result: Any) -> bool:
    """Whether a stored result has the shape a finished evaluation has: {"scores": {task: {metric: number or
    null}}, "merge_s": seconds, "eval_s": seconds} (a checksum proves an entry whole, not that it is ours)."""
    if not isinstance(result, dict) or set(result) - {"scores", "merge_s", "eval_s"}:
        return False
    scores = result.get("scores")
    if not isinstance(scores, dict) or not all(
            isinstance(task, str) and isinstance(values, dict)
            and all(isinstance(name, str) and _number(value) for name, value in values.items())
            for task, values in scores.items()):
        return False
    return all(_number(result.get(name)) for name in ("merge_s", "eval_s"))


class ResultCache:
    """`folder/<key>.json` per finished evaluation."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rejected: list[str] = []

    def entries(self) -> list[Path]:
        """The entry files present."""
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    def path(self, key: str) -> Path:
        """Where the entry of `key` lives."""
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of `key`, or None when absent or when the entry fails its checks (then logged)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            body = {k: entry[k] for k in ("format", "key", "identity", "result")}
            valid = (entry.get("checksum") == digest(body) and entry["key"] == key
                     and digest(entry["identity"]) == key and entry["format"] == FORMAT)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            logger.warning("sweep cache: %s fails its checksum; evaluating that point again", path.name)
            self.rejected.append(key)
            return None
        if not valid_result(entry["result"]):
            logger.warning("sweep cache: %s holds a result of the wrong shape; evaluating that point again",
                           path.name)
            self.rejected.append(key)
            return None
        return entry["result"]

    def put(self, key: str, identity: dict[str, Any], result: dict[str, Any]) -> Path:
        """Store a finished result atomically (temporary file, flush, fsync, rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "key": key, "identity": identity, "result": result}
        text = json.dumps({**body, "checksum": digest(body)}, indent=1, sort_keys=True) + "\n"
        descriptor, temporary = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return self.path(key)
