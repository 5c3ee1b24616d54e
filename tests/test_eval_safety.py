"""merge eval never writes into a folder it did not make or into an input (#23), refuses what lm-eval would
misread (an infinite limit, an empty task list, gen_kwargs that are not key=value) and a folder that is not a
model, each in one line before anything loads; its report folder is replaced whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.evaluation.options import EvalOptions, check_eval_section, parse_gen_kwargs, parse_limit
from mergekit_lite.evaluation.tasks import SUITE_DIR
from mergekit_lite.writers.ownership import write_marker

from .refusals import one_line as _one_line

BASE = SUITE_DIR / "base"


def _config(folder: Path, **extra: Any) -> Path:
    data = {"base_model": str(BASE), "method": "linear",
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in ("add", "capitals")],
            "output": {"path": str(folder / "merged")}, **extra}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _eval(*args: str) -> Any:
    return CliRunner().invoke(main, ["eval", *args, "--no-progress"])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_non_empty_out_that_is_not_an_eval_report_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my report")
    write_marker(out, "sweep")  # another command's folder is not an eval report either
    before = _tree(out)
    _one_line(_eval(str(BASE), "--out", str(out)), "not empty", "merge eval")
    assert _tree(out) == before


def test_out_in_an_input_adapters_or_models_folder_or_the_configs_output_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    adapter = SUITE_DIR / "adapters" / "add"
    before = _tree(adapter)
    _one_line(_eval(str(config), "--out", str(adapter / "report")), "adapter 'add'")
    _one_line(_eval(str(config), "--out", str(tmp_path / "merged" / "report")), "the config's output")
    _one_line(_eval(str(BASE), "--out", str(BASE / "report")), "model 'base' folder")
    assert _tree(adapter) == before and not (BASE / "report").exists() and not (tmp_path / "merged").exists()


def test_an_unwritable_out_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_lite.writers import ownership

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ownership.tempfile, "mkdtemp", refuse)
    _one_line(_eval(str(BASE), "--out", str(tmp_path / "r")), "cannot be written")


@pytest.mark.parametrize("limit", ["inf", "-inf", "nan", "1e400"])
def test_a_non_finite_limit_is_one_line(tmp_path: Path, limit: str) -> None:
    result = _eval(str(BASE), "--limit", limit, "--out", str(tmp_path / "r"))
    _one_line(result, "--limit")
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [float("inf"), float("nan"), True, "inf"])
def test_parse_limit_refuses_non_finite_values_and_flags(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_limit(value)


@pytest.mark.parametrize("section, words", [
    ({"limit": float("inf")}, "eval.limit"),
    ({"limit": True}, "eval.limit"),
    ({"tasks": []}, "eval.tasks: an empty list"),
    ({"gen_kwargs": "===,x"}, "eval.gen_kwargs"),
])
def test_bad_eval_sections_are_refused_in_one_line_before_anything_merges(tmp_path: Path, section: dict[str, Any],
                                                                            words: str) -> None:
    config = _config(tmp_path, eval=section)
    _one_line(_eval(str(config), "--out", str(tmp_path / "r")), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_merge_run_refuses_an_empty_task_list_before_merging(tmp_path: Path) -> None:
    config = _config(tmp_path, eval={"tasks": []})
    result = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    _one_line(result, "eval.tasks: an empty list")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("value", ["===,x", "x", "a=", "temperature=0,,", "=1"])
def test_gen_kwargs_that_are_not_key_value_pairs_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError):
        parse_gen_kwargs(value)
    _one_line(_eval(str(BASE), "--gen-kwargs", value, "--out", str(tmp_path / "r")), "--gen-kwargs")


def test_good_gen_kwargs_and_eval_sections_pass() -> None:
    assert parse_gen_kwargs("temperature=0,max_gen_toks=64") == "temperature=0,max_gen_toks=64"
    check_eval_section(None)
    with pytest.raises(MergeConfigError):
        EvalOptions.from_spec(type("Spec", (), {"tasks": [], "gen_kwargs": None})())


@pytest.mark.parametrize("contents", [{}, {"notes.txt": "x"}, {"config.json": "{}"},
                                      {"config.json": '{"model_type": "llama"}'}])
def test_a_folder_that_is_not_a_model_is_one_line_before_anything_loads(tmp_path: Path,
                                                                         contents: dict[str, str]) -> None:
    folder = tmp_path / "notamodel"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    _one_line(_eval(str(folder), "--out", str(tmp_path / "r")), "not a model folder")
    assert not (tmp_path / "r").exists()


def test_remerge_does_not_replace_a_users_folder_at_the_configs_output(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    _one_line(_eval(str(config), "--remerge", "--out", str(tmp_path / "r")), "not a merge output")
    assert _tree(tmp_path / "merged") == {"notes.txt": b"mine"} and not (tmp_path / "r").exists()
