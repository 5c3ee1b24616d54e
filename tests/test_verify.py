"""`merge verify` and `integrity.check_written`: a clean merge passes, every injected fault is named."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from mergekit_lite import MergeConfig, merge
from mergekit_lite.cli import main
from mergekit_lite.errors import IntegrityError
from mergekit_lite.evaluation.verify import check_finite
from mergekit_lite.formats.integrity import check_written, read_layout
from mergekit_lite.formats.safetensors import SafetensorsFile, TensorInfo

INDEX = "model.safetensors.index.json"
TOUCHED = "model.layers.0.self_attn.q_proj.weight"  # the style adapter changes it


@pytest.fixture(scope="module")
def merged(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base + the style adapter at weight 1, in several shards with an index (made once)."""
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"),
        "method": "linear",
        "adapters": [{"path": str(demo / "adapters" / "style"), "weight": 1.0}],
        "output": {"path": str(tmp_path_factory.mktemp("verify") / "merged"), "shard_size": "100kB"},
    })
    return Path(merge(config, device="cpu", progress=False).output_dir)


@pytest.fixture
def folder(merged: Path, tmp_path: Path) -> Path:
    """A private copy of the merged folder, for tests that damage it."""
    return Path(shutil.copytree(merged, tmp_path / "merged"))


def verify(folder: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["verify", str(folder), "--no-progress", *args])


def index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / index_of(folder)["weight_map"][tensor]


def rewrite_shard(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load a shard, let `change` edit its tensors, and save it back as a valid safetensors file."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def planned(demo: Path) -> list[TensorInfo]:
    """What a float32 merge of the demo must write: the base's own names, dtypes and shapes."""
    stored = [t for tensors in read_layout(demo / "base").values() for t in tensors.values()]
    return [TensorInfo(t.name, t.dtype, t.shape, t.nbytes) for t in stored]


# ------------------------------------------------------------------------------------------------ clean output
def test_a_clean_merge_verifies_ok_with_one_line_per_check(merged: Path) -> None:
    result = verify(merged)
    assert result.exit_code == 0, result.output
    assert len(read_layout(merged)) > 1  # the index path is exercised
    for check in ("layout", "config.json", "finite"):
        assert len(re.findall(rf"^{re.escape(check)} +\S+: ", result.output, re.M)) == 1, result.output
        assert re.search(rf"^{re.escape(check)} +ok: ", result.output, re.M), result.output
    assert "index matches the shards" in result.output and "all 3 checks ok" in result.output


def test_check_written_accepts_exactly_the_planned_layout(merged: Path, demo: Path) -> None:
    check_written(merged, planned(demo))


@pytest.mark.parametrize("fault", ["shape", "dtype", "plan_lacks_one", "plan_has_more"])
def test_check_written_names_the_shard_and_tensor_that_differ_from_the_plan(
    merged: Path, demo: Path, fault: str
) -> None:
    plan = planned(demo)
    position = next(k for k, t in enumerate(plan) if t.name == TOUCHED)
    t = plan[position]
    if fault == "shape":
        plan[position] = TensorInfo(t.name, t.dtype, (t.shape[1], t.shape[0] // 2), t.nbytes // 2)
        message = rf"{re.escape(shard_of(merged, TOUCHED).name)}: tensor '{TOUCHED}' has shape \[64, 64\], the plan"
    elif fault == "dtype":
        plan[position] = TensorInfo(t.name, "BF16", t.shape, t.nbytes // 2)
        message = rf"{re.escape(shard_of(merged, TOUCHED).name)}: tensor '{TOUCHED}' is F32, the plan says BF16"
    elif fault == "plan_lacks_one":
        del plan[position]
        message = rf"{re.escape(shard_of(merged, TOUCHED).name)}: tensor '{TOUCHED}' is not in the plan"
    else:
        plan.append(TensorInfo("lm_head.extra", "F32", (2,), 8))
        message = "tensor 'lm_head.extra' of the plan is in no shard"
    with pytest.raises(IntegrityError, match=message):
        check_written(merged, plan)


# ------------------------------------------------------------------------------------------ faults on disk
def _nan_and_inf(folder: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[TOUCHED][3, 5] = float("nan")
        tensors[TOUCHED][-1, -1] = float("inf")

    rewrite_shard(shard_of(folder, TOUCHED), poison)


def _truncated(folder: Path) -> None:
    path = shard_of(folder, TOUCHED)
    path.write_bytes(path.read_bytes()[:-4])


def _index_names_missing_tensor(folder: Path) -> None:
    index = index_of(folder)
    index["weight_map"]["model.ghost.weight"] = index["weight_map"][TOUCHED]
    (folder / INDEX).write_text(json.dumps(index))


def _index_names_missing_shard(folder: Path) -> None:
    index = index_of(folder)
    index["weight_map"][TOUCHED] = "model-00009-of-00009.safetensors"
    (folder / INDEX).write_text(json.dumps(index))


def _index_escapes_folder(folder: Path) -> None:
    index = index_of(folder)
    index["weight_map"][TOUCHED] = "../" + index["weight_map"][TOUCHED]
    (folder / INDEX).write_text(json.dumps(index))


def _shard_has_extra_tensor(folder: Path) -> None:
    rewrite_shard(shard_of(folder, TOUCHED), lambda tensors: tensors.update({"model.sneaky.weight": torch.ones(4)}))


def _config_broken(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


FAULTS = {
    "nan": (_nan_and_inf, rf"tensor '{TOUCHED}' holds 1 NaN and 1 Inf value\(s\)"),
    "truncated": (_truncated, r"model-\d+-of-\d+\.safetensors: .*truncated"),
    "index_missing_tensor": (_index_names_missing_tensor, r"tensor 'model\.ghost\.weight' is not in model-\d+"),
    "index_missing_shard": (_index_names_missing_shard, r"names shard\(s\) that are not in the folder: model-00009"),
    "index_escapes": (_index_escapes_folder, rf"tensor '{TOUCHED}' points outside the folder: '\.\./model-"),
    "extra_tensor": (_shard_has_extra_tensor, r"tensor 'model\.sneaky\.weight' is not in the index"),
    "config": (_config_broken, r"config\.json: not valid JSON"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_injected_fault_fails_verify_with_exit_1_and_names_it(folder: Path, fault: str) -> None:
    damage, message = FAULTS[fault]
    damage(folder)
    result = verify(folder)
    assert result.exit_code == 1, result.output
    assert re.search(message, result.output), result.output
    assert re.search(r"^error: .*check\(s\) failed", result.output, re.M), result.output
    assert "Traceback" not in result.output


def test_a_folder_that_is_no_checkpoint_exits_2(demo: Path, tmp_path: Path) -> None:
    for folder in (demo, tmp_path / "absent"):
        result = verify(folder)
        assert result.exit_code == 2, result.output
        assert "not a safetensors checkpoint" in result.output or "not a folder" in result.output


def test_finite_scan_reads_bounded_row_chunks_and_finds_a_nan_in_the_last_row(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewrite_shard(shard_of(folder, TOUCHED), lambda tensors: tensors[TOUCHED][-1].fill_(float("nan")))
    largest: list[int] = []
    read = SafetensorsFile.tensor

    def spy(self: SafetensorsFile, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        chunk = read(self, name, start, stop)
        largest.append(chunk.numel() * chunk.element_size())
        return chunk

    monkeypatch.setattr(SafetensorsFile, "tensor", spy)
    with pytest.raises(IntegrityError, match=rf"'{TOUCHED}' holds 64 NaN and 0 Inf"):
        check_finite(folder, read_layout(folder), chunk_bytes=1024)
    assert max(largest) <= 1024  # rows of 64 float32 = 256 bytes: four rows at a time, never a whole tensor


# -------------------------------------------------------------------------------------------- logit check
def _logit_figures(output: str) -> tuple[float, float]:
    found = re.search(r"max \|diff\| (\S+) \(logits up to (\S+),", output)
    assert found, output
    return float(found.group(1)), float(found.group(2))


def test_logit_check_passes_for_a_real_single_adapter_merge(merged: Path, demo: Path) -> None:
    result = verify(merged, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^logits +ok: merged vs PEFT base\+adapter", result.output, re.M), result.output
    diff, scale = _logit_figures(result.output)
    assert diff <= 1e-5 * scale


def test_against_inputs_takes_base_and_adapter_from_the_recorded_config(merged: Path) -> None:
    result = verify(merged, "--against-inputs")
    assert result.exit_code == 0, result.output
    assert "logits      ok" in result.output


def test_logit_check_fails_when_one_merged_weight_is_tampered(folder: Path, demo: Path) -> None:
    rewrite_shard(shard_of(folder, TOUCHED), lambda tensors: tensors[TOUCHED].mul_(1.5))
    result = verify(folder, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"))
    assert result.exit_code == 1, result.output
    assert re.search(r"^logits +FAIL: .*disagrees with base\+adapter", result.output, re.M), result.output
    diff, scale = _logit_figures(result.output)
    assert diff > 1e-2 * scale


def test_against_inputs_refuses_a_multi_adapter_merge(folder: Path) -> None:
    recorded = yaml.safe_load((folder / "mergekit_lite_config.yaml").read_text())
    recorded["adapters"] += [{**recorded["adapters"][0], "name": "again"}]  # a distinct label: labels must differ
    (folder / "mergekit_lite_config.yaml").write_text(yaml.safe_dump(recorded))
    result = verify(folder, "--against-inputs")
    assert result.exit_code == 2 and "merges 2 adapters" in result.output, result.output


def test_without_peft_the_logit_check_says_how_to_install_it(
    merged: Path, demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    result = verify(merged, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"))
    assert result.exit_code == 2, result.output
    assert "pip install 'mergekit_lite[verify]'" in result.output
