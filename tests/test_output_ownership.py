"""Output ownership: a folder is ours only when it carries our marker with our content (or, for a merge output,
its config copy); anything else non-empty, any input, anything unwritable is refused before work; an owned
folder is replaced whole, keeping what `keep` names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mergekit_lite.errors import OutputPathError
from mergekit_lite.writers import ownership
from mergekit_lite.writers.ownership import (
    MARKER,
    check_output_folder,
    claim,
    owned_folder,
    owner,
    read_marker,
    release,
    write_marker,
)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_marker_we_wrote_is_ours_and_names_its_command(tmp_path: Path) -> None:
    write_marker(tmp_path, "sweep")
    assert read_marker(tmp_path) == "sweep" and owner(tmp_path) == "sweep"


@pytest.mark.parametrize("content", [
    "", "{}", "not json", json.dumps({"mergekit_lite_output": "yes", "command": "sweep", "format": 1}),
    json.dumps({**ownership.marker_data("sweep"), "format": 2}),
    json.dumps({**ownership.marker_data("sweep"), "command": "rm"}),
    json.dumps({**ownership.marker_data("sweep"), "extra": 1}),
    json.dumps([ownership.marker_data("sweep")]),
])
def test_a_file_with_our_markers_name_but_other_content_is_not_ours(tmp_path: Path, content: str) -> None:
    (tmp_path / MARKER).write_text(content)
    assert read_marker(tmp_path) is None and owner(tmp_path) is None


@pytest.mark.parametrize("weights", ["model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"])
def test_a_merge_output_is_recognised_by_its_config_copy_beside_its_weights(tmp_path: Path, weights: str) -> None:
    (tmp_path / "mergekit_lite_config.yaml").write_text("base_model: b\nadapters: [{path: a}]\n")
    assert owner(tmp_path) is None  # a config copy alone (a user's saved config) is not a merge
    (tmp_path / weights).write_bytes(b"x")
    assert owner(tmp_path) == "run"
    (tmp_path / "mergekit_lite_config.yaml").write_text("my notes\n")
    assert owner(tmp_path) is None


@pytest.mark.parametrize("forgery", ["directory", "symlink", "junk", "list", "no_inputs", "weights_dir"])
def test_a_forged_config_copy_is_not_a_merge_output(tmp_path: Path, forgery: str) -> None:
    copy = tmp_path / "mergekit_lite_config.yaml"
    real = tmp_path / "real.yaml"
    real.write_text("base_model: b\nadapters: [{path: a}]\n")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    if forgery == "directory":
        copy.mkdir()
    elif forgery == "symlink":
        copy.symlink_to(real)
    elif forgery == "junk":
        copy.write_bytes(b"\xff\xfe: [")
    elif forgery == "list":
        copy.write_text("- base_model: b\n")
    elif forgery == "no_inputs":
        copy.write_text("base_model: b\n")
    else:
        copy.write_text(real.read_text())
        (tmp_path / "model.safetensors").unlink()
        (tmp_path / "model.safetensors").mkdir()
    assert owner(tmp_path) is None
    with pytest.raises(OutputPathError, match="not a merge output"):
        ownership.check_replaceable(tmp_path)


def test_check_replaceable_passes_absent_empty_and_merge_outputs_only(tmp_path: Path) -> None:
    ownership.check_replaceable(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    ownership.check_replaceable(tmp_path / "empty")
    write_marker(tmp_path / "empty", "sweep")
    with pytest.raises(OutputPathError, match="a `merge sweep` report, not a merge output"):
        ownership.check_replaceable(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        ownership.check_replaceable(tmp_path / "f")


def test_absent_and_empty_folders_pass_and_nothing_is_written(tmp_path: Path) -> None:
    assert check_output_folder(tmp_path / "new" / "deeper", "eval") is False
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "eval") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("files", [{"inspect.json": "{}"}, {"leaderboard.md": "mine"}, {"report.md": "x"},
                                   {MARKER: "{}"}, {"notes.txt": "x"}])
def test_a_non_empty_folder_not_ours_is_refused_in_one_line(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(OutputPathError) as caught:
        check_output_folder(tmp_path, "inspect")
    assert "\n" not in str(caught.value) and "not empty" in str(caught.value)
    assert _tree(tmp_path) == before


def test_another_commands_folder_is_not_ours(tmp_path: Path) -> None:
    write_marker(tmp_path, "eval")
    (tmp_path / "report.md").write_text("x")
    with pytest.raises(OutputPathError):
        check_output_folder(tmp_path, "sweep")
    assert check_output_folder(tmp_path, "eval") is True


@pytest.mark.parametrize("where", ["equal", "inside", "holds"])
def test_an_output_that_is_inside_or_holds_an_input_is_refused(tmp_path: Path, where: str) -> None:
    adapter = tmp_path / "adapters" / "a"
    adapter.mkdir(parents=True)
    write_marker(adapter, "inspect")  # even a folder that looks like ours
    target = {"equal": adapter, "inside": adapter / "report", "holds": tmp_path / "adapters"}[where]
    with pytest.raises(OutputPathError) as caught:
        check_output_folder(target, "inspect", [("adapter 'a'", adapter)])
    assert "adapter 'a'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "f", tmp_path / "f" / "out"):
        with pytest.raises(OutputPathError):
            check_output_folder(target, "eval")


def test_an_unwritable_place_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ownership.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputPathError) as caught:
        check_output_folder(tmp_path / "out", "eval")
    assert "cannot be written" in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_up_front(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputPathError):
            check_output_folder(folder / "out", "eval")
    finally:
        folder.chmod(0o755)


def test_an_owned_folder_is_replaced_whole_and_keeps_what_keep_names(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with owned_folder(target, "sweep") as staging:
        (staging / "old.md").write_text("old")
        (staging / "cache").mkdir()
        (staging / "cache" / "a.json").write_text("A")
    assert check_output_folder(target, "sweep") is True
    with owned_folder(target, "sweep", keep=["cache"]) as staging:
        (staging / "new.md").write_text("new")
    assert _tree(target) == {MARKER: (target / MARKER).read_bytes(), "cache/a.json": b"A", "new.md": b"new"}
    assert read_marker(target) == "sweep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_failing_body_leaves_the_previous_set(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with owned_folder(target, "eval") as staging:
        (staging / "a").write_text("1")
    before = _tree(target)
    with pytest.raises(RuntimeError), owned_folder(target, "eval") as staging:
        (staging / "a").write_text("2")
        raise RuntimeError("boom")
    assert _tree(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_files_a_user_puts_there_meanwhile_stop_the_swap(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    with pytest.raises(OutputPathError), owned_folder(target, "eval") as staging:
        (staging / "a").write_text("1")
        (target / "mine.txt").write_text("user")
    assert _tree(target) == {"mine.txt": b"user"}


def test_claim_makes_an_absent_folder_ours_and_release_undoes_it_only_when_unused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    claimed = claim(target, "sweep")
    assert claimed == "folder" and read_marker(target) == "sweep"
    release(target, claimed)
    assert not target.exists()
    target.mkdir()  # a user's empty folder: marked, then given back empty
    claimed = claim(target, "sweep")
    assert claimed == "marker" and read_marker(target) == "sweep"
    release(target, claimed)
    assert target.is_dir() and not any(target.iterdir())
    claimed = claim(target, "sweep")
    assert claim(target, "sweep") is None  # ours already
    (target / "cache").mkdir()
    release(target, claimed)
    assert read_marker(target) == "sweep" and (target / "cache").is_dir()


def test_every_file_a_merge_writes_is_one_overwrite_may_replace(tmp_path: Path) -> None:
    """--overwrite refuses a merge output holding anything no merge writes: every name a merge does write (the
    base's side files, shards, the PEFT-format files, a data-aware method's side files, eval/) must pass, or a
    plain rerun would be refused. A new side file with another kind of name belongs in ownership._MERGE_FILE."""
    from mergekit_lite.methods import learned
    from mergekit_lite.writers.checkpoint import INDEX_FILE, SIDE_FILES, shard_names

    names = [*SIDE_FILES, "config.json", "README.md", "mergekit_lite_config.yaml", "model.safetensors", INDEX_FILE,
             *shard_names(3), "adapter_config.json", "adapter_model.safetensors", learned.COEFFICIENTS_FILE,
             learned.HEATMAP_FILE, learned.LOSS_FILE]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / "eval").mkdir()
    (tmp_path / "mergekit_lite_config.yaml").write_text("base_model: b\nadapters: [{path: a}]\n")
    assert ownership.foreign_entries(tmp_path) == []
    ownership.check_replaceable(tmp_path)
    for name in ("notes.txt", "my.md", "sub", ".cache"):
        (tmp_path / name).mkdir() if name in ("sub", ".cache") else (tmp_path / name).write_text("x")
    assert ownership.foreign_entries(tmp_path) == sorted([".cache", "my.md", "notes.txt", "sub"])
