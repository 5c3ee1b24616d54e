"""Full fine-tuned checkpoints as inputs: τᵢ = Wᵢ − W streamed from both files (SEMANTICS §1, `models:`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.fixtures import build_tiny_llama
from evals.full_models import build_merged_model, build_noisy_model
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import CheckpointError, MergeConfigError

from .reference import load_checkpoint, plain_lora_task_vectors, ties_combine, trim


@pytest.fixture(scope="module")
def fine_tunes(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two noisy fine-tunes of the demo base (float32 in one file; bfloat16 in two shards) and the style adapter
    merged into the base by PEFT."""
    root = tmp_path_factory.mktemp("full")
    return {
        "a": build_noisy_model(demo / "base", root / "a", seed=1),
        "b": build_noisy_model(demo / "base", root / "b", seed=2, dtype="bfloat16", shards=2),
        "style": build_merged_model(demo / "base", demo / "adapters" / "style", root / "style"),
    }


def _config(demo: Path, out: Path, method: str, models: list[dict], parameters: dict | None = None,
            adapters: list[dict] | None = None, **extra: object) -> MergeConfig:
    data: dict = {"base_model": str(demo / "base"), "method": method, "parameters": parameters or {},
                  "models": models, "output": {"path": str(out)}, **extra}
    if adapters:
        data["adapters"] = adapters
    return MergeConfig.from_dict(data)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _taus(demo: Path, *folders: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = {k: v.double() for k, v in load_checkpoint(demo / "base").items()}
    return base, [{k: v.double() - base[k] for k, v in load_checkpoint(f).items()} for f in folders]


def test_full_model_task_vectors_are_the_dense_differences(demo: Path, fine_tunes: dict[str, Path],
                                                           tmp_path: Path) -> None:
    weights = [0.7, -0.4]
    config = _config(demo, tmp_path / "out", "task_arithmetic",
                     [{"path": str(fine_tunes["a"]), "weight": weights[0]},
                      {"path": str(fine_tunes["b"]), "weight": weights[1]}], {"lambda": 0.9})
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base, taus = _taus(demo, fine_tunes["a"], fine_tunes["b"])
    for name, w in base.items():
        expected = w + 0.9 * sum(wi * tau[name] for wi, tau in zip(weights, taus))
        scale = float(expected.abs().max())
        assert torch.allclose(merged[name].double(), expected, atol=1e-6 * scale, rtol=0), name


def test_a_full_model_equal_to_base_plus_a_lora_delta_merges_to_the_adapters_bytes(
        demo: Path, fine_tunes: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's merge_and_unload of the adapter, stored in float32, then τ = W₁ − W: W + τ is W₁ again, the same
    bytes as the adapter's merge."""
    for method, parameters in (("task_arithmetic", {}), ("linear", {})):
        as_model = _config(demo, tmp_path / f"{method}-model", method, [{"path": str(fine_tunes["style"])}], parameters)
        as_adapter = MergeConfig.from_dict({
            "base_model": str(demo / "base"), "method": method, "parameters": parameters,
            "adapters": [{"path": str(demo / "adapters" / "style")}], "output": str(tmp_path / f"{method}-adapter")})
        model_out = merge(as_model, device="cpu", progress=False).output_dir
        adapter_out = merge(as_adapter, device="cpu", progress=False).output_dir
        assert _bytes(model_out) == _bytes(adapter_out), method


@pytest.mark.parametrize("method,parameters", [("task_arithmetic", {"lambda": 0.8}), ("ties", {"density": 0.5})])
def test_a_full_model_equal_to_base_plus_a_lora_delta_keeps_the_adapters_result_within_the_stored_rounding(
        demo: Path, fine_tunes: dict[str, Path], tmp_path: Path, method: str, parameters: dict) -> None:
    """Scaled or trimmed, τ = round(W + sBA) − W differs from sBA by the float32 rounding of the stored model."""
    as_model = _config(demo, tmp_path / "model", method, [{"path": str(fine_tunes["style"])}], parameters)
    as_adapter = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": method, "parameters": parameters,
        "adapters": [{"path": str(demo / "adapters" / "style")}], "output": str(tmp_path / "adapter")})
    model_out = load_checkpoint(merge(as_model, device="cpu", progress=False).output_dir)
    adapter_out = load_checkpoint(merge(as_adapter, device="cpu", progress=False).output_dir)
    base = load_checkpoint(demo / "base")
    for name, value in adapter_out.items():
        ulp = max(float(base[name].abs().max()), float(value.abs().max())) * 2.0**-23  # a float32 step of the model
        assert float((model_out[name] - value).abs().max()) <= 2 * ulp, name


def test_adapters_and_full_models_mix_in_one_ties_merge(demo: Path, fine_tunes: dict[str, Path],
                                                        tmp_path: Path) -> None:
    config = _config(demo, tmp_path / "out", "ties", [{"path": str(fine_tunes["a"]), "weight": 0.6}],
                     {"density": 0.4}, adapters=[{"path": str(demo / "adapters" / "math"), "weight": 1.2}])
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base, (model_tau,) = _taus(demo, fine_tunes["a"])
    adapter_tau = plain_lora_task_vectors(demo / "adapters" / "math")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        taus = [adapter_tau.get(name, torch.zeros_like(base[name])), model_tau[name]]
        updates = [w * trim(tau, 0.4) for w, tau in zip((1.2, 0.6), taus)]
        present = [u for u, tau in zip(updates, taus) if tau.abs().max() > 0]
        weights = [w for w, tau in zip((1.2, 0.6), taus) if tau.abs().max() > 0]
        expected = base[name] + ties_combine(present, weights, "sum", True, 1.0)
        scale = float(expected.abs().max())
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * scale, rtol=0), name


@pytest.mark.parametrize("method,parameters", [
    ("task_arithmetic", {}), ("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}), ("slerp", {"t": 0.35}),
])
def test_full_model_merges_give_the_same_bytes_for_every_chunk_size(
        demo: Path, fine_tunes: dict[str, Path], tmp_path: Path, method: str, parameters: dict) -> None:
    models = [{"path": str(fine_tunes["a"]), "weight": 0.8}, {"path": str(fine_tunes["b"]), "weight": 0.5}]
    outputs = []
    for chunk_rows, workers in ((None, None), (1, 1), (7, 2)):
        config = _config(demo, tmp_path / f"{chunk_rows}", method, models, parameters,
                         output={"path": str(tmp_path / f"{chunk_rows}"), "dtype": "bfloat16"})
        outputs.append(_bytes(merge(config, device="cpu", progress=False, chunk_rows=chunk_rows,
                                    workers=workers).output_dir))
    assert outputs[0] == outputs[1] == outputs[2]


def _damaged(fine_tunes: dict[str, Path], tmp_path: Path, how: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / how
    shutil.copytree(fine_tunes["a"], folder)
    if how == "model_type":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "mistral"
        (folder / "config.json").write_text(json.dumps(config))
    elif how in ("missing", "extra", "shape"):
        tensors = load_file(folder / "model.safetensors")
        if how == "missing":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif how == "extra":
            tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(2, 2)
        else:
            tensors["model.embed_tokens.weight"] = torch.zeros(101, 64)
        save_file(tensors, str(folder / "model.safetensors"))
    elif how == "vocab":
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 150, "content": "<extra>"})
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.mark.parametrize("how,message", [
    ("model_type", r"model 'model_type'.*config.json model_type is 'mistral' but the base's is 'llama'"),
    ("missing", r"has no tensor 'model.layers.1.mlp.up_proj.weight', which the base has"),
    ("extra", r"has tensor 'model.layers.2.mlp.up_proj.weight', which the base lacks"),
    ("shape", r"tensor 'model.embed_tokens.weight' has shape \[101, 64\] but the base's has \[100, 64\]"),
    ("vocab", r"its tokenizer has 151 tokens but the base's has 100"),
])
def test_a_model_that_is_not_a_fine_tune_of_the_base_is_one_line_error_before_any_work(
        demo: Path, fine_tunes: dict[str, Path], tmp_path: Path, how: str, message: str) -> None:
    folder = _damaged(fine_tunes, tmp_path, how)
    config = _config(demo, tmp_path / "out", "task_arithmetic", [{"path": str(folder)}])
    with pytest.raises(CheckpointError, match=message) as error:
        merge(config, device="cpu", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_size_names_its_first_differing_tensor(demo: Path, tmp_path: Path) -> None:
    other = build_tiny_llama(tmp_path / "small", hidden_size=32)
    config = _config(demo, tmp_path / "out", "ties", [{"path": str(other)}], {"density": 0.5})
    with pytest.raises(CheckpointError, match=r"hidden_size is 32 but the base's is 64"):
        merge(config, device="cpu", progress=False)


def test_subspace_methods_refuse_full_models_by_name(demo: Path, fine_tunes: dict[str, Path], tmp_path: Path) -> None:
    config = _config(demo, tmp_path / "out", "tsv_m", [{"path": str(fine_tunes["a"])}])
    with pytest.raises(MergeConfigError, match=r"'tsv_m' works on low-rank factors.*'a'"):
        merge(config, device="cpu", progress=False)


def test_a_config_with_models_only_and_the_resolved_config_round_trips(demo: Path, fine_tunes: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    config = _config(demo, tmp_path / "out", "ties", [{"path": str(fine_tunes["a"]), "weight": 0.5, "density": 0.3}],
                     {"density": 0.7})
    assert config.adapters == [] and len(config.inputs) == 1 and config.adapter_params == [
        {"density": 0.3}]
    again = MergeConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.models[0].parameters == {"density": 0.3}
    with pytest.raises(MergeConfigError, match=r"models\[0\]: unknown key 'densty'.*did you mean 'density'"):
        _config(demo, tmp_path / "x", "ties", [{"path": "m", "densty": 0.3}], {"density": 0.5})
    with pytest.raises(MergeConfigError, match=r"missing required key 'adapters' \(or 'models'"):
        MergeConfig.from_dict({"base_model": "b", "method": "linear", "output": "o"})


def test_dry_run_names_each_full_model(demo: Path, fine_tunes: dict[str, Path], tmp_path: Path) -> None:
    from mergekit_lite import describe_plan
    config = _config(demo, tmp_path / "out", "task_arithmetic", [{"path": str(fine_tunes["b"])}],
                     adapters=[{"path": str(demo / "adapters" / "math")}])
    text = describe_plan(config, device="cpu")
    assert "of 1 adapter(s) and 1 full model(s)" in text
    assert "model 'b' weight 1: full llama checkpoint, 21 tensors (BF16)" in text
