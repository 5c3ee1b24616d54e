"""breadcrumbs / breadcrumbs_ties: the dense float64 reference from SEMANTICS §3, exact under streaming
(chunk size, chunk order, fused kernels and workers change no byte), mergekit's gamma-0 case, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lite import MergeConfigError, merge
from mergekit_lite.engine import kernels
from mergekit_lite.methods import get_method

from .configs import assert_demo_merge, demo_config
from .reference import breadcrumbs, ties_combine
from .streaming import stream, stream_fused

tied_values = st.integers(-4, 4).map(lambda v: v / 2)  # few distinct magnitudes: both cuts split ties


@st.composite
def cases(draw: st.DrawFn) -> dict:
    rows, cols, n = draw(st.integers(1, 9)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    numel = rows * cols
    taus = [torch.tensor(draw(st.lists(tied_values, min_size=numel, max_size=numel)),
                         dtype=torch.float32).reshape(rows, cols) for _ in range(n)]
    weights = draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.75]), min_size=n, max_size=n))
    densities = [max(d, 1.0 / numel) for d in draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n))]
    gammas = [draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])) for _ in range(n)]
    gammas = [min(g, 1.0 - d) for g, d in zip(gammas, densities)]
    return {"taus": taus, "weights": weights, "own": [{"density": d, "gamma": g} for d, g in zip(densities, gammas)],
            "chunk_rows": draw(st.integers(1, rows))}


def resolved(method: str, case: dict, **params: object) -> tuple[dict, list[dict]]:
    return get_method(method).resolve_params(params, case["own"], case["weights"])


def reference(case: dict) -> list[torch.Tensor]:
    return [w * breadcrumbs(t.double(), o["density"], o["gamma"]) for t, w, o in zip(case["taus"], case["weights"], case["own"])]


@settings(max_examples=40, deadline=None)
@given(case=cases(), lam=st.sampled_from([1.0, -0.5]))
def test_breadcrumbs_equals_the_dense_reference_for_any_chunking(case: dict, lam: float) -> None:
    params, own = resolved("breadcrumbs", case, **{"lambda": lam})
    got = stream("breadcrumbs", case["taus"], case["weights"], params, own, case["chunk_rows"])
    torch.testing.assert_close(got.double(), lam * sum(reference(case)), atol=1e-6, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(case=cases(), sign=st.sampled_from(["sum", "count"]), normalize=st.booleans())
def test_breadcrumbs_ties_equals_the_dense_reference_for_any_chunking(case: dict, sign: str, normalize: bool) -> None:
    params, own = resolved("breadcrumbs_ties", case, sign=sign, normalize=normalize)
    got = stream("breadcrumbs_ties", case["taus"], case["weights"], params, own, case["chunk_rows"])
    expected = ties_combine(reference(case), case["weights"], sign, normalize, 1.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not kernels.enabled(), reason="the fused kernels are not built")
@settings(max_examples=40, deadline=None)
@given(case=cases(), ties=st.booleans())
def test_the_fused_kernel_path_gives_the_bytes_of_the_torch_path(case: dict, ties: bool) -> None:
    method = "breadcrumbs_ties" if ties else "breadcrumbs"
    params, own = resolved(method, case)
    torch_path = stream(method, case["taus"], case["weights"], params, own, case["chunk_rows"])
    fused = stream_fused(method, case["taus"], case["weights"], params, own, case["chunk_rows"])
    assert torch.equal((0.0 + torch_path).view(torch.int32), fused.view(torch.int32))


def test_gamma_zero_is_magnitude_pruning_not_an_empty_task_vector() -> None:
    """mergekit 0.1.5 keeps nothing at gamma 0; here gamma 0 drops no outlier: magnitude_prune's bytes."""
    generator = torch.Generator().manual_seed(5)
    taus = [torch.randn(12, 10, generator=generator) for _ in range(2)]
    case = {"taus": taus, "weights": [1.0, 0.5], "own": [{"density": 0.3, "gamma": 0.0}] * 2}
    params, own = resolved("breadcrumbs", case)
    got = stream("breadcrumbs", taus, [1.0, 0.5], params, own, 5)
    pruned_params, pruned_own = get_method("magnitude_prune").resolve_params({}, [{"density": 0.3}] * 2, [1.0, 0.5])
    assert torch.equal(got, stream("magnitude_prune", taus, [1.0, 0.5], pruned_params, pruned_own, 5))
    assert int((got != 0).sum()) > 0


def test_the_kept_band_is_exactly_density_below_the_gamma_outliers() -> None:
    tau = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)  # magnitudes 1..100, no ties
    case = {"taus": [tau], "weights": [1.0], "own": [{"density": 0.2, "gamma": 0.05}]}
    params, own = resolved("breadcrumbs", case)
    kept = stream("breadcrumbs", [tau], [1.0], params, own, 3).reshape(-1)
    assert sorted(int(v) for v in kept[kept != 0]) == list(range(76, 96))  # 96..100 dropped, the next 20 kept


@pytest.mark.parametrize(("own", "message"), [
    ({"density": 0.8, "gamma": 0.3}, "'gamma' must be in [0, 1 − density]"),
    ({"density": 0.5, "gamma": -0.1}, "'gamma' must be in"),
])
def test_gamma_outside_the_band_is_a_config_error(own: dict, message: str) -> None:
    with pytest.raises(MergeConfigError, match=message.replace("[", r"\[")):
        get_method("breadcrumbs").resolve_params({}, [own], [1.0])


@pytest.mark.slow  # a merge and a full-sort Python reference over every tensor
def test_breadcrumbs_through_files_equals_the_reference(demo: Path, tmp_path: Path) -> None:
    own = [{"density": 0.4, "gamma": 0.05}, {"density": 0.2, "gamma": 0.0}, {"density": 0.6, "gamma": 0.1}]
    config = demo_config(demo, tmp_path / "out", "breadcrumbs_ties", per_adapter=own, parameters={"density": 0.5})
    weights = [1.0, -0.5, 2.0]

    def delta(name: str, taus: list[torch.Tensor]) -> torch.Tensor:
        updates = [w * breadcrumbs(t.double(), o["density"], o["gamma"]) for t, w, o in zip(taus, weights, own)]
        return ties_combine(updates, weights, "sum", True, 1.0)

    assert_demo_merge(demo, config, delta)


@pytest.mark.slow  # six whole merges
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_checkpoints_are_the_same_bytes_for_any_chunking_workers_and_kernels(
        demo: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = demo_config(demo, tmp_path / "whole", method, parameters={"density": 0.3, "gamma": 0.02})
    whole = (merge(config, device="cpu", workers=1, progress=False).output_dir / "model.safetensors").read_bytes()
    for chunk_rows, workers in [(1, 2), (5, 3)]:
        other = merge(config, out=tmp_path / f"c{chunk_rows}", device="cpu", chunk_rows=chunk_rows, workers=workers,
                      progress=False).output_dir
        assert (other / "model.safetensors").read_bytes() == whole
    monkeypatch.setenv(kernels.ENV, "torch")
    torch_only = merge(config, out=tmp_path / "torch", device="cpu", chunk_rows=5, workers=2, progress=False).output_dir
    assert (torch_only / "model.safetensors").read_bytes() == whole


def test_breadcrumbs_in_the_core_equals_the_reference_on_the_core_matrices() -> None:
    """`space: core`: the same cut on Mᵢ = V_Pᵀ τᵢ V_Q (SEMANTICS §3c), the merged delta V_P M V_Qᵀ."""
    import numpy as np

    from mergekit_lite.methods import FactoredContext, LowRankFactors

    from .reference_subspace import numerical_rank_svd

    generator = torch.Generator().manual_seed(8)
    factors = [LowRankFactors(torch.randn(12, r, generator=generator, dtype=torch.float64),
                              torch.randn(r, 10, generator=generator, dtype=torch.float64), s)
               for r, s in [(2, 0.5), (3, 2.0)]]
    weights, own = [1.0, -0.7], [{"density": 0.4, "gamma": 0.1}, {"density": 0.3, "gamma": 0.04}]
    method = get_method("breadcrumbs")
    params, resolved_own = method.resolve_params({"space": "core", "lambda": 0.9}, own, weights)
    context = FactoredContext("t", (12, 10), 0, (0, 1), tuple(resolved_own))
    left, right = method.resolved(params).phase.factors(factors, weights, params, context)
    got = (left @ right).numpy()

    ps = [f.scale * f.left.numpy() for f in factors]
    qs = [f.right.numpy() for f in factors]
    v_p, v_q = numerical_rank_svd(np.hstack(ps))[0], numerical_rank_svd(np.vstack(qs))[2].T
    cores = [torch.from_numpy(v_p.T @ (p @ q) @ v_q) for p, q in zip(ps, qs)]
    merged = 0.9 * sum(w * breadcrumbs(c, o["density"], o["gamma"]) for c, w, o in zip(cores, weights, own))
    expected = v_p @ merged.numpy() @ v_q.T
    assert np.linalg.norm(got - expected) <= 1e-9 * np.linalg.norm(expected)
