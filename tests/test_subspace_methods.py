"""The subspace methods (SEMANTICS §3c) against an independent dense float64 reference, plus their invariants.

`tests/reference_subspace.py` was written from SEMANTICS alone (not from the package's code): it forms every SVD
of the dense m×n task vectors. Here the package's factored phases (which work in the low-rank core) must match it
wherever the dense problem is well-posed (R = Σrᵢ ≤ min(m, n), full-rank random factors), hold the invariants of
§3c (rotation of an adapter's factors, adapter order, knots with a linear base = that base, iso_cts with k_s = 0 =
iso_c, T = 1), never decompose an m×n matrix, and run end to end through `merge()` independent of chunking and
workers, on adapters of mixed ranks / module sets / signs, rank-deficient factors, R > min(m, n), DoRA (refused)
and lora_bias (bias shifts averaged).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.methods import FactoredContext, LowRankFactors, get_method
from tests import reference_subspace as ref
from tests.configs import merge_config
from tests.reference import load_checkpoint

PREFIX = "base_model.model."
DEMO_ADAPTERS = ("style", "math", "facts")

# One entry per (method, variant) under test: the config method name, fixed global parameters, and whether the
# dense reference covers it (DARE needs the package's RNG, so the reference skips it).
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "tsv_m": ("tsv_m", {"alpha": 1.0}, True),
    "iso_c": ("iso_c", {"alpha": 1.0}, True),
    "iso_cts": ("iso_cts", {"alpha": 1.0}, True),
    "knots_ties": ("knots", {"base": "ties"}, True),
    "knots_magnitude_prune": ("knots", {"base": "magnitude_prune"}, True),
    "knots_linear": ("knots", {"base": "linear"}, True),
    "knots_task_arithmetic": ("knots", {"base": "task_arithmetic"}, True),
    "knots_dare_ties": ("knots", {"base": "dare_ties"}, False),
    "knots_dare_linear": ("knots", {"base": "dare_linear"}, False),
    "core_ties": ("ties", {"space": "core"}, True),
    "core_magnitude_prune": ("magnitude_prune", {"space": "core"}, True),
    "core_dare_ties": ("dare_ties", {"space": "core"}, False),
    "core_dare_linear": ("dare_linear", {"space": "core"}, False),
}
NEEDS_DENSITY = {"knots_ties", "knots_magnitude_prune", "knots_dare_ties", "knots_dare_linear", "core_ties",
                 "core_magnitude_prune", "core_dare_ties", "core_dare_linear"}
# Bugs these tests found, now fixed: knots with a TIES base counted an all-zero adapter (its representation was
# rounding noise, not 0) in the TIES divisor; knots with a linear base divided by Σ wᵢ of the touching adapters only.
REFERENCED = [key for key, (_, _, covered) in METHODS.items() if covered]
ORDER_FREE = ["tsv_m", "iso_c", "iso_cts"]
# Entry-wise steps in a basis fixed by [P₁ … P_T] and [Q₁; …; Q_T] (SEMANTICS §3c `space: core`): that basis is
# unchanged by an orthogonal rotation of an adapter's factors, not by a general invertible one.
CORE_SPACE = {"core_ties", "core_magnitude_prune", "core_dare_ties", "core_dare_linear"}


# ----------------------------------------------------------------------------------------------------------------
# Helpers: build factors, run the package's factored phase, run the reference
# ----------------------------------------------------------------------------------------------------------------


def random_factors(seed: int, m: int, n: int, ranks: Sequence[int], scales: Sequence[float],
                   dtype: torch.dtype = torch.float64) -> list[LowRankFactors]:
    """Full-rank Gaussian factors (distinct singular values with probability 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [LowRankFactors(torch.randn(m, r, generator=gen, dtype=torch.float64).to(dtype),
                           torch.randn(r, n, generator=gen, dtype=torch.float64).to(dtype), float(s))
            for r, s in zip(ranks, scales)]


def resolve(key: str, extra: Mapping[str, Any], per_adapter: Sequence[Mapping[str, Any]], weights: Sequence[float]):
    """(method row as the params run it, params, per-adapter params) for METHODS[key] with `extra` on top."""
    name, fixed, _ = METHODS[key]
    method = get_method(name)
    params, adapters = method.resolve_params({**fixed, **extra}, [dict(p) for p in per_adapter], list(weights))
    return method.resolved(params), params, adapters


def run(key: str, factors: Sequence[LowRankFactors], weights: Sequence[float], extra: Mapping[str, Any] | None = None,
        per_adapter: Sequence[Mapping[str, Any]] | None = None, tensor: str = "layer.weight", seed: int = 0,
        adapters: Sequence[int] | None = None) -> np.ndarray:
    """The package's merged delta L @ R for METHODS[key], as float64 numpy."""
    per_adapter = per_adapter if per_adapter is not None else [{}] * len(factors)
    method, params, resolved = resolve(key, extra or {}, per_adapter, weights)
    m, n = factors[0].left.shape[0], factors[0].right.shape[1]
    context = FactoredContext(tensor=tensor, shape=(m, n), seed=seed,
                              adapters=tuple(adapters if adapters is not None else range(len(factors))),
                              adapter_params=tuple(resolved))
    left, right = method.phase.factors(list(factors), list(weights), params, context)
    assert left.shape[0] == m and right.shape[1] == n and left.shape[1] == right.shape[0]
    return ref.as_dense(left) @ ref.as_dense(right)


def reference(key: str, factors: Sequence[LowRankFactors], weights: Sequence[float],
              extra: Mapping[str, Any] | None = None,
              per_adapter: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
    """The dense float64 reference for METHODS[key] (params resolved the same way, defaults included)."""
    per_adapter = per_adapter if per_adapter is not None else [{}] * len(factors)
    _, params, resolved = resolve(key, extra or {}, per_adapter, weights)
    densities = [p.get("density") for p in resolved]
    taus = ref.factored_task_vectors([(f.left, f.right, f.scale) for f in factors])
    if key == "tsv_m":
        return ref.tsv_m(taus, weights, params["alpha"])
    if key == "iso_c":
        return ref.iso_c(taus, weights, params["alpha"])
    if key == "iso_cts":
        return ref.iso_cts(taus, weights, params["alpha"], params["common_fraction"])
    if key.startswith("knots_"):
        return ref.knots(taus, weights, params["base"], params, densities, 0, "layer.weight")
    if key in ("core_ties", "core_magnitude_prune"):
        pq = [(f.scale * ref.as_dense(f.left), ref.as_dense(f.right)) for f in factors]
        return ref.core_space(pq, weights, METHODS[key][0], params, densities)
    raise NotImplementedError(key)


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(got - expected) / (scale if scale > 0 else 1.0))


def random_rotation(gen: np.random.Generator, r: int) -> np.ndarray:
    """A random invertible r×r matrix with condition number ≤ e²."""
    q1, _ = np.linalg.qr(gen.standard_normal((r, r)))
    q2, _ = np.linalg.qr(gen.standard_normal((r, r)))
    return q1 @ np.diag(np.exp(gen.uniform(-1.0, 1.0, r))) @ q2


def rotated(factors: Sequence[LowRankFactors], gen: np.random.Generator, orthogonal: bool) -> list[LowRankFactors]:
    """(Pᵢ G, G⁻¹ Qᵢ) with an independent G per adapter."""
    out = []
    for f in factors:
        r = f.left.shape[1]
        g = np.linalg.qr(gen.standard_normal((r, r)))[0] if orthogonal else random_rotation(gen, r)
        g_t = torch.from_numpy(g)
        out.append(LowRankFactors(f.left.double() @ g_t, torch.linalg.solve(g_t, f.right.double()), f.scale))
    return out


WEIGHTS = st.sampled_from([1.0, 0.5, 2.0, -0.7, -1.5, 0.3, 1.25])
SCALES = st.sampled_from([0.5, 1.0, 2.0, 4.0])
DENSITIES = st.sampled_from([0.25, 0.5, 0.75, 1.0])  # dyadic: ⌊density · numel⌋ is exact in floats


@st.composite
def cases(draw: st.DrawFn, key: str, max_adapters: int = 3, max_rank: int = 4) -> dict[str, Any]:
    """A well-posed random problem for METHODS[key]: R ≤ min(m, n), full-rank factors, resolved-ready params."""
    count = draw(st.integers(1, max_adapters))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=count, max_size=count))
    total = sum(ranks)
    m = draw(st.integers(max(total, 2), total + 10))
    n = draw(st.integers(max(total, 2), total + 10))
    weights = draw(st.lists(WEIGHTS, min_size=count, max_size=count))
    scales = draw(st.lists(SCALES, min_size=count, max_size=count))
    extra: dict[str, Any] = {}
    per_adapter: list[dict[str, Any]] = [{} for _ in range(count)]
    if key in ("tsv_m", "iso_c", "iso_cts"):
        extra["alpha"] = draw(st.sampled_from([1.0, 0.5, 1.7]))
    if key == "iso_cts":
        extra["common_fraction"] = draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]))
    if key in NEEDS_DENSITY:
        # the core is R×R at most: keep ⌊density · numel⌋ ≥ 1 (a zero keep count is a config error)
        floor = 1.0 if total == 1 else 0.25
        for p in per_adapter:
            p["density"] = max(draw(DENSITIES), floor)
    if key in ("knots_ties", "core_ties"):
        extra["sign"] = draw(st.sampled_from(["sum", "count"]))
        extra["normalize"] = draw(st.booleans())
        if extra["sign"] == "count" and (count % 2 == 0 or any(p["density"] < 1.0 for p in per_adapter)):
            # A count vote can tie (+1 −1 → 0 → γ = +1), and which adapter is "+1" there flips with the sign of a
            # singular vector, which no definition fixes: knots / core space with `sign: count` are well-posed
            # only where no vote can tie, i.e. an odd number of adapters and nothing trimmed.
            extra["sign"] = "sum"
    if key in ("knots_ties", "knots_magnitude_prune", "knots_task_arithmetic", "core_ties", "core_magnitude_prune"):
        extra["lambda"] = draw(st.sampled_from([1.0, 0.6, 1.4]))
    if key == "knots_linear":
        extra["normalize"] = draw(st.booleans())
        if extra["normalize"] and abs(sum(weights)) < 0.2:  # Σw = 0 is a config error; keep well-conditioned
            weights[0] += 1.0
    seed = draw(st.integers(0, 2**31 - 1))
    return {"seed": seed, "m": m, "n": n, "ranks": ranks, "weights": weights, "scales": scales,
            "extra": extra, "per_adapter": per_adapter}


def factors_of(case: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> list[LowRankFactors]:
    return random_factors(case["seed"], case["m"], case["n"], case["ranks"], case["scales"], dtype)


# ----------------------------------------------------------------------------------------------------------------
# (b) equal to the dense float64 reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", REFERENCED)
@settings(max_examples=25)
@given(data=st.data())
def test_matches_the_dense_reference_in_float64(key: str, data: st.DataObject) -> None:
    case = data.draw(cases(key))
    factors = factors_of(case)
    got = run(key, factors, case["weights"], case["extra"], case["per_adapter"])
    expected = reference(key, factors, case["weights"], case["extra"], case["per_adapter"])
    assert np.all(np.isfinite(got))
    assert rel_err(got, expected) <= 1e-5, (key, case)


@pytest.mark.parametrize("key", REFERENCED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_dense_reference_with_float32_factors(key: str, seed: int) -> None:
    ranks, weights, scales = [4, 2, 3], [1.0, -0.6, 0.8], [2.0, 1.0, 0.5]
    per_adapter = [{"density": d} for d in (0.5, 0.75, 0.5)] if key in NEEDS_DENSITY else None
    factors = random_factors(100 + seed, 24, 20, ranks, scales, torch.float32)
    got = run(key, factors, weights, {}, per_adapter)
    expected = reference(key, factors, weights, {}, per_adapter)  # the same float32 inputs, in float64
    assert rel_err(got, expected) <= 1e-4


def test_tsv_m_caps_each_adapter_at_min_m_n_over_t_singular_triplets() -> None:
    # T = 2, min(m, n) = 8: ⌊8/2⌋ = 4 < r₂ = 6, so adapter 2 keeps only its top 4 triplets (R = 8 ≤ 8).
    factors = random_factors(7, 8, 11, [2, 6], [1.0, 1.0])
    got = run("tsv_m", factors, [1.0, 1.0])
    expected = ref.tsv_m(ref.factored_task_vectors([(f.left, f.right, f.scale) for f in factors]), [1.0, 1.0])
    assert np.linalg.matrix_rank(got) == 6
    assert rel_err(got, expected) <= 1e-8


# ----------------------------------------------------------------------------------------------------------------
# (a) rotation, (d) order, and the special cases
# ----------------------------------------------------------------------------------------------------------------

INVARIANT_KEYS = list(METHODS)


@pytest.mark.parametrize("key", INVARIANT_KEYS)
@settings(max_examples=10)
@given(data=st.data())
def test_rotating_an_adapters_factors_changes_nothing(key: str, data: st.DataObject) -> None:
    case = data.draw(cases(key))
    factors = factors_of(case)
    gen = np.random.default_rng(case["seed"])
    turned = rotated(factors, gen, orthogonal=key in CORE_SPACE)
    before = run(key, factors, case["weights"], case["extra"], case["per_adapter"])
    after = run(key, turned, case["weights"], case["extra"], case["per_adapter"])
    assert rel_err(after, before) <= 1e-8, case


@pytest.mark.parametrize("key", INVARIANT_KEYS)
def test_moving_the_scale_into_the_left_factor_changes_nothing(key: str) -> None:
    # τᵢ = sᵢ Bᵢ Aᵢ = (sᵢBᵢ) Aᵢ: the scale is Pᵢ's (SEMANTICS §3c), wherever it is stored.
    factors = random_factors(3, 20, 18, [3, 4, 2], [4.0, 0.5, 2.0])
    folded = [LowRankFactors(f.scale * f.left, f.right, 1.0) for f in factors]
    per_adapter = [{"density": 0.5}] * 3 if key in NEEDS_DENSITY else None
    weights = [1.0, -0.5, 0.8]
    assert rel_err(run(key, folded, weights, {}, per_adapter), run(key, factors, weights, {}, per_adapter)) <= 1e-9


@pytest.mark.parametrize("key", ORDER_FREE)
@settings(max_examples=15)
@given(data=st.data())
def test_adapter_order_does_not_matter(key: str, data: st.DataObject) -> None:
    case = data.draw(cases(key))
    factors = factors_of(case)
    order = data.draw(st.permutations(range(len(factors))))
    got = run(key, [factors[i] for i in order], [case["weights"][i] for i in order], case["extra"])
    assert rel_err(got, run(key, factors, case["weights"], case["extra"])) <= 1e-9


@pytest.mark.parametrize("base", ["linear", "task_arithmetic"])
@settings(max_examples=15)
@given(data=st.data())
def test_knots_with_a_linear_base_is_that_base(base: str, data: st.DataObject) -> None:
    key = f"knots_{base}"
    case = data.draw(cases(key))
    factors = factors_of(case)
    taus = ref.factored_task_vectors([(f.left, f.right, f.scale) for f in factors])
    weights, extra = case["weights"], case["extra"]
    if base == "linear":
        coefficients = [w / sum(weights) for w in weights] if extra["normalize"] else list(weights)
    else:
        coefficients = [extra["lambda"] * w for w in weights]
    expected = sum(c * t for c, t in zip(coefficients, taus))
    assert rel_err(run(key, factors, weights, extra), expected) <= 1e-9


def test_knots_with_dare_at_density_one_is_its_deterministic_base() -> None:
    # density 1: DARE drops nothing, so dare_linear = task arithmetic and dare_ties = ties without trimming.
    factors = random_factors(5, 22, 17, [4, 3, 2], [1.0, 2.0, 0.5])
    weights = [1.0, -0.8, 0.6]
    full = [{"density": 1.0}] * 3
    taus = ref.factored_task_vectors([(f.left, f.right, f.scale) for f in factors])
    assert rel_err(run("knots_dare_linear", factors, weights, {"lambda": 0.7}, full),
                   0.7 * sum(w * t for w, t in zip(weights, taus))) <= 1e-9
    assert rel_err(run("knots_dare_ties", factors, weights, {}, full),
                   ref.knots(taus, weights, "ties", {}, [1.0] * 3)) <= 1e-9


def test_core_space_dare_at_density_one_is_its_deterministic_base() -> None:
    factors = random_factors(6, 22, 17, [4, 3, 2], [1.0, 2.0, 0.5])
    weights = [1.0, -0.8, 0.6]
    full = [{"density": 1.0}] * 3
    taus = ref.factored_task_vectors([(f.left, f.right, f.scale) for f in factors])
    assert rel_err(run("core_dare_linear", factors, weights, {"lambda": 0.7}, full),
                   0.7 * sum(w * t for w, t in zip(weights, taus))) <= 1e-9
    pq = [(f.scale * ref.as_dense(f.left), ref.as_dense(f.right)) for f in factors]
    assert rel_err(run("core_dare_ties", factors, weights, {}, full),
                   ref.core_space(pq, weights, "ties", {}, [1.0] * 3)) <= 1e-9


def test_dare_in_the_core_and_in_knots_depends_on_seed_and_tensor_only() -> None:
    factors = random_factors(8, 30, 26, [4, 4, 4], [1.0, 1.0, 1.0])
    weights = [1.0, 1.0, 1.0]
    half = [{"density": 0.5}] * 3
    for key in ("core_dare_ties", "core_dare_linear", "knots_dare_ties", "knots_dare_linear"):
        a = run(key, factors, weights, {}, half, tensor="a.weight", seed=1)
        assert np.array_equal(a, run(key, factors, weights, {}, half, tensor="a.weight", seed=1)), key
        assert not np.allclose(a, run(key, factors, weights, {}, half, tensor="a.weight", seed=2)), key
        assert not np.allclose(a, run(key, factors, weights, {}, half, tensor="b.weight", seed=1)), key


@settings(max_examples=15)
@given(data=st.data())
def test_iso_cts_with_no_task_specific_triplets_is_iso_c(data: st.DataObject) -> None:
    case = data.draw(cases("iso_c"))
    factors = factors_of(case)
    alpha = case["extra"]["alpha"]
    cts = run("iso_cts", factors, case["weights"], {"alpha": alpha, "common_fraction": 1.0})
    assert rel_err(cts, run("iso_c", factors, case["weights"], {"alpha": alpha})) <= 1e-9


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 20), n=st.integers(1, 20), r=st.integers(1, 6),
       w=WEIGHTS, s=SCALES, alpha=st.sampled_from([1.0, 0.4, 2.5]))
def test_tsv_m_of_one_adapter_is_alpha_w_tau(seed: int, m: int, n: int, r: int, w: float, s: float,
                                             alpha: float) -> None:
    # any rank, even r > min(m, n): one adapter keeps min(rank, min(m, n)) = all of its triplets
    (factor,) = random_factors(seed, m, n, [r], [s])
    tau = ref.factored_task_vectors([(factor.left, factor.right, factor.scale)])[0]
    assert rel_err(run("tsv_m", [factor], [w], {"alpha": alpha}), alpha * w * tau) <= 1e-9


@pytest.mark.parametrize("key", INVARIANT_KEYS)
def test_a_zero_adapter_and_rank_deficient_factors_give_finite_results(key: str) -> None:
    factors = random_factors(9, 16, 14, [4, 3, 4], [1.0, 2.0, 1.0])
    zero = LowRankFactors(torch.zeros_like(factors[1].left), factors[1].right, factors[1].scale)
    deficient_left = factors[2].left.clone()
    deficient_left[:, 2:] = 0.0  # rank 2 of 4
    factors = [factors[0], zero, LowRankFactors(deficient_left, factors[2].right, factors[2].scale)]
    per_adapter = [{"density": 0.5}] * 3 if key in NEEDS_DENSITY else None
    got = run(key, factors, [1.0, 0.5, -0.7], {}, per_adapter)
    assert np.all(np.isfinite(got))
    if METHODS[key][2]:
        assert rel_err(got, reference(key, factors, [1.0, 0.5, -0.7], {}, per_adapter)) <= 1e-8


KNOTS_KEYS = [k for k in METHODS if k.startswith("knots_")]


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("key", KNOTS_KEYS)
def test_knots_an_all_zero_adapter_is_the_same_as_leaving_it_out(key: str, position: int) -> None:
    # τ_z = 0: its representation ΣZ_z = Uᵀτ_z is 0, so every base ignores it (TIES: u_z = 0 never agrees; the DARE
    # keys of the other adapters are their config indices, unchanged); linear with normalize: false likewise.
    factors = random_factors(12, 18, 15, [4, 3, 3], [1.0, 2.0, 1.0])
    zero = LowRankFactors(torch.zeros_like(factors[2].left), factors[2].right, factors[2].scale)
    extra = {"normalize": False} if key == "knots_linear" else {}
    density = {"density": 0.5} if key in NEEDS_DENSITY else {}
    members = [(factors[0], 1.0, 0), (factors[1], -0.7, 1)]
    members.insert(position, (zero, 0.9, 2))
    with_zero = run(key, [f for f, _, _ in members], [w for _, w, _ in members], extra, [density] * 3,
                    adapters=[i for _, _, i in members])
    without = run(key, factors[:2], [1.0, -0.7], extra, [density] * 2, adapters=[0, 1])
    assert rel_err(with_zero, without) <= 1e-9


# ----------------------------------------------------------------------------------------------------------------
# (c) no SVD / QR / eigendecomposition of an m×n matrix
# ----------------------------------------------------------------------------------------------------------------

_TORCH_LINALG = ("svd", "svdvals", "qr", "eig", "eigh", "eigvals", "eigvalsh", "matrix_rank", "pinv", "lstsq",
                 "lu", "lu_factor", "lu_factor_ex", "cholesky", "cholesky_ex", "ldl_factor", "ldl_factor_ex",
                 "inv", "inv_ex", "solve", "solve_ex", "householder_product", "matrix_power", "det", "slogdet",
                 "cond", "matrix_exp")
_TORCH_TOP = ("svd", "qr", "pinverse", "svd_lowrank", "pca_lowrank", "lobpcg", "inverse", "det", "logdet",
              "slogdet", "cholesky", "lu", "geqrf", "ormqr", "matrix_exp")
_TENSOR_METHODS = ("svd", "qr", "pinverse", "inverse", "det", "slogdet", "logdet", "cholesky", "lu", "geqrf")
_NUMPY_LINALG = ("svd", "svdvals", "qr", "eig", "eigh", "eigvals", "eigvalsh", "matrix_rank", "pinv", "lstsq",
                 "inv", "solve", "cholesky", "det", "slogdet", "cond", "matrix_power")
_SPECTRAL_ORDS = (2, -2, "nuc")


def _matrix_shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None and len(shape) >= 2 else None


@pytest.fixture
def decompositions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...]]]:
    """Record (function, input shape) of every matrix decomposition torch or numpy runs while the test runs."""
    calls: list[tuple[str, tuple[int, ...]]] = []

    def spy(label: str, original: Callable[..., Any], spectral_only: bool = False) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ord_ = kwargs.get("ord", args[1] if len(args) > 1 else None)
            if not spectral_only or ord_ in _SPECTRAL_ORDS:
                for x in args[:2]:
                    if _matrix_shape(x) is not None:
                        calls.append((label, _matrix_shape(x)))
            return original(*args, **kwargs)
        return wrapper

    for name in _TORCH_LINALG:
        if hasattr(torch.linalg, name):
            monkeypatch.setattr(torch.linalg, name, spy(f"torch.linalg.{name}", getattr(torch.linalg, name)))
    for name in ("norm", "matrix_norm"):
        monkeypatch.setattr(torch.linalg, name, spy(f"torch.linalg.{name}", getattr(torch.linalg, name), True))
    for name in _TORCH_TOP:
        if hasattr(torch, name):
            monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
    monkeypatch.setattr(torch, "norm", spy("torch.norm", torch.norm, True))
    for name in _TENSOR_METHODS:
        if hasattr(torch.Tensor, name):
            monkeypatch.setattr(torch.Tensor, name, spy(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in _NUMPY_LINALG:
        if hasattr(np.linalg, name):
            monkeypatch.setattr(np.linalg, name, spy(f"numpy.linalg.{name}", getattr(np.linalg, name)))
    monkeypatch.setattr(np.linalg, "norm", spy("numpy.linalg.norm", np.linalg.norm, True))
    return calls


def test_the_spy_sees_a_dense_decomposition(decompositions: list[tuple[str, tuple[int, ...]]]) -> None:
    torch.linalg.svd(torch.ones(96, 80), full_matrices=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Tensor.qr is deprecated, but still a way to decompose
        torch.ones(5, 7).qr()
    np.linalg.matrix_rank(np.ones((4, 3)))
    assert [shape for _, shape in decompositions] == [(96, 80), (5, 7), (4, 3)]


@pytest.mark.parametrize("key", list(METHODS))
def test_no_decomposition_of_an_m_by_n_matrix(key: str, decompositions: list[tuple[str, tuple[int, ...]]]) -> None:
    m, n, ranks = 96, 80, [4, 5, 3]
    total = sum(ranks)  # R = 12
    factors = random_factors(11, m, n, ranks, [1.0, 2.0, 0.5], torch.float32)
    per_adapter = [{"density": 0.5}] * 3 if key in NEEDS_DENSITY else None
    got = run(key, factors, [1.0, -0.5, 0.8], {}, per_adapter)
    assert np.all(np.isfinite(got)) and np.abs(got).max() > 0
    assert decompositions, "the method ran no decomposition at all: is the spy attached?"
    offending = [(label, shape) for label, shape in decompositions if min(shape[-2:]) > total]
    assert not offending, f"{key}: decompositions of matrices with both sides > R = {total}: {offending}"


# ----------------------------------------------------------------------------------------------------------------
# End to end through merge()
# ----------------------------------------------------------------------------------------------------------------

E2E: dict[str, tuple[str, dict[str, Any], float | None]] = {
    # key: (method, parameters, per-adapter density)
    "tsv_m": ("tsv_m", {"alpha": 0.9}, None),
    "iso_c": ("iso_c", {}, None),
    "iso_cts": ("iso_cts", {"common_fraction": 0.5}, None),
    "knots_ties": ("knots", {"base": "ties"}, 0.5),
    "knots_dare_ties": ("knots", {"base": "dare_ties"}, 0.5),
    "knots_linear": ("knots", {"base": "linear"}, None),
    "core_ties": ("ties", {"space": "core"}, 0.5),
    "core_magnitude_prune": ("magnitude_prune", {"space": "core"}, 0.75),
    "core_dare_ties": ("dare_ties", {"space": "core"}, 0.5),
    "core_dare_linear": ("dare_linear", {"space": "core"}, 0.5),
}
E2E_REFERENCED = {"tsv_m": "tsv_m", "iso_c": "iso_c", "iso_cts": "iso_cts", "knots_ties": "knots_ties",
                  "core_ties": "core_ties", "core_magnitude_prune": "core_magnitude_prune"}


def config_for(base: Path, adapters: Sequence[tuple[Path, float]], out: Path, key: str,
               names: Sequence[str] | None = None) -> MergeConfig:
    method, params, density = E2E[key]
    entries = [{"path": path, "weight": weight, **({"density": density} if density is not None else {}),
                **({"name": names[index]} if names is not None else {})} for index, (path, weight) in enumerate(adapters)]
    return merge_config(base, entries, out, method, parameters=dict(params))


def lora_factors(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Pᵢ = s·B, Qᵢ = A) in float64 per base tensor of a plain LoRA adapter (no rank/alpha patterns)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("use_rslora")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            out[f"{module}.weight"] = (scale * b.double().numpy(), a.double().numpy())
    return out


def check_against_reference(key: str, base: Path, adapters: Sequence[tuple[Path, float]], output: Path) -> int:
    """Every merged tensor's W' − W equals the dense reference on the adapters touching it; return the count."""
    _, params, density = E2E[key]
    base_tensors, merged = load_checkpoint(base), load_checkpoint(output)
    per_adapter = [lora_factors(path) for path, _ in adapters]
    checked = 0
    for name, weight in base_tensors.items():
        if weight.dim() != 2:
            continue  # 1-D bias shifts have no core (checked by the lora_bias test)
        touching = [(i, f[name]) for i, f in enumerate(per_adapter) if name in f]
        if not touching:
            assert torch.equal(merged[name], weight), name
            continue
        factors = [LowRankFactors(torch.from_numpy(p), torch.from_numpy(q), 1.0) for _, (p, q) in touching]
        weights = [adapters[i][1] for i, _ in touching]
        pad = [{"density": density}] * len(touching) if density is not None else None
        expected = reference(E2E_REFERENCED[key], factors, weights,
                             {k: v for k, v in params.items() if k not in ("space", "base")}, pad)
        delta = merged[name].double().numpy() - weight.double().numpy()
        # the output is fl32(W + τ): allow float32 rounding of |W| and of the factored product
        tolerance = 4e-7 * float(np.abs(weight.double().numpy()).max()) + 1e-5 * float(np.abs(expected).max())
        assert np.abs(delta - expected).max() <= tolerance, (key, name, np.abs(delta - expected).max(), tolerance)
        checked += 1
    return checked


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def demo_adapters(demo: Path, weights: Sequence[float] = (1.0, -0.5, 0.7)) -> list[tuple[Path, float]]:
    return [(demo / "adapters" / name, w) for name, w in zip(DEMO_ADAPTERS, weights)]


FAST_RUNS = [(None, 1), (1, 2), (3, 2)]
ALL_RUNS = [(c, w) for c in (1, 3, None) for w in (1, 2)]


def _chunking_changes_no_byte(demo: Path, tmp_path: Path, key: str, runs: Sequence[tuple[int | None, int]]) -> None:
    adapters = demo_adapters(demo)
    outputs = []
    for index, (chunk_rows, workers) in enumerate(runs):
        out = tmp_path / f"out{index}"
        merge(config_for(demo / "base", adapters, out, key), device="cpu", progress=False, chunk_rows=chunk_rows,
              workers=workers)
        outputs.append(safetensors_bytes(out))
    assert all(o == outputs[0] for o in outputs[1:]), key
    if key in E2E_REFERENCED:
        assert check_against_reference(key, demo / "base", adapters, tmp_path / "out0") > 0


@pytest.mark.parametrize("key", list(E2E))
def test_merge_matches_the_reference_and_chunking_and_workers_change_no_byte(demo: Path, tmp_path: Path,
                                                                             key: str) -> None:
    _chunking_changes_no_byte(demo, tmp_path, key, FAST_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(E2E))
def test_every_chunk_size_and_worker_count_changes_no_byte(demo: Path, tmp_path: Path, key: str) -> None:
    _chunking_changes_no_byte(demo, tmp_path, key, ALL_RUNS)


def write_lora(folder: Path, base: Path, modules: Sequence[str], r: int, lora_alpha: float, seed: int,
               dora: bool = False, bias: bool = False) -> Path:
    """A PEFT-layout LoRA adapter (the key names and config PEFT's save_pretrained writes), without importing PEFT:
    Gaussian A (r×in) and B (out×r) for every Linear of `base` whose last name part is in `modules`; with `dora`,
    a `lora_magnitude_vector` near W's row norms; with `bias`, a `lora_B.bias` (needs base biases)."""
    gen = torch.Generator().manual_seed(seed)
    base_tensors = load_checkpoint(base)
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in sorted(base_tensors.items()):
        module = name[:-len(".weight")]
        if weight.dim() != 2 or not name.endswith(".weight") or module.split(".")[-1] not in modules:
            continue
        rows, cols = weight.shape
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, cols, generator=gen) / math.sqrt(cols)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = 0.05 * torch.randn(rows, r, generator=gen)
        if dora:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = weight.norm(dim=1) * (
                1.0 + 0.01 * torch.randn(rows, generator=gen))
        if bias:
            assert f"{module}.bias" in base_tensors, "bias adapters need a base with biases"
            tensors[f"{PREFIX}{module}.lora_B.bias"] = 0.02 * torch.randn(rows, generator=gen)
    folder.mkdir(parents=True)
    config = json.loads((DEMO_ADAPTER_CONFIG).read_text())
    config.update(r=r, lora_alpha=lora_alpha, target_modules=sorted(modules), use_dora=dora, lora_bias=bias,
                  base_model_name_or_path=str(base))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


DEMO_ADAPTER_CONFIG = Path(__file__).resolve().parents[1] / "evals" / "demo" / "adapters" / "style" / "adapter_config.json"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def zoo(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters on the demo base: mixed ranks, mixed module sets, rank-16 on k/v (R > min(m, n)), zeroed B."""
    root = tmp_path_factory.mktemp("subspace_zoo")
    base = demo / "base"
    paths = {
        "r2": write_lora(root / "r2", base, ALL_LINEAR, r=2, lora_alpha=4, seed=21),
        "r8": write_lora(root / "r8", base, ALL_LINEAR, r=8, lora_alpha=4, seed=22),
        "qv": write_lora(root / "qv", base, ("q_proj", "v_proj"), r=4, lora_alpha=8, seed=23),
        "kvo": write_lora(root / "kvo", base, ("k_proj", "v_proj", "o_proj", "down_proj"), r=3, lora_alpha=6, seed=24),
    }
    for index in range(3):
        paths[f"big{index}"] = write_lora(root / f"big{index}", base, ("k_proj", "v_proj"), r=16, lora_alpha=16,
                                          seed=30 + index)
    # a copy of 'math' with one module's B all zero and another's B rank-deficient (2 of 4 columns zero)
    zeroed = root / "zeroed"
    zeroed.mkdir()
    source = demo / "adapters" / "math"
    (zeroed / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"].zero_()
    tensors[f"{PREFIX}model.layers.1.mlp.up_proj.lora_B.weight"][:, 2:] = 0.0
    save_file(tensors, str(zeroed / "adapter_model.safetensors"), metadata={"format": "pt"})
    paths["zeroed"] = zeroed
    return paths


@pytest.mark.parametrize("key", list(E2E))
def test_adapters_of_different_ranks_and_module_sets_with_negative_weights(demo: Path, zoo: dict[str, Path],
                                                                          tmp_path: Path, key: str) -> None:
    adapters = [(zoo["r2"], 0.8), (zoo["r8"], -0.6), (zoo["qv"], 1.2), (zoo["kvo"], -1.0)]
    out = tmp_path / "out"
    merge(config_for(demo / "base", adapters, out, key), device="cpu", progress=False, chunk_rows=5)
    merged = load_checkpoint(out)
    assert all(torch.isfinite(t).all() for t in merged.values())
    if key in E2E_REFERENCED:
        assert check_against_reference(key, demo / "base", adapters, out) == 14


def test_knots_linear_equals_linear_end_to_end_with_partial_module_sets(demo: Path, zoo: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    # an adapter that does not touch a tensor still counts in Σ wᵢ (SEMANTICS §3 linear), so knots(linear) too
    adapters = [(zoo["qv"], 0.7), (zoo["kvo"], 0.5), (zoo["r2"], 1.0)]
    entries = [{"path": str(p), "weight": w} for p, w in adapters]
    outs = {}
    for method, params in (("linear", {}), ("knots", {"base": "linear"})):
        out = tmp_path / method
        merge(MergeConfig.from_dict({"base_model": str(demo / "base"), "method": method, "parameters": params,
                                     "adapters": entries, "output": {"path": str(out)}}),
              device="cpu", progress=False)
        outs[method] = load_checkpoint(out)
    for name, tensor in outs["linear"].items():
        torch.testing.assert_close(outs["knots"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_knots_task_arithmetic_equals_task_arithmetic_end_to_end_with_partial_module_sets(
        demo: Path, zoo: dict[str, Path], tmp_path: Path) -> None:
    adapters = [(zoo["qv"], 0.7), (zoo["kvo"], -0.5), (zoo["r2"], 1.0)]
    entries = [{"path": str(p), "weight": w} for p, w in adapters]
    outs = {}
    for method, params in (("task_arithmetic", {"lambda": 0.8}), ("knots", {"base": "task_arithmetic", "lambda": 0.8})):
        out = tmp_path / method
        merge(MergeConfig.from_dict({"base_model": str(demo / "base"), "method": method, "parameters": params,
                                     "adapters": entries, "output": {"path": str(out)}}),
              device="cpu", progress=False)
        outs[method] = load_checkpoint(out)
    for name, tensor in outs["task_arithmetic"].items():
        torch.testing.assert_close(outs["knots"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("key", E2E)
def test_zero_and_rank_deficient_b_give_finite_output(demo: Path, zoo: dict[str, Path], tmp_path: Path,
                                                      key: str) -> None:
    adapters = [(demo / "adapters" / "style", 1.0), (zoo["zeroed"], 0.6), (demo / "adapters" / "facts", -0.4)]
    out = tmp_path / "out"
    merge(config_for(demo / "base", adapters, out, key), device="cpu", progress=False)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(out).values())
    if key in E2E_REFERENCED:
        assert check_against_reference(key, demo / "base", adapters, out) == 14


@pytest.mark.parametrize("key", list(E2E))
def test_r_larger_than_the_matrix_side(demo: Path, zoo: dict[str, Path], tmp_path: Path, key: str) -> None:
    # k_proj / v_proj are 32×64: three rank-16 adapters give R = 48 > 32
    adapters = [(zoo[f"big{i}"], w) for i, w in enumerate((1.0, 0.7, -0.5))]
    out = tmp_path / "out"
    merge(config_for(demo / "base", adapters, out, key), device="cpu", progress=False, chunk_rows=7)
    merged, base = load_checkpoint(out), load_checkpoint(demo / "base")
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert any(not torch.equal(merged[n], base[n]) for n in merged if "k_proj" in n)
    if key in E2E_REFERENCED:  # still well-posed for the dense problem (distinct singular values)
        assert check_against_reference(key, demo / "base", adapters, out) == 4


@pytest.mark.parametrize("key", list(E2E))
def test_one_adapter(demo: Path, tmp_path: Path, key: str) -> None:
    adapters = [(demo / "adapters" / "math", -1.3)]
    out = tmp_path / "out"
    merge(config_for(demo / "base", adapters, out, key), device="cpu", progress=False)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(out).values())
    if key in E2E_REFERENCED:
        assert check_against_reference(key, demo / "base", adapters, out) == 14


# --- DoRA (refused) and lora_bias (bias shifts averaged) ----------------------------------------------------------

SUBSPACE_KEYS = ["tsv_m", "iso_c", "iso_cts", "knots_ties", "core_ties", "core_dare_linear"]


def _dora_is_refused(base: Path, plain: Path, dora: Path, tmp_path: Path, key: str) -> None:
    with pytest.raises(MergeConfigError) as raised:
        merge(config_for(base, [(plain, 1.0), (dora, 1.0)], tmp_path / "out", key, names=["plain", "doraish"]),
              device="cpu", progress=False)
    message = str(raised.value)
    assert "doraish" in message or str(dora.name) in message, message
    assert re.search(r"model\.layers\.\d+\.\w+\.\w+\.weight", message), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", SUBSPACE_KEYS)
def test_dora_under_a_subspace_method_is_an_error_naming_tensor_and_adapter(demo: Path, tmp_path: Path,
                                                                             key: str) -> None:
    dora = write_lora(tmp_path / "dora_adapter", demo / "base", ALL_LINEAR, r=4, lora_alpha=8, seed=41, dora=True)
    _dora_is_refused(demo / "base", demo / "adapters" / "style", dora, tmp_path, key)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["tsv_m", "knots_ties", "core_ties"])
def test_dora_built_by_peft_under_a_subspace_method_is_an_error(demo: Path, tmp_path: Path, key: str) -> None:
    from evals.fixtures import build_adapter

    dora = build_adapter(demo / "base", tmp_path / "dora_adapter", "dora", seed=41)
    _dora_is_refused(demo / "base", demo / "adapters" / "style", dora, tmp_path, key)


def _bias_shifts_are_averaged(base: Path, bias_adapters: Sequence[Path], tmp_path: Path, key: str) -> None:
    adapters = [(bias_adapters[0], 1.0), (bias_adapters[1], -0.6)]
    out = tmp_path / "out"
    merge(config_for(base, adapters, out, key), device="cpu", progress=False)
    merged, base_tensors = load_checkpoint(out), load_checkpoint(base)
    shifts: dict[str, list[np.ndarray]] = {}
    for path, weight in adapters:
        config = json.loads((path / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        for k, b in load_file(path / "adapter_model.safetensors").items():
            if k.endswith(".lora_B.bias"):
                shifts.setdefault(k[len(PREFIX):-len(".lora_B.bias")] + ".bias", []).append(
                    weight * scale * b.double().numpy())
    assert len(shifts) == 8
    for name, us in shifts.items():
        assert len(us) == 2
        expected = base_tensors[name].double().numpy() + sum(us) / len(us)  # Σ uᵢ / T
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=name)
    if key in E2E_REFERENCED:
        assert check_against_reference(key, base, adapters, out) == 8


@pytest.fixture(scope="module")
def bias_setup(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The demo base with seeded q/k/v/o biases (attention_bias: true), and two lora_bias adapters on it."""
    root = tmp_path_factory.mktemp("subspace_bias")
    base = root / "base"
    shutil.copytree(demo / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["attention_bias"] = True
    (base / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    for name, weight in list(tensors.items()):
        if name.split(".")[-2] in ATTENTION:
            tensors[name[:-len(".weight")] + ".bias"] = 0.02 * torch.randn(weight.shape[0], generator=gen)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base, [write_lora(root / f"bias{i}", base, ATTENTION, r=4, lora_alpha=8, seed=50 + i, bias=True)
                  for i in range(2)]


@pytest.mark.parametrize("key", SUBSPACE_KEYS)
def test_lora_bias_shifts_are_averaged(bias_setup: tuple[Path, list[Path]], tmp_path: Path, key: str) -> None:
    _bias_shifts_are_averaged(*bias_setup, tmp_path, key)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["tsv_m", "iso_cts", "knots_ties", "core_ties"])
def test_lora_bias_built_by_peft_shifts_are_averaged(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                     key: str) -> None:
    from evals.fixtures import build_adapter, build_tiny_llama

    root = tmp_path_factory.mktemp("peft_bias")
    base = build_tiny_llama(root / "base", attention_bias=True)
    adapters = [build_adapter(base, root / f"bias{i}", "bias", seed=50 + i) for i in range(2)]
    _bias_shifts_are_averaged(base, adapters, tmp_path, key)
