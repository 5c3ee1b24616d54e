"""Per-layer gradients and filters (SEMANTICS §3d), by hand and through whole merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.full_models import build_noisy_model
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.methods.gradients import evaluate, layer_count, layer_position

from .reference import load_checkpoint, plain_lora_task_vectors


def test_a_gradient_interpolates_over_the_layer_position() -> None:
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0.0, 0.5, 1.0, 0.0], "x", 0.5) == pytest.approx(0.75)  # 1.5 → halfway between 0.5 and 1
    assert evaluate([0.2, 0.8], "x", 1.0) == 0.8
    assert evaluate([True, False], "x", 0.4) is True  # non-numbers select, they do not interpolate


def test_filters_take_the_first_match_and_a_bare_value_matches_everything() -> None:
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.3
    assert evaluate(setting, "lm_head.weight", 0.0) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.0) is None


def test_layer_positions_put_non_layer_tensors_at_t_0() -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.norm.weight", "lm_head.weight"]
    assert layer_count(names) == 5
    assert [layer_position(n, 5) for n in names] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.0]
    assert layer_position("transformer.h.2.attn.c_attn.weight", 3) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # mergekit: one layer is at t = 1


def _layer_t(name: str) -> float:
    """The demo base has 2 layers: layer 0 at t = 0, layer 1 at t = 1, everything else at 0."""
    return 1.0 if ".layers.1." in name else 0.0


def test_weight_gradient_and_lambda_filters_in_task_arithmetic_match_hand_computed_values(
        demo: Path, tmp_path: Path) -> None:
    lam = [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": [2.0, 1.0]}, {"value": 1.0}]
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": "task_arithmetic", "parameters": {"lambda": lam},
        "adapters": [{"path": str(demo / "adapters" / "style"), "weight": [0.2, 1.0]},
                     {"path": str(demo / "adapters" / "math"), "weight": -0.5}],
        "output": str(tmp_path / "out")})
    merged = load_checkpoint(merge(config, device="cpu", progress=False, chunk_rows=3).output_dir)
    base = load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(demo / "adapters" / n) for n in ("style", "math")]
    for name, w in base.items():
        t = _layer_t(name)
        scale = 0.5 if "self_attn" in name else (2.0 - t if "mlp" in name else 1.0)
        weights = [0.2 + 0.8 * t, -0.5]
        delta = sum(wi * tau.get(name, torch.zeros((), dtype=torch.float64)) for wi, tau in zip(weights, taus))
        expected = w.double() + scale * delta
        assert torch.allclose(merged[name].double(), expected, atol=1e-6 * float(expected.abs().max()), rtol=0), name


def test_a_density_gradient_trims_each_layer_to_its_own_count(demo: Path, tmp_path: Path) -> None:
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": "magnitude_prune", "parameters": {"density": [0.25, 0.75]},
        "adapters": [{"path": str(demo / "adapters" / "style")}], "output": str(tmp_path / "out")})
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base = load_checkpoint(demo / "base")
    for name, tau in plain_lora_task_vectors(demo / "adapters" / "style").items():
        kept = int(((merged[name] - base[name]) != 0).sum())
        density = 0.75 if ".layers.1." in name else 0.25
        assert kept == int(density * tau.numel()), name


def test_a_slerp_t_gradient_per_layer(demo: Path, tmp_path: Path) -> None:
    from .reference import reference_slerp
    model = build_noisy_model(demo / "base", tmp_path / "m", seed=5, relative=0.5)
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": "slerp",
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
        "models": [{"path": str(model)}], "output": str(tmp_path / "out")})
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base, fine = load_checkpoint(demo / "base"), load_checkpoint(model)
    for name, w in base.items():
        t = _layer_t(name) if "self_attn" in name else 0.5
        expected = reference_slerp(t, w, fine[name])
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name


def test_settings_are_checked_at_config_time_and_per_tensor_before_any_work(demo: Path, tmp_path: Path) -> None:
    base = {"base_model": str(demo / "base"), "output": str(tmp_path / "out"),
            "adapters": [{"path": str(demo / "adapters" / "style")}]}
    with pytest.raises(MergeConfigError, match=r"parameters\.density\[1\].*unknown key 'fliter'.*'filter'"):
        MergeConfig.from_dict({**base, "method": "ties",
                               "parameters": {"density": [{"value": 0.5}, {"fliter": "mlp", "value": 0.3}]}})
    with pytest.raises(MergeConfigError, match=r"'density' must be in \(0, 1\], got 1.5"):
        MergeConfig.from_dict({**base, "method": "ties", "parameters": {"density": [0.5, 1.5]}})
    with pytest.raises(MergeConfigError, match=r"adapters\[0\]\.weight.*must be a number"):
        MergeConfig.from_dict({**base, "method": "linear", "adapters": [{"path": "a", "weight": ["x"]}]})
    config = MergeConfig.from_dict({**base, "method": "ties", "parameters": {"density": [{"filter": "mlp", "value": 0.5}]}})
    with pytest.raises(MergeConfigError, match=r"no filter matches tensor 'model.layers.0.self_attn"):
        merge(config, device="cpu", progress=False)
    linear = MergeConfig.from_dict({**base, "method": "linear", "adapters": [{"path": str(demo / "adapters" / "style"),
                                                                               "weight": [1.0, 0.0]}]})
    with pytest.raises(MergeConfigError, match=r"tensor 'model.layers.1.*sum of the adapter weights, which is 0"):
        merge(linear, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()

