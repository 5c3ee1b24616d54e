"""Fixtures that point the real huggingface_hub client at the stand-in Hub (tests/hub_standin.py).

The client reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and HF_HOME at import, so each test sets the
variables *and* patches `huggingface_hub.constants`; the cache, token file and the client's small state files
live in the test's temporary folder, never in the user's home.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hub_standin import HubStandIn

WRITE_TOKEN = "hf_standin_write_4f9c2a7e1b"
#: the README PEFT writes into an adapter folder names the base by its local path; the Hub rejects that card
PEFT_CARD = "README.md"


def isolate_client(monkeypatch: pytest.MonkeyPatch, home: Path, *, offline: bool) -> Path:
    """Give the client a private HF_HOME (cache, token file, state) and the offline flag; return the hub cache."""
    from huggingface_hub import constants

    hf_home = home / "hf_home"
    cache = hf_home / "hub"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(hf_home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    return cache


def point_client_at(url: str, monkeypatch: pytest.MonkeyPatch, home: Path, token: str | None = WRITE_TOKEN) -> Path:
    """Point the client at `url` (HF_ENDPOINT), take the LFS path (Xet off), go online; return the hub cache."""
    from huggingface_hub import constants

    cache = isolate_client(monkeypatch, home, offline=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    return cache


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """A running stand-in Hub (user 'user', member of org 'org') with the client pointed at it."""
    with HubStandIn(tokens={WRITE_TOKEN: "user"}, orgs={"user": ["org"]}) as server:
        point_client_at(server.url, monkeypatch, tmp_path)
        yield server


def upload_folder(repo_id: str, folder: Path, *, ignore: list[str] | None = None, private: bool = False) -> str:
    """Create `repo_id` on the stand-in and upload `folder` with the real client; return the commit oid."""
    from huggingface_hub import HfApi

    api = HfApi(token=WRITE_TOKEN)
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=ignore).oid


def upload_demo(demo: Path, tmp_path: Path, license_card: bool = True) -> dict[str, str]:
    """Host the demo on the stand-in: org/base (with a card: apache-2.0), org/style, org/math; return commit oids.

    The adapters' PEFT cards name the base by a local path (base_model: ../../base), which the Hub refuses,
    so they stay behind, as they would have to on the real Hub.
    """
    base = tmp_path / "hosted_base"
    shutil.copytree(demo / "base", base)
    if license_card:
        (base / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n\n# tiny base\n")
    oids = {"org/base": upload_folder("org/base", base)}
    for name in ("style", "math"):
        oids[f"org/{name}"] = upload_folder(f"org/{name}", demo / "adapters" / name, ignore=[PEFT_CARD])
    return oids
