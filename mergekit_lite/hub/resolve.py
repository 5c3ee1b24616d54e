"""Where a base or adapter reference points: a local folder, or a Hub repo id (`org/name[@revision]`).

A Hub id is fetched with `huggingface_hub.snapshot_download` into the usual Hugging Face cache, and only
the files a merge reads come down: safetensors weights, JSON configs and indexes, tokenizer files and the
card (for the license). Pickled weights never do. A local folder wins when a reference could be both.
The client's own settings apply: `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, CheckpointError, InputError
from ..formats import peft

if TYPE_CHECKING:
    from ..config import MergeConfig

logger = logging.getLogger(__name__)

#: What a merge reads from a repo's top folder: weights, configs and indexes, tokenizer files, the card.
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "README.md",
)
#: Never anything in a subfolder (other formats, checkpoints) and never pickles, whatever the allow list says.
IGNORE_PATTERNS = ("*/*", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.pkl", "*.ckpt")

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)(?:@(?P<revision>\S+))?")
_KINDS = {"base": ("base_model", CheckpointError), "adapter": ("adapter", AdapterError)}


@dataclass(frozen=True)
class HubRef:
    """A Hub model repo and an optional revision (branch, tag or commit), as written `org/name@revision`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def url(self) -> str:
        """The repo's page on huggingface.co (at the revision when one is pinned)."""
        base = f"https://huggingface.co/{self.repo_id}"
        return f"{base}/tree/{self.revision}" if self.revision else base


def parse_hub_id(reference: str) -> HubRef | None:
    """The repo and revision when `reference` is shaped like `org/name[@revision]`, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = reference.strip()
    if text.startswith((".", "/", "~")) or "\\" in text:
        return None
    match = _HUB_ID.fullmatch(text)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return HubRef(match["repo"], match["revision"])


def hub_reference(config: MergeConfig, reference: str) -> HubRef | None:
    """The Hub repo `reference` names, or None when it is a local path (an existing local folder wins)."""
    if config.resolve_path(reference).exists():
        return None
    return parse_hub_id(reference)


def resolve_model_dir(config: MergeConfig, reference: str, kind: str) -> Path:
    """The local folder for a base (`kind='base'`) or adapter reference of `config`, fetched when a Hub id."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'base' or 'adapter', got {kind!r}")
    ref = hub_reference(config, reference)
    if ref is None:
        return config.resolve_path(reference)
    return fetch_snapshot(ref, kind, local_path=config.resolve_path(reference))


def cached_model_dir(config: MergeConfig, reference: str, kind: str) -> Path | None:
    """The folder `reference` resolves to without any network call (local, or already cached), else None."""
    ref = hub_reference(config, reference)
    if ref is None:
        path = config.resolve_path(reference)
        return path if path.is_dir() else None
    try:
        return fetch_snapshot(ref, kind, local_files_only=True)
    except InputError:
        return None


def fetch_snapshot(ref: HubRef, kind: str, *, local_files_only: bool = False, local_path: Path | None = None) -> Path:
    """Download (or find in the cache) what a merge needs from `ref`; raise our InputError with what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what, error_type = _KINDS[kind]
    where = f"{what} '{ref}'"
    local = f"no local folder {local_path}, and " if local_path is not None else ""
    offline = constants.is_offline_mode()
    try:
        folder = Path(
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                allow_patterns=list(ALLOW_PATTERNS),
                ignore_patterns=list(IGNORE_PATTERNS),
                local_files_only=local_files_only,
            )
        )
    except RevisionNotFoundError:
        raise error_type(
            f"{where}: the Hub repo {ref.repo_id} has no revision '{ref.revision}' (a branch, tag or commit); "
            "check the part after '@'"
        ) from None
    except GatedRepoError:
        raise error_type(
            f"{where}: the Hub repo is gated; accept its terms on its page and log in (HF_TOKEN or `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise error_type(
            f"{where}: {local}no Hub repo '{ref.repo_id}' at {constants.ENDPOINT}; check the id, and for a private "
            "repo log in (HF_TOKEN or `hf auth login`)"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise error_type(
                f"{where}: the Hub rejected the token (HTTP 401); check HF_TOKEN or log in again (`hf auth login`)"
            ) from None
        raise error_type(f"{where}: the Hub answered HTTP {status}: {_first_line(error)}") from None
    except LocalEntryNotFoundError as error:
        if local_files_only:
            raise error_type(f"{where}: not in the local Hugging Face cache") from None
        if offline:
            raise error_type(
                f"{where}: {local}HF_HUB_OFFLINE=1 and the cache holds no complete snapshot of the Hub repo with the "
                "files a merge needs; run once with network access, or unset HF_HUB_OFFLINE"
            ) from None
        raise error_type(
            f"{where}: {local}cannot reach the Hub at {constants.ENDPOINT} and the cache holds no complete snapshot "
            f"of the Hub repo ({_first_line(error)})"
        ) from None
    _check_snapshot(folder, ref, kind)
    logger.info("%s: Hub snapshot %s", where, folder)
    return folder


def _check_snapshot(folder: Path, ref: HubRef, kind: str) -> None:
    """Say what a Hub repo lacks in its own terms, before the readers complain about a cache path."""
    what, error_type = _KINDS[kind]
    where = f"{what} '{ref}'"
    if kind == "base":
        if not any(folder.glob("*.safetensors")):
            raise error_type(
                f"{where}: the Hub repo has no safetensors weights at its top level; mergekit_lite downloads only "
                "safetensors and never unpickles .bin files (convert the base with save_pretrained(..., "
                "safe_serialization=True) and push that)"
            )
        return
    if not (folder / peft.CONFIG_FILE).is_file():
        raise error_type(f"{where}: the Hub repo has no {peft.CONFIG_FILE} at its top level (is it a PEFT adapter?)")
    if not (folder / peft.WEIGHTS_FILE).is_file():
        raise error_type(
            f"{where}: the Hub repo has no {peft.WEIGHTS_FILE}; mergekit_lite never unpickles "
            f"{peft.PICKLED_WEIGHTS} (re-save the adapter with safe_serialization=True)"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
