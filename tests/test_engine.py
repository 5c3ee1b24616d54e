"""The engine against closed forms: signed weighted sums, λ, zero weights, dtypes, chunk sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_lite import merge

from .configs import DEMO_ADAPTERS as ADAPTERS
from .configs import demo_config
from .reference import load_checkpoint, plain_lora_task_vectors


def closed_form(demo: Path, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """W + Σ cᵢ τᵢ in float64, computed from the raw files."""
    base = load_checkpoint(demo / "base")
    result = {name: t.double().clone() for name, t in base.items()}
    for name, coef in zip(ADAPTERS, coefficients):
        for tensor, tau in plain_lora_task_vectors(demo / "adapters" / name).items():
            result[tensor] += coef * tau
    return result


def assert_close_to(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert result.keys() == expected.keys()
    for name, tensor in result.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor.double(), expected[name], atol=2e-6, rtol=1e-5, msg=name)


def test_task_arithmetic_with_signed_weights_matches_the_closed_form(demo: Path, tmp_path: Path) -> None:
    weights = [1.0, -0.5, 0.25]
    config = demo_config(demo, tmp_path / "out", "task_arithmetic", weights, parameters={"lambda": 0.8})
    result = merge(config, device="cpu", progress=False)
    assert_close_to(load_checkpoint(result.output_dir), closed_form(demo, [0.8 * w for w in weights]))
    assert result.tensors_merged == len(plain_lora_task_vectors(demo / "adapters" / "style"))


def test_linear_normalizes_by_the_sum_of_weights(demo: Path, tmp_path: Path) -> None:
    weights = [2.0, 1.0, 1.0]
    result = merge(demo_config(demo, tmp_path / "out", "linear", weights), device="cpu", progress=False)
    assert_close_to(load_checkpoint(result.output_dir), closed_form(demo, [w / 4 for w in weights]))


def test_linear_without_normalize_is_the_plain_weighted_sum(demo: Path, tmp_path: Path) -> None:
    weights = [1.0, -1.0, 0.5]
    config = demo_config(demo, tmp_path / "out", "linear", weights, parameters={"normalize": False})
    result = merge(config, device="cpu", progress=False)
    assert_close_to(load_checkpoint(result.output_dir), closed_form(demo, weights))


def test_all_weights_zero_give_the_base_back_byte_for_byte(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "task_arithmetic", [0.0, 0.0, 0.0])
    result = merge(config, device="cpu", progress=False)
    base = load_checkpoint(demo / "base")
    merged = load_checkpoint(result.output_dir)
    assert merged.keys() == base.keys()
    for name, tensor in base.items():
        assert merged[name].dtype == tensor.dtype
        assert torch.equal(merged[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert result.tensors_merged == 0


def test_bfloat16_output_is_the_float32_result_rounded_once(demo: Path, tmp_path: Path) -> None:
    weights = [1.0, 1.0, -1.0]
    f32 = merge(demo_config(demo, tmp_path / "f32", "task_arithmetic", weights), device="cpu", progress=False)
    bf16 = merge(
        demo_config(demo, tmp_path / "bf16", "task_arithmetic", weights, output={"dtype": "bfloat16"}),
        device="cpu",
        progress=False,
    )
    exact = load_checkpoint(f32.output_dir)
    rounded = load_checkpoint(bf16.output_dir)
    for name, tensor in exact.items():
        assert rounded[name].dtype == torch.bfloat16
        assert torch.equal(rounded[name], tensor.to(torch.bfloat16)), name
    assert '"dtype": "bfloat16"' in (bf16.output_dir / "config.json").read_text()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_rows=st.integers(min_value=1, max_value=300), lam=st.floats(-2, 2, allow_nan=False, width=32))
def test_task_arithmetic_agrees_to_float32_rounding_for_any_chunk_rows(
    demo: Path, tmp_path_factory: pytest.TempPathFactory, chunk_rows: int, lam: float
) -> None:
    """SEMANTICS §5's bound (max |diff| ≤ 1e-6·max|τ|): without the fused kernels a BLAS GEMM per chunk may round
    differently; the same bytes with the kernels are test_kernels.py's."""
    folder = tmp_path_factory.mktemp("chunks")
    config = demo_config(demo, folder / "whole", "task_arithmetic", [1.0, -0.5, 2.0], parameters={"lambda": lam})
    whole = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    chunked = load_checkpoint(merge(config, out=folder / "chunked", device="cpu", chunk_rows=chunk_rows, progress=False).output_dir)
    base = load_checkpoint(demo / "base")
    for name, tensor in whole.items():
        tau_max = float((tensor.double() - base[name].double()).abs().max())
        diff = float((tensor.double() - chunked[name].double()).abs().max())
        assert diff <= 1e-6 * max(tau_max, 1e-30) + 1e-7 * float(tensor.abs().max()), name


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
     ("magnitude_prune", {"density": 0.3}), ("linear", {})],
)
def test_merging_chunks_side_by_side_gives_the_same_bytes(demo: Path, tmp_path: Path, method: str,
                                                          parameters: dict) -> None:
    config = demo_config(demo, tmp_path / "one", method, [1.0, -0.5, 2.0], parameters=parameters)
    one = merge(config, device="cpu", chunk_rows=3, workers=1, progress=False).output_dir
    many = merge(config, out=tmp_path / "many", device="cpu", chunk_rows=3, workers=4, progress=False).output_dir
    assert (one / "model.safetensors").read_bytes() == (many / "model.safetensors").read_bytes()


def test_tiny_memory_budget_still_merges_to_the_closed_form(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "task_arithmetic", [1.0, 1.0, 1.0])
    result = merge(config, device="cpu", max_memory=1024, progress=False)
    assert result.chunk_rows < 10
    assert_close_to(load_checkpoint(result.output_dir), closed_form(demo, [1.0, 1.0, 1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "parameters"), [("task_arithmetic", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.4})])
def test_cuda_and_cpu_agree_to_float32_rounding(demo: Path, tmp_path: Path, method: str, parameters: dict) -> None:
    config = demo_config(demo, tmp_path / "cpu", method, [1.0, -0.5, 2.0], parameters=parameters)
    on_cpu = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    on_cuda = load_checkpoint(merge(config, out=tmp_path / "cuda", device="cuda", chunk_rows=5, progress=False).output_dir)
    base = load_checkpoint(demo / "base")
    for name, tensor in on_cpu.items():
        tau_max = float((tensor.double() - base[name].double()).abs().max())
        diff = float((tensor.double() - on_cuda[name].double()).abs().max())
        assert diff <= 1e-6 * max(tau_max, 1e-30) + 1e-7 * float(tensor.abs().max()), name


def test_working_set_estimate_counts_cached_task_vectors_only_when_they_fit(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite.api import engine_for, prepare

    prepared = prepare(demo_config(demo, tmp_path / "out", "ties", [1.0, 1.0, 1.0], parameters={"density": 0.5}))
    tensor = next(t for t in prepared.plan.tensors if t.touched)
    all_taus = tensor.info.rows * tensor.info.cols * 4 * 3
    assert engine_for(prepared, torch.device("cpu"), None, "512MiB").working_set_bytes(tensor) > all_taus
    assert engine_for(prepared, torch.device("cpu"), None, 4096).working_set_bytes(tensor) < all_taus
    untouched = next(t for t in prepared.plan.tensors if not t.touched)
    assert engine_for(prepared, torch.device("cpu"), None, "512MiB").working_set_bytes(untouched) == 0
