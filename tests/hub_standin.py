"""A Hugging Face Hub stand-in for tests: a stdlib HTTP server on 127.0.0.1 that answers what the real
`huggingface_hub` client calls to create a repo, upload a folder (regular files and the LFS batch + PUT path,
with Xet disabled) and download it again (model info, tree listing, file resolve), and that keeps what it
receives so tests can assert on bytes, commits and requests.

Behaviour copied from the Hub where the client depends on it:
- a token it does not know gets 401 with `X-Error-Message: Invalid credentials in Authorization header`;
  writes need a token whose user owns the namespace (or belongs to the org); private repos read as missing;
- `POST /api/repos/create` answers 409 *with* `url` when the repo exists; a new repo starts with a commit
  holding `.gitattributes` (`*.safetensors` go to LFS);
- `POST /api/validate-yaml` rejects card metadata whose `base_model` is not a Hub id (e.g. a local path);
- preupload answers `uploadMode` per file (lfs when `.gitattributes` says so or the file is large) and the
  `oid` of the file already there (sha256 for LFS, git blob sha1 otherwise), which is how the client skips
  unchanged files;
- commits are NDJSON (`header`, `file` base64, `lfsFile`, `deletedFile`, `deletedFolder`); an `lfsFile`
  must name an object the LFS store holds; every accepted commit gets a new 40-hex oid;
- LFS: `POST /{repo}.git/info/lfs/objects/batch` hands out signed PUT URLs (no `actions` for objects already
  stored) and a verify action; the PUT body must hash to the oid;
- resolve (`HEAD`/`GET /{repo}/resolve/{rev}/{path}`) sends `X-Repo-Commit`, `ETag` and, for LFS files,
  `X-Linked-Etag`/`X-Linked-Size`; missing repo/revision/file carry `X-Error-Code` RepoNotFound /
  RevisionNotFound / EntryNotFound like the Hub.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

INVALID_TOKEN = "Invalid credentials in Authorization header"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_YAML_BLOCK = re.compile(r"\A\s*---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as `oid` / ETag for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file's content in a commit, stored in git (regular) or through LFS."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def remote_oid(self) -> str:
        """What preupload reports for a file already there (the client compares it with its own hash)."""
        return self.sha256 if self.lfs else git_blob_oid(self.data)


@dataclass(frozen=True)
class Commit:
    """One commit: its oid, parent, title and the full file tree it leaves."""

    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    """A model repo: visibility, branches (name -> commit oid) and every commit."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid -> the commit, else None."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass(frozen=True)
class Request:
    """One request the stand-in received: method, path, query, and the user its token names (None: none/bad)."""

    method: str
    path: str
    query: dict[str, list[str]]
    user: str | None
    bad_token: bool


class HubError(Exception):
    """An HTTP error answer, with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.extra, self.headers = extra or {}, headers or {}


class HubStandIn:
    """The server and its state. Use as a context manager, or start()/stop(); `url` is the endpoint."""

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None) -> None:
        self.tokens = dict(tokens if tokens is not None else {"hf_standin_write": "user"})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.validated_cards: list[str] = []
        self.lfs_puts: list[str] = []
        self._lock = threading.RLock()
        self._secret = b"stand-in-signing-key"
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -------------------------------------------------------------------------------------- helpers for tests
    def head(self, repo_id: str, branch: str = "main") -> Commit:
        """The commit `branch` points at."""
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    def commit_count(self, repo_id: str) -> int:
        """How many commits the repo holds (the initial one included)."""
        return len(self.repos[repo_id].commits)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """The bytes of `path` at `revision`, as the stand-in stored them."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return commit.files[path].data

    def paths(self, *methods: str) -> list[str]:
        """The paths of the requests received so far (only those methods when given)."""
        return [r.path for r in self.requests if not methods or r.method in methods]

    # --------------------------------------------------------------------------------------------- state ops
    def _new_commit(self, repo: Repo, parent: str | None, title: str, files: dict[str, Blob]) -> Commit:
        listing = "\n".join(f"{path} {blob.git_oid}" for path, blob in sorted(files.items()))
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{listing}\n{next(self._counter)}".encode()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, title, dict(files), date)
        repo.commits[commit.oid] = commit
        return commit

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        first = self._new_commit(repo, None, "initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return repo

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def _readable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self._readable_repo(repo_id, user)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, "You don't have the rights to write to this repo")
        return repo

    @staticmethod
    def _commit_at(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _is_lfs(self, commit: Commit, path: str, size: int) -> bool:
        attributes = commit.files.get(".gitattributes")
        patterns = []
        if attributes is not None:
            for line in attributes.data.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) > 1 and "filter=lfs" in parts[1:]:
                    patterns.append(parts[0])
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)

    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------------------------------------ routes
    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Route one request; return (status, headers, body)."""
        split = urlsplit(raw_path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        user, bad_token = self._user(headers)
        with self._lock:
            self.requests.append(Request(method, unquote(split.path), query, user, bad_token))
        try:
            if segments[:1] == ["_lfs"]:  # signed upload URLs: no Authorization, like a storage bucket
                return self._lfs_object(method, segments[1:], query, body)
            if bad_token:
                raise HubError(401, INVALID_TOKEN)
            with self._lock:
                return self._route(method, segments, query, user, body)
        except HubError as error:
            payload = {"error": error.message, **error.extra}
            extra = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                extra["X-Error-Code"] = error.code
            return error.status, extra, json.dumps(payload).encode()

    def _user(self, headers: Any) -> tuple[str | None, bool]:
        value = headers.get("Authorization")
        if not value:
            return None, False
        token = value.removeprefix("Bearer ").strip()
        user = self.tokens.get(token)
        return user, user is None

    def _route(self, method: str, s: list[str], query: dict[str, list[str]], user: str | None,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._json(*self._repos_create(_json_body(body), user))
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._json(*self._validate_yaml(_json_body(body)))
        if method == "GET" and s == ["api", "whoami-v2"]:
            return self._json(200, self._whoami(user))
        if method == "GET" and s == ["api", "agent-harnesses"]:  # the client asks once per day for its user agent
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if method == "GET" and not rest:
                return self._json(200, self._model_info(repo_id, "main", user))
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._json(200, self._model_info(repo_id, rest[1], user))
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(200, self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive, user))
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._json(200, self._preupload(repo_id, rest[1], _json_body(body), user, query))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._json(200, self._commit(repo_id, rest[1], body, user, query))
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._json(200, self._create_branch(repo_id, rest[1], _json_body(body), user))
        if method == "POST" and len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{s[0]}/{s[1].removesuffix('.git')}"
            status, payload = 200, self._lfs_batch(repo_id, _json_body(body), user)
            return status, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(payload).encode()
        if method in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return self._resolve(method, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), user)
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} /{'/'.join(s)})")

    @staticmethod
    def _json(status: int, payload: Any) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _repos_create(self, payload: dict[str, Any], user: str | None) -> tuple[int, dict[str, Any]]:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "the stand-in only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload.get('name')}"
        if not _REPO_ID.fullmatch(repo_id):
            raise HubError(400, f"Invalid repo name: {repo_id}")
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._create_repo(repo_id, private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        content = str(payload.get("content", ""))
        self.validated_cards.append(content)
        match = _YAML_BLOCK.match(content)
        errors: list[dict[str, str]] = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as error:
                metadata, errors = {}, [{"message": f"Invalid YAML: {error}"}]
            if not isinstance(metadata, dict):
                metadata, errors = {}, [{"message": "metadata must be a YAML mapping"}]
            values = metadata.get("base_model")
            for value in values if isinstance(values, list) else [values] if values is not None else []:
                if not isinstance(value, str) or not _REPO_ID.fullmatch(value) or ".." in value or "--" in value:
                    errors.append({"message": f'"base_model" with value "{value}" is not valid. Use a model id '
                                              "from https://hf.co/models."})
        if errors:
            return 400, {"errors": errors, "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _whoami(self, user: str | None) -> dict[str, Any]:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return {"type": "user", "name": user, "orgs": [{"name": o} for o in self.orgs.get(user, [])],
                "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": "write"}}}

    def _model_info(self, repo_id: str, revision: str, user: str | None) -> dict[str, Any]:
        repo = self._readable_repo(repo_id, user)
        commit = self._commit_at(repo, revision)
        card = commit.files.get("README.md")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.commits[next(iter(repo.commits))].date,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        if card is not None:
            match = _YAML_BLOCK.match(card.data.decode(errors="replace"))
            if match:
                try:
                    data = yaml.safe_load(match.group(1))
                    if isinstance(data, dict):
                        info["cardData"] = data
                except yaml.YAMLError:
                    pass
        return info

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool, user: str | None) -> list[dict]:
        repo = self._readable_repo(repo_id, user)
        commit = self._commit_at(repo, revision)
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        if base and not any(p.startswith(base) for p in commit.files):
            raise HubError(404, f"{prefix} does not exist on \"{revision}\"", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                                "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
                entries[path] = entry
        return list(entries.values())

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any], user: str | None,
                   query: dict[str, list[str]]) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        if query.get("create_pr"):
            raise HubError(400, "the stand-in does not do pull requests")
        commit = self._commit_at(repo, revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            existing = commit.files.get(path)
            files.append({
                "path": path,
                "uploadMode": "lfs" if self._is_lfs(commit, path, size) else "regular",
                "shouldIgnore": False,
                "oid": existing.remote_oid if existing is not None else None,
            })
        return {"files": files, "commitOid": commit.oid}

    def _commit(self, repo_id: str, revision: str, body: bytes, user: str | None,
                query: dict[str, list[str]]) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        if query.get("create_pr"):
            raise HubError(400, "the stand-in does not do pull requests")
        head = self._commit_at(repo, revision)
        if revision not in repo.branches:
            raise HubError(400, f"can only commit to a branch, not to {revision}")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as error:
            raise HubError(400, f"commit payload is not NDJSON: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: only base64 file content is supported")
                files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value.get("oid", ""))
                if data is None or (value.get("size") is not None and len(data) != int(value["size"])):
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does "
                                        f"not exist: {path}")
                files[path] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, head.oid, str(header.get("summary", "")), files)
        repo.branches[revision] = commit.oid
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True,
                "pullRequestUrl": None}

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any], user: str | None) -> dict:
        repo = self._writable_repo(repo_id, user)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._commit_at(repo, str(payload.get("startingPoint") or "main"))
        repo.branches[branch] = start.oid
        return {}

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any], user: str | None) -> dict[str, Any]:
        self._writable_repo(repo_id, user)
        if payload.get("operation") != "upload":
            raise HubError(400, "the stand-in only takes LFS uploads (downloads go through resolve)")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.lfs_objects:
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{oid}?size={size}&sig={self._sign(oid, size)}"},
                    "verify": {"href": f"{self.url}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _lfs_object(self, method: str, rest: list[str], query: dict[str, list[str]],
                    body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == "PUT" and len(rest) == 1:
            oid = rest[0]
            size = int(query.get("size", ["-1"])[0])
            if not hmac.compare_digest(query.get("sig", [""])[0], self._sign(oid, size)):
                raise HubError(403, "bad upload signature")
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"uploaded bytes do not match oid {oid} / size {size}")
            with self._lock:
                self.lfs_objects[oid] = body
                self.lfs_puts.append(oid)
            return 200, {}, b""
        if method == "POST" and rest == ["verify"]:
            payload = _json_body(body)
            data = self.lfs_objects.get(str(payload.get("oid")))
            if data is None or len(data) != int(payload.get("size", -1)):
                raise HubError(404, "object not found")
            return self._json(200, {})
        raise HubError(404, "no such LFS route")

    def _resolve(self, method: str, repo_id: str, revision: str, path: str,
                 user: str | None) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable_repo(repo_id, user)
        commit = self._commit_at(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.sha256 if blob.lfs else blob.git_oid}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        return 200, headers, blob.data


class _Handler(BaseHTTPRequestHandler):
    """Reads one request (Content-Length or chunked body), asks the stand-in, writes the answer."""

    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, method: str) -> None:
        body = self._body()
        status, headers, payload = self.hub.handle(method, self.path, self.headers, body)
        content_range = None
        if method == "GET" and status == 200 and "Range" in self.headers and "X-Repo-Commit" in headers:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"].strip())
            if match:
                start = int(match[1])
                end = int(match[2]) if match[2] else len(payload) - 1
                content_range = f"bytes {start}-{end}/{len(payload)}"
                payload, status = payload[start:end + 1], 206
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if content_range:
            self.send_header("Content-Range", content_range)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - stdlib names
        self._answer("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._answer("PUT")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise HubError(400, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise HubError(400, "request body must be a JSON object")
    return data
