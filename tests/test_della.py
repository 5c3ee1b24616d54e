"""della / della_linear: MagPrune against the dense float64 reference from SEMANTICS §3 (the same counter-based
uniforms), exact under streaming (chunk size, order, fused kernels, workers), 1-D tensors as one row, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mergekit_lite import MergeConfig, MergeConfigError, merge
from mergekit_lite.engine import kernels
from mergekit_lite.methods import get_method
from mergekit_lite.randomness import UniformStream, stream_key

from .configs import assert_demo_merge, demo_config
from .reference import load_checkpoint, magprune, ties_combine
from .streaming import stream, stream_fused

tied_values = st.integers(-4, 4).map(lambda v: v / 2)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    one_d = draw(st.booleans())
    rows, cols, n = draw(st.integers(1, 9)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    shape = (rows * cols,) if one_d else (rows, cols)
    taus = [torch.tensor(draw(st.lists(tied_values, min_size=rows * cols, max_size=rows * cols)),
                         dtype=torch.float32).reshape(shape) for _ in range(n)]
    weights = draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.75]), min_size=n, max_size=n))
    own = []
    for _ in range(n):
        density = draw(st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0]))
        epsilon = draw(st.sampled_from([0.0, 0.5, 1.0])) * min(density, 1.0 - density)
        own.append({"density": density, "epsilon": epsilon, "rescale": draw(st.booleans())})
    return {"taus": taus, "weights": weights, "own": own, "chunk_rows": draw(st.integers(1, rows)),
            "seed": draw(st.integers(0, 2**31))}


def resolved(method: str, case: dict, **params: object) -> tuple[dict, list[dict]]:
    return get_method(method).resolve_params(params, case["own"], case["weights"])


def reference(case: dict, name: str = "w", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """uᵢ = wᵢ·tᵢ as SEMANTICS §3 fixes them: tᵢ = MagPrune(τᵢ) (τ/q in float64) rounded once to the compute
    dtype, then wᵢ·tᵢ rounded to it (§2: the arithmetic is float32), returned as float64 for the comparison."""
    updates = []
    for i, (tau, w, o) in enumerate(zip(case["taus"], case["weights"], case["own"])):
        uniforms = UniformStream(stream_key(case["seed"], i, name)).uniforms(0, tau.numel())
        t = magprune(tau.double(), o["density"], o["epsilon"], o["rescale"], uniforms).to(dtype)
        updates.append((w * t.double()).to(dtype).double())
    return updates


#: 1.0 of 7 entries at rank 5 is kept with q = 0.8 + ε − (2ε/6)·5 = 0.6666666666666667 (ε = 0.19999999999999996):
#: 1/q is 1.4999999999999998 in float64 but 1.5 in float32, where it ties the other adapter's −1.5 - a vote of
#: exactly 0, so γ = +1 and the merged entry is 1.5 (a float64 vote gave −1.5: the reference was wrong).
TIED_VOTE = {"taus": [torch.tensor([[1.0, 0, 1.5, 1.5, 1.5, 1.5, 1.5]]), torch.tensor([[-1.5, 0, 0, 0, 0, 0, 0]])],
             "weights": [1.0, 1.0], "chunk_rows": 1, "seed": 192,
             "own": [{"density": 0.8, "epsilon": 0.19999999999999996, "rescale": True},
                     {"density": 0.3, "epsilon": 0.0, "rescale": False}]}


@settings(max_examples=60, deadline=None)
@given(case=cases(), lam=st.sampled_from([1.0, -0.5]))
def test_della_linear_equals_the_dense_reference_for_any_chunking(case: dict, lam: float) -> None:
    params, own = resolved("della_linear", case, **{"lambda": lam})
    got = stream("della_linear", case["taus"], case["weights"], params, own, case["chunk_rows"], seed=case["seed"], name="w")
    torch.testing.assert_close(got.double(), lam * sum(reference(case)), atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case=cases(), sign=st.sampled_from(["sum", "count"]), normalize=st.booleans())
@example(case=TIED_VOTE, sign="sum", normalize=False)
def test_della_equals_the_dense_reference_for_any_chunking(case: dict, sign: str, normalize: bool) -> None:
    params, own = resolved("della", case, sign=sign, normalize=normalize)
    got = stream("della", case["taus"], case["weights"], params, own, case["chunk_rows"], seed=case["seed"], name="w")
    expected = ties_combine(reference(case), case["weights"], sign, normalize, 1.0, vote_dtype=torch.float32)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_vote_that_is_zero_only_in_float32_elects_plus() -> None:
    """The TIED_VOTE case by hand (no reference): both entries 0 are kept (u = 0.081 < q, u = 0.228 < 0.3), 1.0/q
    rounds to 1.5 in float32, the vote 1.5 − 1.5 is 0, γ = +1: 1.5, by the torch steps and the fused kernels."""
    params, own = resolved("della", TIED_VOTE, sign="sum", normalize=False)
    args = ("della", TIED_VOTE["taus"], TIED_VOTE["weights"], params, own, 1, 192, "w")
    for got in (stream(*args), stream_fused(*args)):
        assert float(got[0, 0]) == 1.5


@pytest.mark.skipif(not kernels.enabled(), reason="the fused kernels are not built")
@settings(max_examples=40, deadline=None)
@given(case=cases(), ties=st.booleans())
def test_the_fused_kernel_path_gives_the_bytes_of_the_torch_path(case: dict, ties: bool) -> None:
    method = "della" if ties else "della_linear"
    params, own = resolved(method, case)
    args = (method, case["taus"], case["weights"], params, own, case["chunk_rows"], case["seed"])
    assert torch.equal((0.0 + stream(*args)).view(torch.int32), stream_fused(*args).view(torch.int32))


def test_keep_probability_falls_linearly_with_the_magnitude_rank() -> None:
    """Over many rows, the largest entry of each row survives at density + ε, the smallest at density − ε,
    and a kept entry is divided by its probability (so E[t] = τ)."""
    rows, cols = 4000, 5
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]).repeat(rows, 1)  # rank of column c: 4 − c (0 = largest)
    own = [{"density": 0.5, "epsilon": 0.4, "rescale": True}]
    params, own = get_method("della_linear").resolve_params({}, own, [1.0])
    got = stream("della_linear", [tau], [1.0], params, own, 64)
    kept = (got != 0).double().mean(dim=0)
    expected = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert bool(((kept - expected).abs() < 5 * sigma).all()), kept
    values = got[got != 0] / tau[got != 0]
    torch.testing.assert_close(values, (1 / expected.float()).repeat(rows, 1)[got != 0])


def test_masks_do_not_depend_on_the_seed_alone_but_on_adapter_and_tensor() -> None:
    tau = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    params, own = get_method("della_linear").resolve_params({}, [{"density": 0.5, "epsilon": 0.2}] * 2, [1.0, 1.0])
    one = stream("della_linear", [tau], [1.0], params, own[:1], 3, seed=4, name="a")
    assert torch.equal(one, stream("della_linear", [tau], [1.0], params, own[:1], 8, seed=4, name="a"))
    assert not torch.equal(one, stream("della_linear", [tau], [1.0], params, own[:1], 3, seed=4, name="b"))
    assert not torch.equal(one, stream("della_linear", [tau], [1.0], params, own[:1], 3, seed=5, name="a"))


@pytest.mark.parametrize(("own", "message"), [
    ({"density": 0.8, "epsilon": 0.3}, "'epsilon' must be in [0, min(density, 1 − density)]"),
    ({"density": 0.5, "epsilon": -0.1}, "'epsilon' must be in"),
    ({"density": 0.1}, "'epsilon' must be in [0, min(density, 1 − density)] = [0, 0.1]"),  # the default 0.15
])
def test_epsilon_outside_the_probabilities_is_a_config_error(own: dict, message: str) -> None:
    with pytest.raises(MergeConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        get_method("della").resolve_params({}, [own], [1.0])


@pytest.mark.slow  # a merge and an entry-by-entry Python reference over every tensor
def test_della_through_files_equals_the_reference(demo: Path, tmp_path: Path) -> None:
    own = [{"density": 0.4, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.3}, {"density": 0.5, "epsilon": 0.0}]
    config = demo_config(demo, tmp_path / "out", "della", per_adapter=own, parameters={"density": 0.5}, seed=3)
    weights = [1.0, -0.5, 2.0]

    def delta(name: str, taus: list[torch.Tensor]) -> torch.Tensor:
        case = {"taus": taus, "weights": weights, "seed": 3, "own": [{**o, "rescale": True} for o in own]}
        return ties_combine(reference(case, name), weights, "sum", True, 1.0, vote_dtype=torch.float32)

    assert_demo_merge(demo, config, delta)


@pytest.mark.slow  # six whole merges
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_checkpoints_are_the_same_bytes_for_any_chunking_workers_and_kernels(
        demo: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = demo_config(demo, tmp_path / "whole", method, parameters={"density": 0.5, "epsilon": 0.2}, seed=9)
    whole = (merge(config, device="cpu", workers=1, progress=False).output_dir / "model.safetensors").read_bytes()
    for chunk_rows, workers in [(1, 2), (5, 3)]:
        other = merge(config, out=tmp_path / f"c{chunk_rows}", device="cpu", chunk_rows=chunk_rows, workers=workers,
                      progress=False).output_dir
        assert (other / "model.safetensors").read_bytes() == whole
    monkeypatch.setenv(kernels.ENV, "torch")
    torch_only = merge(config, out=tmp_path / "torch", device="cpu", chunk_rows=5, workers=2, progress=False).output_dir
    assert (torch_only / "model.safetensors").read_bytes() == whole


@pytest.mark.slow  # builds the tiny bases and two bias adapters, two merges
def test_a_1d_tensor_is_one_row_whatever_the_chunk_rows(bases: dict[str, Path], tmp_path: Path) -> None:
    """lora_bias shifts are 1-D: one row for MagPrune's ranks, so --chunk-rows 1 must not cut them into entries."""
    from evals.fixtures import build_adapter

    base = bases["llama_bias"]
    adapters = [build_adapter(base, tmp_path / f"b{i}", "bias", seed=i) for i in (1, 2)]
    outputs = []
    for chunk_rows in (None, 1):
        config = MergeConfig.from_dict({
            "base_model": str(base), "method": "della_linear", "parameters": {"density": 0.5, "epsilon": 0.3},
            "adapters": [{"path": str(a)} for a in adapters], "output": {"path": str(tmp_path / f"out{chunk_rows}")}})
        outputs.append(merge(config, device="cpu", chunk_rows=chunk_rows, progress=False).output_dir)
    merged = [load_checkpoint(folder) for folder in outputs]
    biases = [name for name in merged[0] if name.endswith(".bias") and not torch.equal(merged[0][name],
                                                                                        load_checkpoint(base)[name])]
    assert biases, "the bias adapters changed no bias"
    assert all(torch.equal(merged[0][name], merged[1][name]) for name in merged[0])
