"""The written checkpoint: shards and index, side files, card, atomic writes, refused inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_lite import AdapterError, CheckpointError, MergeConfig, NonFiniteError, merge
from mergekit_lite.errors import OutputExistsError

from .configs import demo_adapters, merge_config
from .reference import load_checkpoint


def config_for(demo: Path, out: Path, **output: object) -> MergeConfig:
    """Task arithmetic of the demo's style and math adapters (weights 1 and −0.5) into `out`."""
    return merge_config(demo / "base", demo_adapters(demo, (1.0, -0.5), ("style", "math")), out, output=output, seed=7)


def test_small_shard_size_gives_several_shards_and_a_consistent_index(demo: Path, tmp_path: Path) -> None:
    result = merge(config_for(demo, tmp_path / "out", shard_size="100kB"), device="cpu", progress=False)
    folder = result.output_dir
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) == result.shards > 1
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = load_checkpoint(folder)
    assert sorted(index["weight_map"]) == sorted(tensors)  # every tensor named exactly once
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    whole = load_checkpoint(merge(config_for(demo, tmp_path / "whole"), device="cpu", progress=False).output_dir)
    assert all(torch.equal(whole[name], tensors[name]) for name in whole)


def test_output_has_config_tokenizer_card_and_resolved_config(demo: Path, tmp_path: Path) -> None:
    folder = merge(config_for(demo, tmp_path / "out"), device="cpu", progress=False).output_dir
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["base_model_relation"] == "merge"
    assert {"merge", "mergekit_lite"} <= set(front_matter["tags"])
    assert front_matter["library_name"] == "transformers"
    assert "base_model" not in front_matter  # a local base: the Hub rejects local paths in metadata
    assert "Task Arithmetic" in card and "arxiv.org/abs/2212.04089" in card and "Seed: `7`" in card
    resolved = yaml.safe_load((folder / "mergekit_lite_config.yaml").read_text())
    assert resolved["parameters"] == {"lambda": 1.0} and resolved["adapters"][1]["weight"] == -0.5


def test_existing_output_is_refused_unless_overwrite(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(config_for(demo, out), device="cpu", progress=False)
    (out / "model.safetensors").write_bytes(b"stale")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge(config_for(demo, out), device="cpu", progress=False)
    assert (out / "model.safetensors").read_bytes() == b"stale"
    merge(config_for(demo, out), device="cpu", overwrite=True, progress=False)  # a merge output: replaced whole
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["notes", "inspect_report", "forged_config_copy"])
def test_overwrite_never_replaces_a_folder_that_is_not_a_merge_output(demo: Path, tmp_path: Path, kind: str) -> None:
    """--overwrite deletes only what a merge wrote: a user's folder of notes, another command's report, a folder
    with a config copy but no weights are refused in one line, untouched."""
    from mergekit_lite.errors import OutputPathError
    from mergekit_lite.writers.ownership import write_marker

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "sub" / "deep.txt").write_text("deep")
    if kind == "inspect_report":
        write_marker(out, "inspect")
    if kind == "forged_config_copy":
        (out / "mergekit_lite_config.yaml").write_text("base_model: b\nadapters: [{path: a}]\n")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputPathError, match="not a merge output") as caught:
        merge(config_for(demo, out), device="cpu", overwrite=True, progress=False)
    assert "\n" not in str(caught.value) and str(out) in str(caught.value)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_fills_an_empty_folder(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    merge(config_for(demo, out), device="cpu", overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file()


def test_files_put_into_the_output_while_merging_stop_the_swap(demo: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked again at the swap: a user's file that appeared in the old output meanwhile is never deleted."""
    import mergekit_lite.api as api
    from mergekit_lite.errors import OutputPathError

    out = tmp_path / "out"
    merge(config_for(demo, out), device="cpu", progress=False)
    real = api.write_output

    def and_a_user_writes(*args: object, **kwargs: object) -> object:
        for name in ("mergekit_lite_config.yaml", "model.safetensors"):
            (out / name).unlink()
        (out / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "write_output", and_a_user_writes)
    with pytest.raises(OutputPathError, match="not a merge output"):
        merge(config_for(demo, out), device="cpu", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_merge_that_fails_midway_leaves_nothing_behind(demo: Path, tmp_path: Path) -> None:
    config = MergeConfig.from_dict(
        {
            "base_model": str(demo / "base"),
            "method": "task_arithmetic",
            "parameters": {"lambda": 1e38},
            "adapters": [{"path": str(demo / "adapters" / "style")}],
            "output": {"path": str(tmp_path / "out" / "merged"), "dtype": "float16"},
        }
    )
    with pytest.raises(NonFiniteError, match=r"merged tensor 'model\.[^']+' has inf/NaN"):
        merge(config, device="cpu", chunk_rows=1, progress=False)
    assert not (tmp_path / "out" / "merged").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_pickled_base_is_refused(demo: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"not unpickled")
    config = MergeConfig.from_dict(
        {"base_model": str(base), "method": "linear", "adapters": [{"path": str(demo / "adapters" / "style")}],
         "output": {"path": str(tmp_path / "out")}}
    )
    with pytest.raises(CheckpointError, match="never unpickles"):
        merge(config, device="cpu", progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"init_lora_weights": "pissa"}, "changes the base model at init"),
        ({"init_lora_weights": "olora"}, "changes the base model at init"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"layer_replication": [[0, 1]]}, "layer replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
        ({"r": 3}, "rank 4 in its tensors but the config"),
    ],
)
def test_unsupported_adapters_are_refused_with_the_reason(demo_copy: Path, tmp_path: Path, change: dict, message: str) -> None:
    adapter = demo_copy / "adapters" / "style"
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    config = MergeConfig.from_dict(
        {"base_model": str(demo_copy / "base"), "method": "linear", "adapters": [{"path": str(adapter)}],
         "output": {"path": str(tmp_path / "out")}}
    )
    with pytest.raises(AdapterError, match=message):
        merge(config, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_is_refused_naming_the_tensor(demo: Path, tmp_path: Path) -> None:
    from evals.fixtures import build_tiny_llama

    other = build_tiny_llama(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    config = MergeConfig.from_dict(
        {"base_model": str(other), "method": "linear", "adapters": [{"path": str(demo / "adapters" / "style")}],
         "output": {"path": str(tmp_path / "out")}}
    )
    with pytest.raises(AdapterError, match=r"base tensor 'model\.layers\.\d\.[a-z_.]+weight' is \d+x\d+"):
        merge(config, device="cpu", progress=False)


def test_pickled_adapter_is_refused(demo_copy: Path, tmp_path: Path) -> None:
    adapter = demo_copy / "adapters" / "style"
    shutil.move(adapter / "adapter_model.safetensors", adapter / "adapter_model.bin")
    config = MergeConfig.from_dict(
        {"base_model": str(demo_copy / "base"), "method": "linear", "adapters": [{"path": str(adapter)}],
         "output": {"path": str(tmp_path / "out")}}
    )
    with pytest.raises(AdapterError, match="never unpickles"):
        merge(config, device="cpu", progress=False)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_repeated_merges_do_not_leak_file_descriptors(demo: Path, tmp_path: Path) -> None:
    config = config_for(demo, tmp_path / "out")
    merge(config, device="cpu", overwrite=True, progress=False)
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(3):
        merge(config, device="cpu", overwrite=True, progress=False)
    assert len(list(Path("/proc/self/fd").iterdir())) <= before
