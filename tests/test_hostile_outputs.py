"""A hostile user's output paths against every command (#23): nothing is written into, over, or deleted that the
command did not create, and bad input is one line, exit 2.

The catalogue tried (run: `merge run`; reports: `merge inspect --out`, `merge sweep --out`, `merge eval --out`,
`merge verify --quantize --report`) and the outcome now; "was" marks what this round fixed:

| output path                                        | run                     | reports                     |
|----------------------------------------------------|-------------------------|-----------------------------|
| the config's folder (`.`, `--out .`, `../x/../cfg`)| refused (holds config)  | refused (not ours)          |
| our own report folder holding the config / notes   | -                       | refused (was: deleted them) |
| a symlink to an input; a path through a symlinked  | refused (inside input)  | refused                     |
|   folder into an input; `..` paths into an input   |                         |                             |
| equal to the base; holding the inputs (`../demo`)  | refused                 | refused                     |
| `--out` a file; a path under a file                | refused                 | refused (click: one line)   |
| a user's folder of notes, --overwrite              | refused (was: deleted)  | refused                     |
| another command's report (marker of inspect/sweep) | refused (was: deleted)  | refused, names the command  |
| forged marker: wrong magic / junk JSON / a folder  | refused (was: deleted)  | refused                     |
|   named like it / a symlink / > 16 kB              |                         |                             |
| a config copy alone, or as a folder / link / junk  | refused (was: deleted)  | -                           |
| a merge output that also holds the user's notes    | refused (was: deleted)  | -                           |
| an empty folder; an earlier merge output, -ow      | replaced (intended)     | -                           |
| inside / equal to a Hugging Face cache entry       | refused (was: written   | refused (was: written into  |
|   (snapshot, blobs, the repo folder)               |   into blobs/)          |   blobs/)                   |
| holding the folder an input's symlinked files      | refused                 | refused                     |
|   point into                                       |                         |                             |
| a symlink loop                                     | refused                 | refused (was: exit 1,       |
|                                                    |                         |   RuntimeError)             |
| a dangling symlink                                 | written where it points | -                           |
| unwritable (/proc/x; read-only parents as non-root)| refused up front (was:  | refused up front            |
|                                                    |   exit 1 "no space")    |                             |
| a user's `.out.tmp-notes` / `.out.old-notes` beside| kept (was: deleted as a | kept                        |
|   the output                                       |   killed run's folder)  |                             |
| mega file whose last output is a user's folder, -ow| refused before document 1 merges (was: document 1 written) |
| `merge eval --remerge` onto a user's folder / a    | refused                 | -                           |
|   merge output holding notes                       |                         |                             |
| an output name of 234..255 bytes (256 and more)    | refused up front (was: merged, then exit 1; OSError)  |
| a folder name with a newline, in an error          | one line, escaped (was: two lines)                    |
| a file put into a sweep's --out while it runs      | -                       | swap stops, file kept (was: |
|                                                    |                         |   deleted at the swap)      |

`merge convert` only prints (nothing written for any --out); `merge publish` writes nothing locally (tested
against tests/hub_standin.py) and refuses a folder holding a link out of it or a loop (was: uploaded the file
the link points at); `merge verify` without --report writes nothing. Read-only parents cannot be tried
as root (the tests skip there; /proc stands in). SIGINT/SIGTERM/SIGKILL at every write step are in
tests/test_faults.py and tests/test_sweep_safety.py; here: a signal inside the output checks leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite import MergeConfig, merge
from mergekit_lite.cli import main
from mergekit_lite.errors import MergeConfigError, OutputPathError
from mergekit_lite.writers import ownership
from mergekit_lite.writers.ownership import MARKER, check_output_folder, owned_folder, write_marker
from mergekit_lite.writers.preflight import check_apart, preflight_output
from mergekit_lite.writers.staging import remove_stale

from .hub_fixtures import hub  # noqa: F401
from .refusals import one_line as _one_line


def _tree(folder: Path) -> dict[str, Any]:
    """Every entry under `folder`: file bytes, link targets, folders."""
    seen: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        seen[key] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return seen


def _config(work: Path, demo: Path, output: str, name: str = "config.yaml") -> Path:
    (work / "cfg").mkdir(parents=True, exist_ok=True)
    data = {"base_model": str(demo / "base"), "method": "task_arithmetic",
            "adapters": [{"path": str(demo / "adapters" / "style")}, {"path": str(demo / "adapters" / "math")}],
            "output": {"path": output}}
    path = work / "cfg" / name
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def work(demo: Path, tmp_path: Path) -> Path:
    """A workspace: the config folder (with the user's notes), a user's folder of notes, a symlink loop."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "notes.txt").write_text("my notes")
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    (tmp_path / "mine" / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


# ------------------------------------------------------------------------------------------- merge run --overwrite


def test_overwrite_refuses_a_merge_output_that_also_holds_the_users_files(demo: Path, work: Path) -> None:
    config = _config(work, demo, "../out")
    assert _invoke("run", str(config), "--device", "cpu", "--no-progress").exit_code == 0
    (work / "out" / "notes.txt").write_text("mine")
    before = _tree(work / "out")
    line = _one_line(_invoke("run", str(config), "--device", "cpu", "--no-progress", "--overwrite"),
                     "'notes.txt', which no merge writes")
    assert str(work / "out") in line and _tree(work / "out") == before
    (work / "out" / "notes.txt").unlink()  # a merge output alone is replaced
    assert _invoke("run", str(config), "--device", "cpu", "--no-progress", "--overwrite").exit_code == 0


@pytest.mark.parametrize("forgery", ["marker_wrong_magic", "marker_junk", "marker_folder", "inspect_report",
                                     "config_copy_folder", "config_copy_with_weights"])
def test_overwrite_refuses_a_forged_folder(demo: Path, work: Path, forgery: str) -> None:
    mine = work / "mine"
    if forgery == "marker_wrong_magic":
        (mine / MARKER).write_text(json.dumps({**ownership.marker_data("inspect"), ownership.MAGIC_KEY: "x"}))
    elif forgery == "marker_junk":
        (mine / MARKER).write_text("{{{")
    elif forgery == "marker_folder":
        (mine / MARKER).mkdir()
    elif forgery == "inspect_report":
        write_marker(mine, "inspect")
    elif forgery == "config_copy_folder":
        (mine / "mergekit_lite_config.yaml").mkdir()
    else:  # a merge's config copy and weights beside the user's own files
        (mine / "mergekit_lite_config.yaml").write_text("base_model: b\nadapters: [{path: a}]\n")
        (mine / "model.safetensors").write_bytes(b"mine")
    before = _tree(mine)
    config = _config(work, demo, "../mine")
    _one_line(_invoke("run", str(config), "--device", "cpu", "--no-progress", "--overwrite"), str(mine))
    assert _tree(mine) == before


def test_a_mega_file_checks_every_output_before_its_first_merge(demo: Path, work: Path) -> None:
    """--out gives the last document's output: a user's folder there stops the chain before document 1 writes."""
    first = {"name": "first", "base_model": str(demo / "base"), "method": "linear",
             "adapters": [{"path": str(demo / "adapters" / "style")}, {"path": str(demo / "adapters" / "math")}]}
    last = {"base_model": str(demo / "base"), "method": "linear", "models": [{"path": "first"}]}
    mega = work / "cfg" / "mega.yaml"
    mega.write_text(yaml.safe_dump_all([first, last]))
    before = _tree(work)
    line = _one_line(_invoke("run", str(mega), "--out", str(work / "mine"), "--device", "cpu", "--no-progress",
                             "--overwrite"), "not a merge output")
    assert "document 2" in line and _tree(work) == before and not (work / "cfg" / "first").exists()


def test_the_python_api_refuses_a_symlink_loop_and_an_unwritable_place_in_one_line(demo: Path, work: Path) -> None:
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "linear",
                                    "adapters": [{"path": str(demo / "adapters" / "style")}],
                                    "output": {"path": str(work / "out")}})
    with pytest.raises((OutputPathError, MergeConfigError), match="symlink loop"):
        merge(config, out=work / "loop" / "x", device="cpu", progress=False, overwrite=True)
    with pytest.raises(OutputPathError, match="symlink loop"):
        preflight_output(work / "loop", True, [])
    if Path("/proc/self").is_dir():  # a place nobody can write into, even root
        with pytest.raises(OutputPathError, match="cannot be written"):
            merge(config, out="/proc/mergekit_lite_out", device="cpu", progress=False)


@pytest.mark.parametrize("name", ["n" * 234, "n" * 256, "n" * 300 + "/x"])
def test_an_output_name_too_long_for_our_temporary_folder_is_refused_up_front(demo: Path, work: Path,
                                                                               name: str) -> None:
    """A name of 234..255 bytes passed the checks, merged, then failed creating `.{name}.tmp-…` (exit 1); longer
    ones were an OSError (exit 1)."""
    config = _config(work, demo, f"../{name}")
    before = _tree(work)
    _one_line(_invoke("run", str(config), "--device", "cpu", "--no-progress"), "pick a shorter name")
    _one_line(_invoke("inspect", str(config), "--no-plots", "--out", str(work / name)), "pick a shorter name")
    assert _tree(work) == before
    assert _invoke("run", str(_config(work, demo, "../" + "n" * 233)), "--device", "cpu", "--no-progress",
                   ).exit_code == 0


def test_a_folder_name_with_a_newline_still_gives_one_line(demo: Path, work: Path) -> None:
    mine = work / "a\nb"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    line = _one_line(_invoke("run", str(_config(work, demo, "../a\nb")), "--device", "cpu", "--no-progress",
                             "--overwrite"), "not a merge output")
    assert "a\\nb" in line and (mine / "notes.txt").read_text() == "x"


# ------------------------------------------------------------------------------------- where the output may lie


def _hf_cache(root: Path, demo: Path) -> Path:
    """A Hugging Face cache entry laid out as the client makes it: snapshot files link into blobs/."""
    repo = root / "hub" / "models--org--base"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for number, source in enumerate(sorted((demo / "base").iterdir())):
        blob = repo / "blobs" / f"{number:064x}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return repo


@pytest.mark.parametrize("where", ["snapshot", "inside_snapshot", "blobs", "inside_blobs", "repo"])
def test_an_output_in_the_hugging_face_cache_is_refused_by_every_command(demo: Path, tmp_path: Path,
                                                                         where: str) -> None:
    repo = _hf_cache(tmp_path, demo)
    snapshot = repo / "snapshots" / ("0" * 40)
    target = {"snapshot": snapshot, "inside_snapshot": snapshot / "merged", "blobs": repo / "blobs",
              "inside_blobs": repo / "blobs" / "merged", "repo": repo}[where]
    before = _tree(repo)
    inputs = [("the base model", snapshot)]
    with pytest.raises(OutputPathError, match="Hugging Face cache entry"):
        preflight_output(target, True, inputs)
    for command in ("inspect", "sweep", "eval"):
        with pytest.raises(OutputPathError, match="Hugging Face cache entry"):
            check_output_folder(target, command, inputs)
    assert _tree(repo) == before


def test_an_output_holding_the_folder_an_inputs_files_link_into_is_refused(demo: Path, tmp_path: Path) -> None:
    """An adapter whose weights are symlinks into a store: replacing the store (or a folder holding it) as the
    output would delete the adapter's data."""
    store = tmp_path / "store" / "weights"
    store.mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for source in (demo / "adapters" / "style").iterdir():
        shutil.copyfile(source, store / source.name)
        (adapter / source.name).symlink_to(store / source.name)
    for target in (store, store.parent):
        with pytest.raises(OutputPathError, match="links to"):
            check_apart(target, [("adapter 'style'", adapter)])
    check_apart(tmp_path / "elsewhere", [("adapter 'style'", adapter)])


def test_a_users_folders_named_like_our_temporary_ones_are_kept(tmp_path: Path) -> None:
    """Only folders named exactly as a run names them (and unlocked) are a killed run's."""
    for name in (".out.tmp-notes", ".out.old-notes", ".out.tmp-0123", ".out.old-toolong123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "n.txt").write_text(name)
    (tmp_path / ".out.tmp-0123456789abcdef").mkdir()  # ours: a staging folder's 16 hex digits
    (tmp_path / ".out.tmp-probe-abcd_123").mkdir()  # ours: a write probe
    removed = remove_stale(tmp_path / "out")
    assert sorted(p.name for p in removed) == [".out.tmp-0123456789abcdef", ".out.tmp-probe-abcd_123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-notes", ".out.old-toolong123", ".out.tmp-0123",
                                                          ".out.tmp-notes"]
    assert not (tmp_path / "out").exists()  # a user's .out.old-notes is not 'restored' as the output


# --------------------------------------------------------------------------------------------- report folders


def test_a_report_folder_of_ours_holding_the_users_files_is_not_replaced(tmp_path: Path) -> None:
    """A report's marker lists what it wrote: a config or notes put there since are the user's."""
    target = tmp_path / "report"
    with owned_folder(target, "inspect") as staging:
        (staging / "report.md").write_text("old")
    assert json.loads((target / MARKER).read_text())["entries"] == ["report.md"]
    assert check_output_folder(target, "inspect") is True
    (target / "config.yaml").write_text("base_model: mine\n")
    before = _tree(target)
    with pytest.raises(OutputPathError, match="'config.yaml', which `merge inspect` did not write"):
        check_output_folder(target, "inspect")
    with pytest.raises(OutputPathError, match="appeared there while it ran"), owned_folder(target, "inspect") as s:
        (s / "report.md").write_text("new")
    assert _tree(target) == before


def test_a_users_file_put_into_a_sweeps_folder_while_it_runs_is_kept(tmp_path: Path) -> None:
    """A sweep claims an empty --out and writes its cache there in place: the claim lists the cache, so a killed
    sweep resumes, but a file the user puts there meanwhile stops the final swap instead of being deleted."""
    target = tmp_path / "out"
    ownership.claim(target, "sweep", ["cache"])
    (target / "cache").mkdir()
    (target / "cache" / "point.json").write_text("{}")
    assert check_output_folder(target, "sweep") is True  # --resume after a kill
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="appeared there"), owned_folder(target, "sweep", keep=["cache"]) as s:
        (s / "leaderboard.md").write_text("new")
    assert (target / "notes.txt").read_text() == "mine" and (target / "cache" / "point.json").is_file()


def test_a_marker_without_entries_still_vouches_for_its_folder(tmp_path: Path) -> None:
    """Reports written before markers listed entries (and a sweep's claimed folder) stay replaceable."""
    write_marker(tmp_path, "sweep")
    (tmp_path / "leaderboard.md").write_text("old")
    assert check_output_folder(tmp_path, "sweep") is True


@pytest.mark.parametrize("entries", [[1], ["a/b"], [""], "report.md", {"a": 1}])
def test_a_marker_with_malformed_entries_is_not_ours(tmp_path: Path, entries: Any) -> None:
    (tmp_path / MARKER).write_text(json.dumps({**ownership.marker_data("eval"), "entries": entries}))
    assert ownership.read_marker(tmp_path) is None


def test_inspect_rerun_from_a_config_kept_in_its_own_report_folder_deletes_nothing(demo: Path, work: Path) -> None:
    config = _config(work, demo, "../out")
    report = work / "report"
    assert _invoke("inspect", str(config), "--out", str(report), "--no-plots").exit_code == 0
    kept = shutil.copy(config, report / "config.yaml")
    before = _tree(report)
    _one_line(_invoke("inspect", str(kept), "--out", str(report), "--no-plots"), "'config.yaml'")
    assert _tree(report) == before


def _as_sweep(config: Path) -> None:
    """Turn a merge config into a one-point sweep config (refusals come before any model loads)."""
    data = yaml.safe_load(config.read_text())
    data.pop("method")
    config.write_text(yaml.safe_dump({**data, "sweep": {"method": ["linear"]}, "eval": {"tasks": ["add"]}}))


@pytest.mark.parametrize("command", ["inspect", "sweep", "eval", "verify"])
def test_a_symlink_loop_as_the_report_folder_is_one_line(demo: Path, work: Path, command: str) -> None:
    config = _config(work, demo, "../out")
    args = {"inspect": ["inspect", str(config), "--no-plots", "--out"],
            "sweep": ["sweep", str(config), "--device", "cpu", "--no-progress", "--out"],
            "eval": ["eval", str(config), "--no-progress", "--out"],
            "verify": ["verify", str(work / "out"), "--quantize", "q8_0", "--report"]}[command]
    _as_sweep(config) if command == "sweep" else None
    if command == "verify":
        pytest.importorskip("gguf")
        assert _invoke("run", str(config), "--device", "cpu", "--no-progress").exit_code == 0
    before = _tree(work)
    _one_line(_invoke(*args, str(work / "loop")), "symlink loop")
    assert _tree(work) == before


@pytest.mark.parametrize("command", ["inspect", "sweep", "eval"])
def test_another_commands_report_is_named_in_the_refusal(demo: Path, work: Path, command: str) -> None:
    config = _config(work, demo, "../out")
    other = "eval" if command != "eval" else "sweep"
    write_marker(work / "mine", other)
    args = {"inspect": ["inspect", str(config), "--no-plots"],
            "sweep": ["sweep", str(config), "--device", "cpu", "--no-progress"],
            "eval": ["eval", str(config), "--no-progress"]}[command]
    _as_sweep(config) if command == "sweep" else None
    before = _tree(work)
    _one_line(_invoke(*args, "--out", str(work / "mine")), f"a `merge {other}` report")
    assert _tree(work) == before


def test_convert_writes_nothing_whatever_out_says(work: Path) -> None:
    mergekit = work / "cfg" / "mk.yml"
    mergekit.write_text("merge_method: linear\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                        "  - model: b\n    parameters: {weight: 1}\ndtype: float32\n")
    before = _tree(work)
    for out in (str(work / "cfg"), str(work / "cfg" / "notes.txt"), str(work / "mine"), str(work / "loop")):
        result = _invoke("convert", str(mergekit), "--out", out)
        assert result.exit_code == 0 and yaml.safe_load(result.stdout)["output"]["path"] == out
    assert _tree(work) == before


# ------------------------------------------------------------------------------------------------------ publish


def test_publish_writes_nothing_into_the_folder_it_sends(hub: Any, demo: Path, work: Path) -> None:
    """`merge publish` reads the merge output and the stand-in Hub answers; not a byte changes locally (no card
    rewritten, no client state such as .cache/huggingface left in the folder), and a folder that is not a
    merge output, or a symlink loop, is one line."""
    config = _config(work, demo, "../out")
    assert _invoke("run", str(config), "--device", "cpu", "--no-progress").exit_code == 0
    (work / "out" / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# merge\n")  # local paths otherwise
    def local() -> dict[str, Any]:  # the workspace but the client's own HF_HOME
        return {k: v for k, v in _tree(work).items() if not k.startswith("hf_home")}

    before = local()
    result = _invoke("publish", str(work / "out"), "--repo-id", "user/hostile")
    assert result.exit_code == 0, result.output
    assert local() == before
    for folder in (work / "mine", work / "loop", work / "cfg"):
        _one_line(_invoke("publish", str(folder), "--repo-id", "user/hostile"))
    assert local() == before


def test_publish_refuses_a_link_out_of_the_folder(hub: Any, demo: Path, work: Path) -> None:
    """A merge output holding a symlink to a file elsewhere (a key, a private note) would upload that file."""
    config = _config(work, demo, "../out")
    assert _invoke("run", str(config), "--device", "cpu", "--no-progress").exit_code == 0
    (work / "out" / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# merge\n")
    (work / "secret.txt").write_text("private")
    (work / "out" / "notes.json").symlink_to(work / "secret.txt")
    for extra in (["--dry-run"], []):
        _one_line(_invoke("publish", str(work / "out"), "--repo-id", "user/hostile", *extra), "a link out of")
    (work / "out" / "notes.json").unlink()
    (work / "out" / "loop.json").symlink_to(work / "out" / "loop.json")
    _one_line(_invoke("publish", str(work / "out"), "--repo-id", "user/hostile", "--dry-run"), "a link out of")


# ------------------------------------------------------------------------------------------- signals, odd moments


@pytest.mark.parametrize("moment", ["swap_check", "write_probe"])
def test_ctrl_c_in_the_output_checks_leaves_the_previous_output_and_nothing_else(
        demo: Path, work: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """Ctrl-C while the output is checked again at the swap, or while the write probe exists: the previous merge
    output is whole and no temporary folder is left beside it or inside it."""
    import mergekit_lite.api as api

    config = _config(work, demo, "../out")
    assert _invoke("run", str(config), "--device", "cpu", "--no-progress").exit_code == 0
    before = _tree(work / "out")

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if moment == "swap_check":
        monkeypatch.setattr(api, "check_replaceable", interrupt)
    else:
        real = os.rmdir
        monkeypatch.setattr(ownership.os, "rmdir", lambda path: (real(path), interrupt()))
    result = _invoke("run", str(config), "--device", "cpu", "--no-progress", "--overwrite")
    assert result.exit_code == 130, result.output
    assert _tree(work / "out") == before
    assert sorted(p.name for p in work.iterdir()) == ["cfg", "loop", "mine", "out"]
