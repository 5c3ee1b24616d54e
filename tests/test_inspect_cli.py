"""`merge inspect` from the command line: the report folder, the JSON schema, the verdict, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.inspection import report
from mergekit_lite.writers.ownership import MARKER

from .conftest import REPO, write_config
from .inspect_fixtures import random_factors, write_adapter, write_base

Q0, D0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
DOCS = (REPO / "docs" / "INSPECT.md").read_text()


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A base, two adapters and a config without `method:` or `output:`."""
    write_base(tmp_path / "base")
    write_adapter(tmp_path / "one", random_factors(1, {Q0: 2, D0: 2}))
    write_adapter(tmp_path / "two", random_factors(2, {Q0: 2, D0: 2}), alpha=4)
    return write_config(tmp_path, {"base_model": "base", "adapters": [{"path": "one"}, {"path": "two", "weight": 0.5}]})


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["inspect", *args, "--no-progress"])


def test_a_config_without_a_method_is_inspected_and_the_folder_written(small: Path) -> None:
    out = small.parent / "report"
    result = invoke(str(small), "--out", str(out), "--no-plots")
    assert result.exit_code == 0, result.output
    assert "merge inspect: 2 adapter(s)" in result.output and "verdict (heuristics):" in result.output
    assert "`merge sweep`" in result.output
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "inspect.json", "report.md"]
    data = json.loads((out / "inspect.json").read_text())
    assert data["method"] is None and data["settings"]["densities"] == [0.5, 0.5]
    assert "## Verdict" in (out / "report.md").read_text()
    # no path of this machine in the report: the base folder relative to the config's folder, as written
    assert data["base_folder"] == "base" and [a["path"] for a in data["adapters"]] == ["one", "two"]
    assert str(small.parent) not in (out / "inspect.json").read_text()


def test_json_schema_is_stable_and_documented(small: Path) -> None:
    out = small.parent / "report"
    result = invoke(str(small), "--out", str(out), "--no-plots", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == json.loads((out / "inspect.json").read_text())
    assert (data["schema"], data["schema_version"]) == ("mergekit_lite/inspect", 2)
    assert tuple(data) == report.SCHEMA_KEYS
    assert tuple(data["settings"]) == report.SETTINGS_KEYS
    assert tuple(data["adapters"][0]) == report.ADAPTER_KEYS
    assert tuple(data["adapters"][0]["layers"][0]) == report.ADAPTER_LAYER_KEYS
    assert tuple(data["pairs"][0]) == report.PAIR_KEYS
    assert tuple(data["conflicts"]) == report.CONFLICT_KEYS
    assert tuple(data["layers"][0]) == report.LAYER_KEYS
    assert tuple(data["tensors"][0]) == report.TENSOR_KEYS
    assert tuple(data["tensors"][0]["conflicts"]) == report.TENSOR_CONFLICT_KEYS
    assert tuple(data["verdict"][0]) == report.VERDICT_KEYS
    assert tuple(data["timings"]) == report.TIMING_KEYS
    assert f"`schema_version` {report.SCHEMA_VERSION}" in DOCS
    documented = set(re.findall(r"`([a-z_]+)`", DOCS))
    every_key = {*report.SCHEMA_KEYS, *report.SETTINGS_KEYS, *report.ADAPTER_KEYS, *report.ADAPTER_LAYER_KEYS,
                 *report.PAIR_KEYS, *report.CONFLICT_KEYS, *report.LAYER_KEYS, *report.TENSOR_KEYS,
                 *report.TENSOR_CONFLICT_KEYS, *report.VERDICT_KEYS, *report.TIMING_KEYS}
    assert every_key - documented == set()


def test_the_json_pairs_match_the_measurements(small: Path) -> None:
    out = small.parent / "report"
    data = json.loads(invoke(str(small), "--out", str(out), "--no-plots", "--format", "json").output)
    pair = data["pairs"][0]
    assert (pair["a"], pair["b"]) == ("one", "two") and -1 <= pair["cosine"] <= 1
    assert 0 <= pair["conflict_rate"] <= 1 and pair["shared_tensors"] == 2
    tensor = data["tensors"][0]
    assert tensor["cosine"][0][0] == pytest.approx(1.0) and len(tensor["sum_spectrum"]) <= 4
    assert data["adapters"][1]["weight"] == 0.5 and data["adapters"][1]["scales"] == [2.0]


def test_an_earlier_report_is_replaced_and_another_folder_is_refused(small: Path) -> None:
    out = small.parent / "report"
    assert invoke(str(small), "--out", str(out), "--no-plots").exit_code == 0
    assert invoke(str(small), "--out", str(out), "--no-plots").exit_code == 0  # our report: replaced whole
    (out / "stale.txt").write_text("x")  # not listed in the report's marker: the user's, so never deleted (#23)
    refused = invoke(str(small), "--out", str(out), "--no-plots")
    assert refused.exit_code == 2 and "'stale.txt', which `merge inspect` did not write" in refused.output
    assert (out / "stale.txt").read_text() == "x"
    precious = small.parent / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    result = invoke(str(small), "--out", str(precious), "--no-plots")
    assert result.exit_code == 2 and (precious / "notes.txt").read_text() == "mine"
    assert result.output.count("\n") == 1 and "not written by `merge inspect`" in result.output


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_adapter_folder_holding_an_inspect_json_is_never_replaced(small: Path) -> None:
    """#23: --out = an input adapter's folder that happens to hold an inspect.json kept its files."""
    adapter = small.parent / "one"
    (adapter / "inspect.json").write_text("{}")
    before = _tree(adapter)
    result = invoke(str(small), "--out", str(adapter), "--no-plots")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "adapter 'one'" in result.output
    assert _tree(adapter) == before


def test_a_users_folder_with_an_inspect_json_notes_and_a_subfolder_is_refused(small: Path) -> None:
    mine = small.parent / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "inspect.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("notes")
    (mine / "sub" / "data.csv").write_text("1,2")
    before = _tree(mine)
    result = invoke(str(small), "--out", str(mine), "--no-plots")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert _tree(mine) == before and sorted(p.name for p in small.parent.iterdir() if p.name.startswith(".")) == []


def test_an_output_holding_an_input_or_inside_the_base_is_refused(small: Path) -> None:
    for out in (small.parent, small.parent / "base" / "report"):
        result = invoke(str(small), "--out", str(out), "--no-plots")
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert not (small.parent / "base" / "report").exists()


@pytest.mark.parametrize("change, message", [
    ({"base_model": "missing"}, "base model folder not found"),
    ({"adapters": [{"path": "nowhere"}]}, "adapter folder not found"),
    ({"methd": "ties"}, "unknown key 'methd'"),
    ({"method": "ties"}, "density"),
    ({"parameters": {"density": 0.3}}, "given without a method"),
])
def test_bad_input_is_one_line_with_exit_code_2(small: Path, change: dict, message: str) -> None:
    data = {"base_model": "base", "adapters": [{"path": "one"}, {"path": "two"}], **change}
    config = write_config(small.parent, data, "bad.yaml")
    result = invoke(str(config), "--out", str(small.parent / "r"), "--no-plots")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and message in result.output


@pytest.mark.parametrize("flags, message", [
    (["--density", "0"], "--density 0"),
    (["--density", "0.001"], "keeps 0 of its"),
    (["--max-memory", "lots"], "--max-memory lots"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_flags_are_one_line_with_exit_code_2(small: Path, flags: list[str], message: str) -> None:
    result = invoke(str(small), "--out", str(small.parent / "r"), "--no-plots", *flags)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and result.output.startswith("error: cannot read config")


@pytest.mark.slow
def test_the_eval_suite_report_has_figures_and_a_verdict(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    result = invoke(str(REPO / "merge_configs" / "eval_ties.yaml"), "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "inspect.json").read_text())
    assert data["figures"] == ["heatmaps.png", "layers.png", "spectra.png"]
    assert all((out / name).stat().st_size > 1000 for name in data["figures"])
    assert data["method"] == "ties" and data["settings"]["densities"] == [0.5] * 4
    assert {v["finding"] for v in data["verdict"]} >= {"near_orthogonal", "large_task_vectors", "measure"}


def test_a_mergekit_config_is_inspected_as_merge_run_reads_it(small: Path) -> None:
    config = write_config(small.parent, {"merge_method": "ties", "base_model": "base", "dtype": "float32", "models": [
        {"model": "base+one", "parameters": {"weight": 1.0, "density": 0.3}},
        {"model": "base+two", "parameters": {"weight": 0.5, "density": 0.3}}]}, name="mergekit.yaml")
    out = small.parent / "report_mk"
    result = invoke(str(config), "--out", str(out), "--no-plots", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "inspect.json").read_text())
    assert data["method"] == "ties" and data["settings"]["densities"] == [0.3, 0.3]
    assert data["settings"]["weights"] == [1.0, 0.5]
