"""The Hub over real HTTP: Hub ids as inputs, `merge publish`, `output.push_to_hub`, against tests/hub_standin.py.

Every test runs the real huggingface_hub client against a stand-in server on 127.0.0.1 (HF_ENDPOINT), with
Xet disabled so uploads take the LFS batch + PUT path; nothing reaches huggingface.co.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_lite import AdapterError, CheckpointError, MergeConfig, merge
from mergekit_lite.cli import main
from mergekit_lite.hub.publish import PublishError, UnpublishableError, publish_folder
from mergekit_lite.hub.resolve import parse_hub_id

from .conftest import write_config
from .hub_fixtures import WRITE_TOKEN, hub, isolate_client, upload_demo, upload_folder  # noqa: F401
from .hub_standin import HubStandIn
from .reference import load_checkpoint


def merge_config(base: str, adapters: list[dict], out: Path, config_dir: Path, **output: object) -> MergeConfig:
    return MergeConfig.from_dict(
        {"base_model": base, "method": "task_arithmetic", "adapters": adapters,
         "output": {"path": str(out), **output}, "seed": 3},
        config_dir,
    )


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Path:
    """A finished merge of the demo in three shards (index + shards + side files + card), made once."""
    out = tmp_path_factory.mktemp("merged") / "demo-merge"
    config = merge_config(str(demo / "base"), [{"path": str(demo / "adapters" / "style")},
                                                {"path": str(demo / "adapters" / "math"), "weight": -0.5}],
                          out, demo, shard_size="150kB")
    merge(config, device="cpu", progress=False)
    return out


@pytest.fixture
def folder(merged_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the merged folder (tests may damage it)."""
    target = tmp_path / "demo-merge"
    shutil.copytree(merged_folder, target)
    return target


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- publishing
def test_publish_then_snapshot_download_gives_byte_identical_files(
    hub: HubStandIn, folder: Path, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1  # the index + several LFS shards path
    result = publish_folder(folder, "user/demo-merge")
    assert result.changed and result.url == f"{hub.url}/user/demo-merge"
    assert result.commit_oid == hub.head("user/demo-merge").oid
    sent = local_files(folder)
    stored = hub.head("user/demo-merge").files
    assert {p for p in sent if p.endswith(".safetensors")} == {p for p, blob in stored.items() if blob.lfs}
    assert len(hub.lfs_puts) == len([p for p in sent if p.endswith(".safetensors")])  # the LFS batch + PUT path
    downloaded = Path(snapshot_download("user/demo-merge", cache_dir=tmp_path / "elsewhere"))
    back = {k: v for k, v in local_files(downloaded).items() if k != ".gitattributes"}
    assert back.keys() == sent.keys()
    assert all(back[name] == sent[name] for name in sent)  # byte for byte, shards and card alike
    assert any("base_model_relation: merge" in card for card in hub.validated_cards)


@pytest.mark.slow
def test_republishing_an_unchanged_folder_makes_no_new_commit(hub: HubStandIn, folder: Path) -> None:
    first = publish_folder(folder, "user/demo-merge")
    commits = hub.commit_count("user/demo-merge")
    commit_posts = len(hub.paths("POST"))
    again = publish_folder(folder, "user/demo-merge")
    assert hub.commit_count("user/demo-merge") == commits
    assert not again.changed and again.commit_oid == first.commit_oid
    assert "no new commit" in again.summary()
    assert not [p for p in hub.paths("POST")[commit_posts:] if p.endswith("/commit/main")]
    with (folder / "README.md").open("a") as card:  # one changed file -> exactly one new commit
        card.write("\nEdited.\n")
    changed = publish_folder(folder, "user/demo-merge")
    assert changed.changed and hub.commit_count("user/demo-merge") == commits + 1
    assert hub.file_bytes("user/demo-merge", "README.md").endswith(b"Edited.\n")


def test_wrong_token_fails_with_a_clear_message_and_never_shows_the_token(
    hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hf_wrong_token_Zx81pQ"
    monkeypatch.setenv("HF_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(main, ["publish", str(folder), "--repo-id", "user/demo-merge"])
    assert result.exit_code == 1, result.output
    assert "the Hub rejected the token (HTTP 401)" in result.stderr and "HF_TOKEN" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert secret not in result.output and secret not in caplog.text
    assert hub.requests and all(r.bad_token for r in hub.requests if r.path == "/api/repos/create")
    assert "user/demo-merge" not in hub.repos


def test_missing_token_is_refused_before_any_request(
    hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="no Hub token: set HF_TOKEN"):
        publish_folder(folder, "user/demo-merge")
    assert hub.requests == []


def test_token_without_rights_to_the_namespace_is_a_clear_error(hub: HubStandIn, folder: Path) -> None:
    with pytest.raises(PublishError, match="may not write to 'someone-else' \\(HTTP 403\\)"):
        publish_folder(folder, "someone-else/demo-merge")


@pytest.mark.parametrize(
    "metadata, named",
    [
        ("base_model: ../../base\nlibrary_name: peft", "base_model: ../../base"),
        ("base_model: /home/me/models/base", "base_model: /home/me/models/base"),
        ("base_model: org/base\ntags:\n- base_model:adapter:../../base", "tags[0]: base_model:adapter:../../base"),
        ("base_model:\n- org/base\n- C:\\models\\base", "base_model: C:\\models\\base"),
    ],
)
def test_card_with_a_local_path_is_refused_before_any_request(
    hub: HubStandIn, folder: Path, metadata: str, named: str
) -> None:
    (folder / "README.md").write_text(f"---\n{metadata}\n---\n\n# a card PEFT could have written\n")
    with pytest.raises(UnpublishableError, match="local paths or non-Hub ids") as refused:
        publish_folder(folder, "user/demo-merge")
    assert named in str(refused.value)
    result = CliRunner().invoke(main, ["publish", str(folder), "--repo-id", "user/demo-merge"])
    assert result.exit_code == 2 and "README.md" in result.stderr
    assert hub.requests == []  # refused on disk: not one request, not even the repo creation


def test_urls_tags_and_free_text_are_not_mistaken_for_local_paths() -> None:
    from mergekit_lite.hub.publish import local_paths_in_metadata

    metadata = {"base_model": ["org/a", "org/b"], "tags": ["region:us", "base_model:merge:org/a"],
                "license_link": "https://example.org/LICENSE", "widget": [{"text": "/imagine a cat"}]}
    assert local_paths_in_metadata(metadata) == []
    assert local_paths_in_metadata({"new_version": "./v2"}) == ["new_version: ./v2"]


@pytest.mark.parametrize("damage", ["no_config", "no_card", "missing_shard", "stray_tensor", "truncated", "bad_total"])
def test_an_inconsistent_folder_is_refused_before_any_request(hub: HubStandIn, folder: Path, damage: str) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "no_card":
        (folder / "README.md").unlink()
    elif damage == "missing_shard":
        (folder / first_shard).unlink()
    elif damage == "stray_tensor":
        name = next(iter(index["weight_map"]))
        index["weight_map"][name + ".extra"] = first_shard
        index_path.write_text(json.dumps(index))
    elif damage == "truncated":
        data = (folder / first_shard).read_bytes()
        (folder / first_shard).write_bytes(data[:-4])
    elif damage == "bad_total":
        index["metadata"]["total_size"] += 2
        index_path.write_text(json.dumps(index))
    with pytest.raises(UnpublishableError):
        publish_folder(folder, "user/demo-merge")
    assert hub.requests == []


def test_dry_run_lists_files_sizes_and_the_card_and_sends_nothing(hub: HubStandIn, folder: Path) -> None:
    result = CliRunner().invoke(main, ["publish", str(folder), "--repo-id", "user/demo-merge", "--dry-run"])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json", "README.md"):
        assert name in result.output
    assert "model-00001-of-00003.safetensors" in result.output and "kB" in result.output
    assert "base_model_relation: merge" in result.output and "## Reproduce" in result.output
    assert "token: from HF_TOKEN" in result.output and WRITE_TOKEN not in result.output
    assert "nothing sent" in result.output
    assert hub.requests == []


def test_cli_publish_prints_the_url_and_honours_branch_and_message(hub: HubStandIn, folder: Path) -> None:
    result = CliRunner().invoke(main, ["publish", str(folder), "--repo-id", "org/demo-merge", "--private",
                                       "--revision", "v1", "--commit-message", "first cut"])
    assert result.exit_code == 0, result.output
    assert f"{hub.url}/org/demo-merge/tree/v1" in result.output
    repo = hub.repos["org/demo-merge"]
    assert repo.private and hub.head("org/demo-merge", "v1").title == "first cut"
    assert "README.md" not in hub.head("org/demo-merge", "main").files  # main untouched
    assert hub.file_bytes("org/demo-merge", "config.json", "v1") == (folder / "config.json").read_bytes()


def test_push_to_hub_in_the_config_pushes_after_merge_run(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path, {
        "base_model": str(demo / "base"),
        "method": "task_arithmetic",
        "adapters": [{"path": str(demo / "adapters" / "style")}],
        "output": {"path": str(out), "push_to_hub": "user/pushed", "private": True},
    })
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and f"{hub.url}/user/pushed" in result.output
    assert hub.repos["user/pushed"].private
    for name, data in local_files(out).items():
        assert hub.file_bytes("user/pushed", name) == data
    card = hub.file_bytes("user/pushed", "README.md").decode()
    assert card.startswith("---") and "# pushed" in card


# ------------------------------------------------------------------------------------------------ Hub inputs
@pytest.mark.slow
def test_a_merge_of_hub_ids_equals_the_merge_of_the_local_folders(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    oids = upload_demo(demo, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    pinned = f"org/math@{oids['org/math']}"  # a commit oid as the revision
    hub_config = merge_config("org/base", [{"path": "org/style"}, {"path": pinned, "weight": -0.5}],
                              tmp_path / "from_hub", work)
    local_config = merge_config(str(demo / "base"), [{"path": str(demo / "adapters" / "style")},
                                                     {"path": str(demo / "adapters" / "math"), "weight": -0.5}],
                                tmp_path / "from_disk", work)
    from_hub = merge(hub_config, device="cpu", progress=False).output_dir
    from_disk = merge(local_config, device="cpu", progress=False).output_dir
    hub_tensors, disk_tensors = load_checkpoint(from_hub), load_checkpoint(from_disk)
    assert hub_tensors.keys() == disk_tensors.keys()
    assert all(torch.equal(hub_tensors[name], disk_tensors[name]) for name in disk_tensors)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (from_hub / name).read_bytes() == (from_disk / name).read_bytes()
    card = (from_hub / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "org/base" and front["license"] == "apache-2.0"
    assert "[org/style](https://huggingface.co/org/style)" in card
    assert f"[org/math@{oids['org/math']}](https://huggingface.co/org/math/tree/{oids['org/math']})" in card
    cache = os.environ["HF_HUB_CACHE"]
    for text in (card, (from_hub / "mergekit_lite_config.yaml").read_text()):
        assert cache not in text and "snapshots" not in text  # Hub ids, never the cache folders
    downloaded = [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert not [p for p in downloaded if p.endswith(".gitattributes")]
    assert hub.paths("GET").count("/api/models/org/base/revision/main") == 1  # the card reads the cache, no 2nd call


def test_only_what_a_merge_reads_is_downloaded(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    base = tmp_path / "fat_base"
    shutil.copytree(demo / "base", base)
    (base / "pytorch_model.bin").write_bytes(b"pickle, never fetched")
    (base / "original").mkdir()
    (base / "original" / "consolidated.safetensors").write_bytes(b"a subfolder, never fetched")
    (base / "merges.txt").write_text("#version: 0.2\n")
    upload_folder("org/fat", base)
    config = merge_config("org/fat", [{"path": str(demo / "adapters" / "style")}], tmp_path / "out", tmp_path)
    merge(config, device="cpu", progress=False, dry_run=True)
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert fetched == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "merges.txt"}


@pytest.mark.slow
def test_a_local_folder_wins_over_a_hub_id(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    upload_demo(demo, tmp_path)
    shutil.copytree(demo / "adapters" / "facts", tmp_path / "org" / "style")  # a local folder named like the id
    config = merge_config("org/base", [{"path": "org/style"}], tmp_path / "out", tmp_path)
    result = merge(config, device="cpu", progress=False, dry_run=True)
    assert not [r for r in hub.requests if "org/style" in r.path and r.method == "GET"]
    assert result.touched  # planned from the local folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "base, adapter, error, message",
    [
        ("org/nope", "org/style", CheckpointError,
         "base_model 'org/nope': no local folder .*, and no Hub repo 'org/nope'"),
        ("org/base", "org/style@no-such-branch", AdapterError,
         "adapter 'org/style@no-such-branch': .*no revision 'no-such-branch'"),
        ("org/base", "org/private-adapter", AdapterError, "no Hub repo 'org/private-adapter'.*log in"),
    ],
)
def test_a_missing_repo_or_revision_is_a_clear_error(
    hub: HubStandIn, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str, adapter: str,
    error: type[Exception], message: str
) -> None:
    upload_demo(demo, tmp_path)
    upload_folder("org/private-adapter", demo / "adapters" / "facts", ignore=["README.md"], private=True)
    monkeypatch.delenv("HF_TOKEN")  # anonymous: the private repo reads as missing, as on the Hub
    config = merge_config(base, [{"path": adapter}], tmp_path / "out", tmp_path)
    with pytest.raises(error, match=message):
        merge(config, device="cpu", progress=False, dry_run=True)
    result = CliRunner().invoke(main, ["run", str(write_config(tmp_path, config.to_dict())), "--dry-run"])
    last = result.stderr.strip().splitlines()[-1]  # above it: the client's download progress bars, if any
    assert result.exit_code == 2 and last.startswith("error: ") and "Traceback" not in result.output


@pytest.mark.slow
def test_a_wrong_token_on_download_is_a_clear_error(
    hub: HubStandIn, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_demo(demo, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_expired_token_9d")
    config = merge_config("org/base", [{"path": "org/style"}], tmp_path / "out", tmp_path)
    with pytest.raises(CheckpointError, match="rejected the token \\(HTTP 401\\)") as failed:
        merge(config, device="cpu", progress=False, dry_run=True)
    assert "hf_expired_token_9d" not in str(failed.value)


def test_a_hub_base_without_safetensors_is_refused(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(demo / "base" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    upload_folder("org/pickled", pickled)
    config = merge_config("org/pickled", [{"path": str(demo / "adapters" / "style")}], tmp_path / "out", tmp_path)
    with pytest.raises(CheckpointError, match="no safetensors weights.*never unpickles"):
        merge(config, device="cpu", progress=False, dry_run=True)


@pytest.mark.slow
def test_offline_mode_uses_the_cache_and_is_a_clear_error_without_it(
    hub: HubStandIn, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    upload_demo(demo, tmp_path)
    config = merge_config("org/base", [{"path": "org/style"}], tmp_path / "out", tmp_path)
    online = merge(config, device="cpu", progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    offline = merge(config.with_output_path(tmp_path / "again"), device="cpu", progress=False)
    assert len(hub.requests) == seen  # the cache alone
    assert load_checkpoint(offline.output_dir).keys() == load_checkpoint(online.output_dir).keys()
    isolate_client(monkeypatch, tmp_path / "empty", offline=True)
    with pytest.raises(CheckpointError, match="no local folder .*, and HF_HUB_OFFLINE=1 and the cache holds no complete snapshot"):
        merge(config.with_output_path(tmp_path / "third"), device="cpu", progress=False)
    assert len(hub.requests) == seen


def test_hub_id_parsing() -> None:
    assert parse_hub_id("org/name") is not None and parse_hub_id("org/name").revision is None
    ref = parse_hub_id("org/name@refs/pr/1")
    assert ref is not None and (ref.repo_id, ref.revision) == ("org/name", "refs/pr/1")
    for local in ("./org/name", "../base", "/abs/path", "~/models/x", "a/b/c", "name", "org/na..me", "org\\name"):
        assert parse_hub_id(local) is None, local


# ----------------------------------------------------------------------------------------------- live (opt-in)
@pytest.mark.skipif(not os.environ.get("MERGEKIT_LITE_LIVE_HF_TOKEN"),
                    reason="set MERGEKIT_LITE_LIVE_HF_TOKEN to publish to the real Hub (<you>/mergekit-lite-live-test)")
def test_live_publish_to_the_real_hub(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ["MERGEKIT_LITE_LIVE_HF_TOKEN"]
    isolate_client(monkeypatch, tmp_path, offline=False)
    monkeypatch.setenv("HF_TOKEN", token)
    repo_id = f"{HfApi(token=token).whoami()['name']}/mergekit-lite-live-test"
    publish_folder(folder, repo_id, private=True)
    again = publish_folder(folder, repo_id, private=True)
    assert not again.changed
    downloaded = Path(snapshot_download(repo_id, cache_dir=tmp_path / "dl", token=token))
    assert all((downloaded / name).read_bytes() == data for name, data in local_files(folder).items())
