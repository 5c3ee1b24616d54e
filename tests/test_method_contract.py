"""The method contract: three phases a method opts into, exercised before the methods that need them arrive.

A test-only method, task arithmetic written in the *factored* phase (it returns (L, R) from every adapter's
factors), must give the same bytes as the built-in task_arithmetic, which takes the *linear* phase. The
factored phase then streams W + L·R through the linear path, so the same kernel, chunks and rounding apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from evals.fixtures import build_adapter, build_tiny_gpt2, build_tiny_llama
from mergekit_lite import MergeConfig, MergeConfigError, describe_plan, merge
from mergekit_lite.engine import kernels
from mergekit_lite.engine.schedule import C_LOWRANK, C_SUM, C_TIES, TORCH
from mergekit_lite.methods import (
    REGISTRY,
    ElementwisePhase,
    FactoredContext,
    FactoredPhase,
    InterpolationPhase,
    LinearPhase,
    LowRankFactors,
    MergeMethod,
    Param,
    get_method,
    register,
)

from .configs import demo_config

FACTORED_TA = "factored_task_arithmetic_for_tests"


def factored_task_arithmetic(factors: Sequence[LowRankFactors], weights: Sequence[float],
                             params: Mapping[str, Any], context: FactoredContext) -> tuple[torch.Tensor, torch.Tensor]:
    """λ Σ wᵢ sᵢ Pᵢ Qᵢ as stacked factors, each coefficient folded into Pᵢ with one rounding (as linear does)."""
    lefts = [f.left * ((params["lambda"] * float(w)) * f.scale) for f, w in zip(factors, weights)]
    return torch.cat(lefts, dim=1), torch.cat([f.right for f in factors], dim=0)


def summed_vectors(taus: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any],
                   context: FactoredContext) -> torch.Tensor:
    """Σ (λwᵢ)·τᵢ for 1-D changes (bias shifts), summed in adapter order as the linear path does."""
    total = taus[0] * (params["lambda"] * float(weights[0]))
    for tau, w in zip(taus[1:], weights[1:]):
        total = total + tau * (params["lambda"] * float(w))
    return total


@pytest.fixture
def factored_method() -> Iterator[MergeMethod]:
    """Register the test-only factored method for one test."""
    method = register(MergeMethod(
        name=FACTORED_TA, display_name="Task Arithmetic (factored, test only)", paper_url=None,
        summary="λ · Σ wᵢτᵢ as factors", phase=FactoredPhase(factored_task_arithmetic, vectors=summed_vectors),
        params=(Param("lambda", 1.0, float, "scale"),),
    ))
    yield method
    del REGISTRY[FACTORED_TA]


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_every_registered_method_declares_exactly_one_phase() -> None:
    for method in REGISTRY.values():
        assert isinstance(method.phase, (LinearPhase, ElementwisePhase, FactoredPhase, InterpolationPhase)), method.name
        assert [method.is_linear, method.is_elementwise, method.is_factored, method.is_interpolation].count(True) == 1


def test_every_phase_declares_what_the_engine_and_the_writers_need() -> None:
    """The declarations the engine, the dry run and the writers ask (registry.PhaseNeeds), checked per method:
    a sparsifier or kernel only where chunks are combined, coefficients only for Σ cᵢτᵢ, a PEFT output wherever
    there is no statistics pass, and the memory multiplier of each pass structure."""
    for method in REGISTRY.values():
        phase = method.phase
        assert phase.combines_chunks or (phase.sparsifier is None and phase.kernel is None), method.name
        assert (phase.linear_coefficients([1.0, 1.0], {p.name: p.default for p in method.params}) is not None
                ) == phase.sums_coefficients, method.name
        assert phase.peft_output == (not phase.statistics_pass), method.name
        assert phase.rank_declared == (phase.factors_from_inputs and phase.exact_rank([2, 3]) is not None)
        if phase.sums_coefficients:
            assert phase.exact_rank([2, 3]) == 5
        if phase.combines_chunks:
            assert (phase.buffers(2, True), phase.buffers(2, False)) == (2, 5), method.name
        elif phase.statistics_pass:
            assert (phase.buffers(2, True), phase.buffers(2, False)) == (11, 11), method.name
        else:
            assert (phase.buffers(2, True), phase.buffers(2, False)) == (2, 0), method.name


def test_elementwise_methods_declare_their_kernel_and_sparsification() -> None:
    assert get_method("ties").phase.kernel == "ties" and get_method("ties").sparsification == "magnitude"
    assert get_method("dare_linear").phase.kernel == "sum" and get_method("dare_linear").sparsification == "dare"
    assert get_method("magnitude_prune").phase.kernel == "sum"
    assert get_method("task_arithmetic").coefficients([1.0, -2.0], {"lambda": 0.5}) == [0.5, -1.0]
    assert get_method("ties").coefficients([1.0], {}) is None


@pytest.mark.parametrize("kernels_on", [True, False], ids=["C-kernels", "torch"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_task_arithmetic_in_the_factored_phase_gives_the_bytes_of_the_linear_phase(
        factored_method: MergeMethod, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        kernels_on: bool, chunk_rows: int | None) -> None:
    if not kernels_on:
        monkeypatch.setenv(kernels.ENV, "torch")
    weights = [1.0, -0.5, 0.25]
    outputs = {}
    for method in ("task_arithmetic", FACTORED_TA):
        config = demo_config(demo, tmp_path / method, method, weights, parameters={"lambda": 0.8},
                             output={"dtype": "bfloat16"})
        outputs[method] = merge(config, device="cpu", progress=False, chunk_rows=chunk_rows).output_dir
    linear, factored = _bytes(outputs["task_arithmetic"]), _bytes(outputs[FACTORED_TA])
    assert linear.keys() == factored.keys() and linear
    for name in linear:
        assert linear[name] == factored[name], f"{name}: the factored phase wrote other bytes"


def test_factored_phase_on_conv1d_layers_and_bias_shifts_matches_the_linear_phase(
        factored_method: MergeMethod, tmp_path: Path) -> None:
    """Transposed (GPT-2 Conv1D) layers and lora_bias shifts (the `vectors` hook) take the same route."""
    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    llama = build_tiny_llama(tmp_path / "llama", attention_bias=True)
    cases = {
        "gpt2": (gpt2, [build_adapter(gpt2, tmp_path / f"g{i}", "lora", seed=i) for i in (1, 2)]),
        "bias": (llama, [build_adapter(llama, tmp_path / f"b{i}", "bias", seed=i) for i in (1, 2)]),
    }
    for case, (base, adapters) in cases.items():
        outputs = {}
        for method in ("task_arithmetic", FACTORED_TA):
            config = MergeConfig.from_dict({
                "base_model": str(base), "method": method, "parameters": {"lambda": 0.7},
                "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, (1.0, -0.6))],
                "output": {"path": str(tmp_path / f"{case}-{method}")}})
            outputs[method] = merge(config, device="cpu", progress=False).output_dir
        linear, factored = _bytes(outputs["task_arithmetic"]), _bytes(outputs[FACTORED_TA])
        assert linear == factored, f"{case}: the factored phase wrote other bytes"


def test_a_factored_method_refuses_dora_by_name_before_any_work(factored_method: MergeMethod,
                                                                 tmp_path: Path) -> None:
    llama = build_tiny_llama(tmp_path / "llama")
    dora = build_adapter(llama, tmp_path / "dora", "dora", seed=1)
    config = MergeConfig.from_dict({"base_model": str(llama), "method": FACTORED_TA,
                                    "adapters": [{"path": str(dora)}], "output": {"path": str(tmp_path / "out")}})
    with pytest.raises(MergeConfigError, match=rf"'{FACTORED_TA}' works on low-rank factors.*'dora'.*DoRA"):
        merge(config, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_schedule_is_what_the_loop_runs_and_the_estimate_reports(demo: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_lite.api import engine_for, prepare
    from mergekit_lite.sources.checkpoint import BaseCheckpoint
    from mergekit_lite.units import format_size

    reads: list[tuple[str, int, int]] = []
    read_rows = BaseCheckpoint.read_rows

    def recording(self: BaseCheckpoint, name: str, start: int, stop: int) -> torch.Tensor:
        reads.append((name, start, stop))
        return read_rows(self, name, start, stop)

    monkeypatch.setattr(BaseCheckpoint, "read_rows", recording)
    expected = {"task_arithmetic": C_LOWRANK, "ties": C_TIES, "magnitude_prune": C_SUM}
    for method, kernel in expected.items():
        parameters = {"density": 0.5} if method != "task_arithmetic" else {}
        config = demo_config(demo, tmp_path / method, method, [1.0, 1.0, 1.0], parameters=parameters)
        with prepare(config) as prepared:
            schedules = engine_for(prepared, torch.device("cpu"), None, "512MiB").schedules
        merged = [s for s in schedules if s.action == "merge"]
        assert merged and {s.kernel for s in merged} == ({kernel} if kernels.enabled() else {TORCH})
        for schedule in merged:
            covered = [row for start, stop in schedule.ranges for row in range(start, stop)]
            assert covered == list(range(schedule.plan.info.rows))
        # the loop reads exactly the schedules' row chunks, in order (raw-byte copies read no rows) ...
        reads.clear()
        merge(config, device="cpu", progress=False, max_memory="512MiB")
        assert reads == [(s.name, start, stop) for s in schedules if s.action != "copy" for start, stop in s.ranges]
        # ... and the dry run's estimate is the largest working set they hold
        peak = max(s.working_set for s in schedules)
        assert f"working set up to {format_size(peak)} per tensor" in describe_plan(config, device="cpu")
    monkeypatch.setenv(kernels.ENV, "torch")
    config = demo_config(demo, tmp_path / "t", "ties", [1.0, 1.0, 1.0], parameters={"density": 0.5})
    with prepare(config) as prepared:
        assert {s.kernel for s in engine_for(prepared, torch.device("cpu"), None, "512MiB").schedules} == {TORCH}
    assert "cpu kernels: torch" in describe_plan(config, device="cpu")
