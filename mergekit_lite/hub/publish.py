"""Publishing a merged folder to the Hub: check it, refuse local paths in the card, create the repo, upload.

Everything that can be checked on disk is checked before the first request. The endpoint, the token and
offline mode are the client's own settings (`HF_ENDPOINT`, `HF_TOKEN` or the stored login, `HF_HUB_OFFLINE`);
the token is never printed or logged. Uploading an unchanged folder makes no new commit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergeError, PublishError, UnpublishableError
from ..formats import peft
from ..units import format_size

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = peft.CONFIG_FILE, peft.WEIGHTS_FILE
#: hidden files and folders (editor droppings, .cache/) are never uploaded
IGNORE_PATTERNS = (".*", "*/.*")
#: card metadata keys whose values must be Hub ids
_ID_KEYS = ("base_model", "datasets", "new_version")
#: free-text metadata (widget prompts, gating forms) may hold anything that looks like a path
_FREE_TEXT_KEYS = ("widget", "inference", "description", "extra_gated_prompt", "extra_gated_heading",
                   "extra_gated_description", "extra_gated_fields", "extra_gated_button_content")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class FolderFile:
    """One file that would be uploaded: its path in the repo and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: where the repo is, which commit is its head, and whether it made a new one."""

    repo_id: str
    url: str
    commit_oid: str | None
    commit_url: str | None
    changed: bool
    files: list[FolderFile] = field(default_factory=list)

    def summary(self) -> str:
        """One human line for the CLI."""
        head = f" (commit {self.commit_oid[:8]})" if self.commit_oid else ""
        if not self.changed:
            return f"{self.url} is already up to date: no file changed, no new commit{head}"
        total = format_size(sum(f.size for f in self.files))
        return f"published {len(self.files)} file(s), {total}, to {self.url}{head}"


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is `user/name` or `org/name`; raise UnpublishableError otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UnpublishableError(f"--repo-id '{repo_id}': not a valid Hub repo id ({error})") from None
    if repo_id.count("/") != 1:
        raise UnpublishableError(f"--repo-id '{repo_id}': give the namespace too, like user/name or org/name")
    return repo_id


def folder_files(folder: Path) -> list[FolderFile]:
    """The files an upload of `folder` sends (hidden ones excluded), sorted by path."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=list(IGNORE_PATTERNS))
    return [FolderFile(path, (folder / path).stat().st_size) for path in kept]


def check_folder(folder: Path) -> list[FolderFile]:
    """Check that `folder` is a complete checkpoint (or adapter output) with a publishable card; return the files
    to upload."""
    if not folder.is_dir():
        raise UnpublishableError(f"{folder}: not a folder (give the output folder of `merge run`)")
    adapter = peft.is_adapter_folder(folder)
    if not adapter and not (folder / CONFIG_FILE).is_file():
        raise UnpublishableError(f"{folder}: no {CONFIG_FILE} (a checkpoint) or {ADAPTER_CONFIG_FILE} (an adapter "
                                 "output); not a folder `merge run` wrote")
    if not (folder / CARD_FILE).is_file():
        raise UnpublishableError(f"{folder}: no {CARD_FILE} model card (`merge run` writes one); refusing to publish "
                                 "a model without a card")
    for link in (p for p in sorted(folder.rglob("*")) if p.is_symlink()):  # the upload would send what it points at
        try:
            inside = link.resolve().is_relative_to(folder.resolve())
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise UnpublishableError(f"{link}: a link out of {folder} (or a loop); publishing would upload what it "
                                     "points at: copy the file into the folder or remove the link")
    _check_weights(folder, adapter)
    metadata = card_metadata(folder / CARD_FILE)
    local = local_paths_in_metadata(metadata)
    if local:
        raise UnpublishableError(
            f"{folder / CARD_FILE}: the card's metadata holds local paths or non-Hub ids, which the Hub rejects: "
            f"{'; '.join(local)}. Use Hub ids (org/name) there or remove the entries"
        )
    return folder_files(folder)


def card_metadata(card: Path) -> dict[str, Any]:
    """The YAML front matter of a card, {} when it has none; raise UnpublishableError when it is not valid YAML."""
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(card) or {}
    except Exception as error:  # noqa: BLE001 - yaml errors, a non-mapping block, undecodable text
        raise UnpublishableError(f"{card}: the card's YAML metadata cannot be read ({error})") from None


def local_paths_in_metadata(metadata: Mapping[str, Any]) -> list[str]:
    """'key: value' for each metadata value that is a local path (or, under base_model/datasets/new_version, not
    a Hub id). Free-text entries (widget prompts, gating forms) are not inspected."""
    from .resolve import parse_hub_id

    found = []
    for key in _ID_KEYS:
        values = metadata.get(key)
        for value in values if isinstance(values, list) else [values] if values is not None else []:
            if not isinstance(value, str) or not _is_hub_id(value, parse_hub_id):
                found.append(f"{key}: {value}")
    for key, item in metadata.items():
        if key in _ID_KEYS or key in _FREE_TEXT_KEYS:
            continue
        found += [f"{where}: {value}" for where, value in _strings(item, str(key)) if _looks_local(value)]
    return found


def token_source() -> str | None:
    """Where the token would come from ('HF_TOKEN', 'the stored login'), or None; never the token itself."""
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    return "the stored login" if get_token() else None


def describe_publish(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """The dry-run report: checks the folder and lists files, sizes and the card; sends nothing."""
    from huggingface_hub import constants

    folder = Path(folder)
    check_repo_id(repo_id)
    files = check_folder(folder)
    width = max(len(f.path) for f in files)
    source = token_source()
    lines = [
        f"publish {folder} -> {constants.ENDPOINT}/{repo_id} (branch {revision or 'main'}, "
        f"{'private' if private else 'public'} if created)",
        f"  files: {len(files)}, {format_size(sum(f.size for f in files))}",
        *(f"    {f.path:<{width}}  {format_size(f.size):>10}" for f in files),
        f"  token: {'from ' + source if source else 'none found (set HF_TOKEN or run `hf auth login`)'}",
        f"  card ({CARD_FILE}):",
        *(f"    {line}" if line else "" for line in (folder / CARD_FILE).read_text(encoding="utf-8").splitlines()),
        "dry run: nothing sent",
    ]
    return "\n".join(lines)


def preflight(repo_id: str) -> None:
    """Fail fast, without a request, on what a push cannot survive: a bad repo id, offline mode, no token."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id)
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the network; unset it and run again")
    if not get_token():
        raise PublishError("no Hub token: set HF_TOKEN or log in with `hf auth login` (a token with write access)")


def publish_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Check `folder`, create `repo_id` if needed (exist_ok) and upload the folder as one commit."""
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    preflight(repo_id)
    files = check_folder(folder)
    api = HfApi(token=get_token())
    endpoint = api.endpoint
    branch = revision or "main"
    message = commit_message or f"Upload merge made with mergekit_lite ({len(files)} files)"
    logger.info("publishing %s to %s at %s (branch %s)", folder, repo_id, endpoint, branch)
    with _hub_errors(repo_id, endpoint, branch):
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        existing = api.repo_info(repo_id, revision=branch)
        if private and existing.private is False:
            logger.warning("%s already exists and is public: --private applies only when creating a repo", repo_id)
        before = existing.sha
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=message,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    url = repo_url if branch == "main" else f"{repo_url}/tree/{branch}"
    return PublishResult(repo_id, url, info.oid, info.commit_url, changed=info.oid != before, files=files)


def publish_after_merge(result: Any) -> str:
    """Push a finished merge to `output.push_to_hub`; return a summary line with the URL."""
    output = result.config.output
    if result.output_dir is None:
        raise PublishError("nothing to publish: the merge was a dry run")
    published = publish_folder(result.output_dir, output.push_to_hub, private=output.private)
    return published.summary()


@contextmanager
def _hub_errors(repo_id: str, endpoint: str, branch: str) -> Iterator[None]:
    """Turn the client's exceptions into PublishError with what to do; never repeat the token."""
    try:
        yield
    except MergeError:
        raise
    except Exception as error:
        translated = _translate(error, f"publishing to {repo_id} at {endpoint}", repo_id, branch)
        if translated is None:
            raise  # not the Hub's doing: let it surface as the bug it is
        raise translated from error


def _translate(error: Exception, where: str, repo_id: str, branch: str) -> MergeError | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return PublishError(
                f"{where}: the Hub rejected the token (HTTP 401); check HF_TOKEN or log in again with `hf auth login`"
            )
        if status == 403:
            return PublishError(
                f"{where}: the token may not write to '{repo_id.split('/')[0]}' (HTTP 403); use a token with write "
                "access to that user or organization"
            )
        if isinstance(error, RevisionNotFoundError):
            return PublishError(f"{where}: the Hub has no branch '{branch}'")
        if status == 404:
            return PublishError(f"{where}: no such repo you can write to (HTTP 404)")
        return PublishError(f"{where}: the Hub answered HTTP {status}: {_server_message(error)}")
    if isinstance(error, OfflineModeIsEnabled):
        return PublishError("HF_HUB_OFFLINE is set: publishing needs the network; unset it and run again")
    if isinstance(error, ValueError) and "metadata" in str(error):
        return UnpublishableError(f"{where}: the Hub refused the card's metadata: {' '.join(str(error).split())}")
    if isinstance(error, _transport_errors()):
        return PublishError(f"{where}: cannot reach the Hub ({type(error).__name__}: {error})")
    return None


def _check_weights(folder: Path, adapter: bool = False) -> None:
    """Index and shards agree: every shard exists and is complete, every tensor is where the index says (for an
    adapter output: its one adapter_model.safetensors is complete)."""
    from ..formats.integrity import read_layout, read_shard

    try:
        if adapter:
            if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
                raise UnpublishableError(f"{folder}: no {ADAPTER_WEIGHTS_FILE}; the adapter output is incomplete")
            read_shard(folder / ADAPTER_WEIGHTS_FILE)
        else:
            read_layout(folder)
    except MergeError as error:  # a fault on disk is a folder we refuse to send, not a Hub failure
        raise UnpublishableError(str(error)) from None


def _is_hub_id(value: str, parse_hub_id: Any) -> bool:
    ref = parse_hub_id(value)
    return ref is not None and ref.revision is None


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a nested metadata value, with a readable location like tags[2] or model-index[0].name."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")


def _looks_local(text: str) -> bool:
    """A filesystem path: absolute, home-relative, ./ or ../, a Windows drive, also after a 'kind:' prefix."""
    if "://" in text:
        return False
    for piece in [text, *text.split(":")[1:]]:
        piece = piece.strip()
        if (
            piece.startswith(("/", "~/", "./", "../"))
            or piece in (".", "..", "~")
            or "\\" in piece
            or _WINDOWS_PATH.match(piece)
        ):
            return True
    return False


def _server_message(error: Exception) -> str:
    server = getattr(error, "server_message", None)
    text = server or str(error)
    return " ".join(text.split())[:300]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of whichever HTTP library the installed client uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                               ("requests", ("ConnectionError", "Timeout"))):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(found)
