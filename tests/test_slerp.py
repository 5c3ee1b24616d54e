"""SLERP against a dense float64 reference written from SEMANTICS §3 (mergekit's rule), through files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evals.full_models import build_noisy_model, save_weights
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.methods.slerp import slerp_coefficients

from .reference import load_checkpoint, plain_lora_task_vectors, reference_slerp


@pytest.fixture(scope="module")
def models(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slerp")
    return {"a": build_noisy_model(demo / "base", root / "a", seed=3, relative=0.5),
            "b": build_noisy_model(demo / "base", root / "b", seed=4, relative=0.5)}


def _merge(demo: Path, out: Path, section: str, paths: list[Path], t: float | list, **kw: object) -> dict:
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "slerp", "parameters": {"t": t},
                                    section: [{"path": str(p)} for p in paths], "output": {"path": str(out)}})
    return load_checkpoint(merge(config, device="cpu", progress=False, **kw).output_dir)


def test_coefficients_give_the_endpoints_at_t_0_and_1_and_lerp_when_colinear() -> None:
    assert slerp_coefficients(1.0, 4.0, 0.3, 0.0) == (1.0, 0.0)
    c0, c1 = slerp_coefficients(1.0, 4.0, 0.3, 1.0)
    assert abs(c0) < 1e-15 and c1 == pytest.approx(1.0, abs=1e-15)
    assert slerp_coefficients(1.0, 1.0, 0.9996, 0.25) == (0.75, 0.25)
    assert slerp_coefficients(1.0, 1.0, -0.9996, 0.25) == (0.75, 0.25)
    assert slerp_coefficients(0.0, 1.0, 0.0, 0.5) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_one_model_interpolates_between_the_base_and_the_model(demo: Path, models: dict[str, Path],
                                                               tmp_path: Path, t: float) -> None:
    merged = _merge(demo, tmp_path / "out", "models", [models["a"]], t, chunk_rows=5)
    base, model = load_checkpoint(demo / "base"), load_checkpoint(models["a"])
    for name, w in base.items():
        expected = reference_slerp(t, w, model[name])
        scale = float(expected.abs().max())
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * scale, rtol=0), name
        if t == 0.0:
            assert torch.equal(merged[name], w), name
        if t == 1.0:
            assert torch.equal(merged[name], model[name]), name


def test_two_models_interpolate_their_task_vectors(demo: Path, models: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(demo, tmp_path / "out", "models", [models["a"], models["b"]], 0.4)
    base, a, b = load_checkpoint(demo / "base"), load_checkpoint(models["a"]), load_checkpoint(models["b"])
    for name, w in base.items():
        expected = w.double() + reference_slerp(0.4, a[name].double() - w.double(), b[name].double() - w.double())
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name


def test_two_lora_adapters_interpolate_their_task_vectors(demo: Path, tmp_path: Path) -> None:
    adapters = [demo / "adapters" / "style", demo / "adapters" / "math"]
    merged = _merge(demo, tmp_path / "out", "adapters", adapters, 0.7)
    base = load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(a) for a in adapters]
    for name, w in base.items():
        if name not in taus[0] and name not in taus[1]:
            assert torch.equal(merged[name], w), name
            continue
        t0, t1 = (tau.get(name, torch.zeros_like(w, dtype=torch.float64)) for tau in taus)
        expected = w.double() + reference_slerp(0.7, t0, t1)
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name


def test_nearly_colinear_models_fall_back_to_linear_interpolation(demo: Path, tmp_path: Path) -> None:
    base = load_checkpoint(demo / "base")
    scaled = tmp_path / "scaled"
    save_weights({k: v * 1.01 for k, v in base.items()}, scaled)
    for name in ("config.json", "tokenizer.json"):
        (scaled / name).write_bytes((demo / "base" / name).read_bytes())
    merged = _merge(demo, tmp_path / "out", "models", [scaled], 0.25)
    for name, w in base.items():
        expected = 0.75 * w.double() + 0.25 * (w * 1.01).double()
        assert torch.allclose(merged[name].double(), expected, atol=1e-6 * float(expected.abs().max()), rtol=0), name


def test_slerp_refuses_three_inputs_and_adapter_outputs(demo: Path, tmp_path: Path) -> None:
    adapters = [{"path": str(demo / "adapters" / n)} for n in ("style", "math", "facts")]
    with pytest.raises(MergeConfigError, match=r"'slerp' merges 1 to 2 inputs.*got 3"):
        MergeConfig.from_dict({"base_model": "b", "method": "slerp", "parameters": {"t": 0.5}, "adapters": adapters,
                               "output": "o"})
    with pytest.raises(MergeConfigError, match=r"writes full checkpoints only"):
        MergeConfig.from_dict({"base_model": "b", "method": "slerp", "parameters": {"t": 0.5},
                               "adapters": adapters[:2], "output": {"path": "o", "format": "peft"}})
    with pytest.raises(MergeConfigError, match=r"'slerp' needs 't'"):
        MergeConfig.from_dict({"base_model": "b", "method": "slerp", "adapters": adapters[:2], "output": "o"})
