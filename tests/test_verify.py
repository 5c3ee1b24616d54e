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


# ------------------------------------------------------------------- the logit check's quantized column (#26)
_ROW = re.compile(r"^  (\S+) +(\S+) / (\S+) +(\S+) / (\S+) +(\S+)x +(\S+)% +(\S+) / (\S+) \((\S+)x\)$", re.M)


def _quantized_rows(output: str) -> dict[str, dict[str, float]]:
    """{format: figures} from the quantized logit table."""
    keys = ("merged_max", "merged_mean", "base_max", "base_mean", "ratio", "of_adapter", "served_max", "served_mean",
            "served_ratio")
    return {m.group(1): dict(zip(keys, map(float, m.groups()[1:]))) for m in _ROW.finditer(output)}


def test_quantize_with_the_logit_check_adds_one_table_and_one_verdict(merged: Path, demo: Path) -> None:
    pytest.importorskip("gguf")
    result = verify(merged, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"),
                    "--quantize", "q8_0,q4_0")
    assert result.exit_code == 0, result.output
    assert re.search(r"^logits +ok: merged vs PEFT base\+adapter", result.output, re.M), result.output
    rows = _quantized_rows(result.output)
    assert list(rows) == ["q8_0", "q4_0"], result.output
    for figures in rows.values():
        assert all(0 < value < float("inf") for value in figures.values()), figures
        assert figures["merged_mean"] <= figures["merged_max"] and figures["base_mean"] <= figures["base_max"]
    q8, q4 = rows["q8_0"], rows["q4_0"]
    assert q8["base_mean"] * 4 < q4["base_mean"] and q8["merged_mean"] * 4 < q4["merged_mean"]
    assert q8["ratio"] == pytest.approx(q8["merged_mean"] / q8["base_mean"], rel=0.02)
    assert len(re.findall(r"^verdict: ", result.output, re.M)) == 1
    assert result.output.rstrip().endswith("all 4 checks ok")


def test_the_quantized_column_matches_a_direct_computation(merged: Path, demo: Path) -> None:
    """(b) from the base loaded on its own and quantized by quantize_weights; an identity format gives (a) the
    unquantized logit check's figure, (b) and (c) exactly zero, and leaves the loaded weights as they were."""
    pytest.importorskip("gguf")
    import transformers

    from mergekit_lite.evaluation.logit_check import quantized_logits
    from mergekit_lite.quantize.formats import QuantFormat, format_of
    from mergekit_lite.quantize.model import quantize_weights

    q4 = format_of("q4_0")
    identity = QuantFormat("identity", "none", 1, False, 1.0, lambda rows: rows.float().clone())
    check = quantized_logits(merged, str(demo / "base"), str(demo / "adapters" / "style"), [q4, identity, q4])
    first, same, again = check.rows
    assert first == again  # the first format's weights were put back before the next ran
    assert same.base.max == same.unmerged.max == 0.0 and 0 <= same.merged.max < 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo / "base"), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        assert quantize_weights(model, q4).quantized == first.quantized > 0
        drift = (model(input_ids=ids).logits - plain).abs()
    assert first.base.max == pytest.approx(float(drift.max()), rel=1e-4)
    assert first.base.mean == pytest.approx(float(drift.mean()), rel=1e-4)


def test_quantize_with_the_logit_check_of_an_adapter_output(demo: Path, merged: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": "linear",
        "adapters": [{"path": str(demo / "adapters" / "style"), "weight": 1.0}],
        "output": {"path": str(tmp_path / "adapter_out"), "format": "peft"},
    })
    out = Path(merge(config, device="cpu", progress=False).output_dir)
    result = verify(out, "--base", str(demo / "base"), "--checkpoint", str(merged), "--quantize", "q4_0")
    assert result.exit_code == 0, result.output
    assert list(_quantized_rows(result.output)) == ["q4_0"], result.output
    result = verify(out, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"),
                    "--quantize", "q4_0")
    assert result.exit_code == 2 and "needs --base and --adapter" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--quantize", "q9_0"], "--quantize q9_0: unknown format (did you mean 'q8_0'"),
    (["--quantize", "q4_k"], "--quantize q4_k: the gguf package has no reference quantizer"),
    (["--quantize", "q8_0", "--report", "REPORT"], "--report goes with --quantize and --base alone"),
])
def test_the_quantized_logit_check_refuses_bad_options_in_one_line_before_any_check(
    merged: Path, demo: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [str(tmp_path / "r") if arg == "REPORT" else arg for arg in args]
    result = verify(merged, "--base", str(demo / "base"), "--adapter", str(demo / "adapters" / "style"), *args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []
