"""model_stock against a dense float64 reference written from SEMANTICS §3 (Jang et al. 2024), for LoRA adapters
and full fine-tunes, exact under streaming (chunk size and workers change no byte), closed forms, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from evals.full_models import build_noisy_model, save_weights
from mergekit_lite import MergeConfig, MergeConfigError, merge
from mergekit_lite.methods.model_stock import stock_ratio

from .configs import DEMO_ADAPTERS, demo_config
from .reference import load_checkpoint, model_stock, plain_lora_task_vectors


@pytest.fixture(scope="module")
def models(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two full fine-tunes sharing half their change (cosines near 0.45, so t is far from 0 and 1)."""
    root = tmp_path_factory.mktemp("stock")
    a = build_noisy_model(demo / "base", root / "a", seed=3, relative=0.5)
    noise = build_noisy_model(demo / "base", root / "noise", seed=4, relative=0.5)
    base, tuned, other = load_checkpoint(demo / "base"), load_checkpoint(a), load_checkpoint(noise)
    shutil.copytree(a, root / "b")
    save_weights({name: (w.float() + 0.5 * (tuned[name].float() - w.float()) + (other[name].float() - w.float()))
                  .to(w.dtype) if w.is_floating_point() else w for name, w in base.items()}, root / "b")
    return {"a": a, "b": root / "b"}


def test_the_ratio_is_the_papers_closed_form() -> None:
    assert stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert stock_ratio(0.2, 3) == pytest.approx(0.6 / 1.4)
    assert stock_ratio(1.0, 5) == 1.0 and stock_ratio(0.0, 5) == 0.0
    assert stock_ratio(-0.4, 2) == 0.0  # opposed task vectors: clamped, the base itself
    assert stock_ratio(0.3, 1) == 1.0  # one input: its own change


def test_lora_adapters_equal_the_dense_reference_for_any_chunking(demo: Path, tmp_path: Path) -> None:
    weights = (1.0, 0.5, 2.0)
    base = load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(demo / "adapters" / name) for name in DEMO_ADAPTERS]
    outputs = []
    for chunk_rows, workers in [(None, 1), (1, 2), (7, 3)]:
        config = demo_config(demo, tmp_path / f"out{chunk_rows}", "model_stock", weights)
        outputs.append(merge(config, device="cpu", chunk_rows=chunk_rows, workers=workers, progress=False).output_dir)
    files = [(folder / "model.safetensors").read_bytes() for folder in outputs]
    assert files[0] == files[1] == files[2]
    merged = load_checkpoint(outputs[0])
    for name, w in base.items():
        updates = [wi * tau[name] if name in tau else None for tau, wi in zip(taus, weights)]
        if all(u is None for u in updates):
            assert torch.equal(merged[name], w), name
            continue
        expected = model_stock(w, updates)
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name


def test_full_fine_tunes_equal_the_dense_reference(demo: Path, models: dict[str, Path], tmp_path: Path) -> None:
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "model_stock",
                                    "models": [{"path": str(models["a"])}, {"path": str(models["b"])}],
                                    "output": {"path": str(tmp_path / "out")}})
    merged = load_checkpoint(merge(config, device="cpu", chunk_rows=5, progress=False).output_dir)
    base, a, b = load_checkpoint(demo / "base"), load_checkpoint(models["a"]), load_checkpoint(models["b"])
    ratios = []
    for name, w in base.items():
        if not w.is_floating_point():
            continue
        updates = [a[name].double() - w.double(), b[name].double() - w.double()]
        expected = model_stock(w, updates)
        tol = 4e-6 * float(expected.abs().max()) + float(torch.finfo(w.dtype).eps) * float(expected.abs().max())
        assert torch.allclose(merged[name].double(), expected, atol=tol, rtol=0), name
        mean = (updates[0] + updates[1]) / 2
        if float(mean.norm()) > 0:
            ratios.append(float((expected - w.double()).reshape(-1) @ mean.reshape(-1) / (mean.norm() ** 2)))
    assert ratios and all(0.2 < t < 0.9 for t in ratios), ratios  # the shared half: t well inside (0, 1)


def test_orthogonal_task_vectors_keep_the_base_and_equal_ones_keep_the_change() -> None:
    """Closed forms through the method's own phase: c = 0 gives t = 0 (W), c = 1 gives t = 1 (W + τ)."""
    from mergekit_lite.methods import get_method

    phase = get_method("model_stock").phase
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    x = torch.zeros(4, 6)
    x[0, 0] = 1.0
    y = torch.zeros(4, 6)
    y[1, 1] = 2.0
    for updates, expected in [([x, y], base), ([x, x], base + x), ([x, None, x * 3], base + 2 * x)]:
        state = phase.finish(phase.statistics(base, updates, {}).sum(dim=0), {})
        assert torch.allclose(phase.combine(base, updates, state, {}), expected, atol=1e-6)


def test_one_input_is_a_config_error(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(MergeConfigError, match="at least two inputs"):
        MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "model_stock",
                               "adapters": [{"path": str(demo / "adapters" / "style")}],
                               "output": {"path": str(tmp_path / "out")}})
