"""NuSLERP, Multi-SLERP and the Karcher mean (#29) against dense float64 references transcribed from mergekit
0.1.5's definitions (merge_methods/nuslerp.py, multislerp.py, karcher.py), through files; chunk size and workers
change no byte (one Gram pass, then one writing pass: methods/_spherical.py)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from evals.full_models import build_noisy_model, save_weights
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.methods.multislerp import multislerp_coefficients

from .reference import load_checkpoint, sce_combine
from .reference import ref_sce as ref_sce_selected


# -- mergekit's definitions, whole tensors in float64 -------------------------------------------------------------
def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = True,
                eps: float = 1e-8) -> torch.Tensor:
    v0, v1 = v0.double(), v1.double()
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def ref_multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                   normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].double()
    stacked = torch.stack([t.double() for t in tensors])
    if base is not None:
        stacked = stacked - base.double()
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base.double() if base is not None else result


def ref_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    tensors = [t.double() for t in tensors]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = sum(x * u for x, u in zip(a, us))
    mean = us[0].clone() if torch.linalg.vector_norm(mean).item() < tol else mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for x, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += x * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    return sum(x * n for x, n in zip(alphas, norms)) * mean


# -- through files --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spherical")
    return {name: build_noisy_model(demo / "base", root / name, seed=seed, relative=0.5)
            for name, seed in (("a", 21), ("b", 22), ("c", 23))}


def _merge(demo: Path, out: Path, method: str, entries: list[tuple[Path, object]], params: dict | None = None,
           **kw: object) -> dict[str, torch.Tensor]:
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": method, "parameters": params or {},
                                    "models": [{"path": str(p), "weight": w} for p, w in entries],
                                    "output": {"path": str(out)}})
    return load_checkpoint(merge(config, device="cpu", progress=False, **kw).output_dir)


def _close(merged: dict[str, torch.Tensor], expected_of: object, base: dict[str, torch.Tensor]) -> None:
    for name in base:
        expected = expected_of(name)  # type: ignore[operator]
        scale = float(expected.abs().max())
        assert torch.allclose(merged[name].double(), expected, atol=3e-6 * scale, rtol=0), name


def _load(models: dict[str, Path], demo: Path) -> tuple[dict[str, torch.Tensor], ...]:
    return (load_checkpoint(demo / "base"), *(load_checkpoint(models[n]) for n in ("a", "b", "c")))


@pytest.mark.parametrize("flatten,row_wise,dim", [(True, False, -1), (False, False, -1), (False, True, 0)])
def test_nuslerp_of_two_task_vectors_is_mergekits(demo: Path, models: dict[str, Path], tmp_path: Path,
                                                  flatten: bool, row_wise: bool, dim: int) -> None:
    merged = _merge(demo, tmp_path / "out", "nuslerp", [(models["a"], 0.6), (models["b"], 0.4)],
                    {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, chunk_rows=3)
    base, a, b, _ = _load(models, demo)
    _close(merged, lambda n: base[n].double() + ref_nuslerp(0.4, a[n].double() - base[n].double(),
                                                           b[n].double() - base[n].double(), dim, flatten), base)


def test_nuslerp_with_weights_1_minus_t_and_t_and_no_base_is_our_slerp(demo: Path, models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """mergekit's nuslerp of two models (no base_model) at weights (0.7, 0.3) = slerp from the first at t = 0.3:
    the same bytes wherever SLERP does not fall back to a straight line (|cos θ| > 0.9995: the norm weights, where
    NuSLERP keeps the arc and SLERP takes the chord, 1e-3 apart here)."""
    ours = _merge(demo, tmp_path / "n", "nuslerp", [(models["a"], 0.3)], {"base_weight": 0.7})
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "slerp", "parameters": {"t": 0.3},
                                    "models": [{"path": str(models["a"])}], "output": {"path": str(tmp_path / "s")}})
    slerp = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base, a, _, _ = _load(models, demo)
    arcs = 0
    for name, w in base.items():
        x, y = w.double().flatten(), a[name].double().flatten()
        if abs(float(x @ y / x.norm() / y.norm())) <= 0.9995:
            assert torch.equal(ours[name], slerp[name]), name
            arcs += 1
        else:
            assert torch.allclose(ours[name], slerp[name], atol=1e-3 * float(w.abs().max()), rtol=0), name
            assert not torch.equal(ours[name], slerp[name]), name
    assert arcs >= 10
    _close(ours, lambda n: ref_nuslerp(0.3, base[n], a[n]), base)


def test_multislerp_of_task_vectors_and_of_models_is_mergekits(demo: Path, models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    three = [(models["a"], 0.5), (models["b"], 0.3), (models["c"], 0.2)]
    base, a, b, c = _load(models, demo)
    merged = _merge(demo, tmp_path / "tv", "multislerp", three, chunk_rows=2)
    _close(merged, lambda n: ref_multislerp([a[n], b[n], c[n]], [0.5, 0.3, 0.2], base[n]), base)
    merged = _merge(demo, tmp_path / "m", "multislerp", three[:2], {"base_weight": 0.4, "normalize_weights": False})
    _close(merged, lambda n: ref_multislerp([base[n], a[n], b[n]], [0.4, 0.5, 0.3], None, normalize=False), base)


def test_multislerp_of_two_points_is_slerp_only_at_equal_weights_and_norms() -> None:
    """mergekit's tangent average at the weighted mean of the units is zero by construction (that mean is their
    chord average), so Multi-SLERP is the normalised weighted mean of the units times the mean norm: SLERP of two
    points at equal weights and equal norms, a normalised LERP otherwise."""
    x0 = torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    x1 = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64)
    gram = torch.stack([x0, x1]) @ torch.stack([x0, x1]).T
    c = multislerp_coefficients(gram, [0.5, 0.5], True, 1e-8)
    theta = math.pi / 2
    slerp = (math.sin(theta / 2) * x0 + math.sin(theta / 2) * x1) / math.sin(theta)
    assert torch.allclose(c[0] * x0 + c[1] * x1, slerp, atol=1e-12)
    c = multislerp_coefficients(gram, [0.8, 0.2], True, 1e-8)
    nlerp = 0.8 * x0 / 5 + 0.2 * x1 / 5
    assert torch.allclose(c[0] * x0 + c[1] * x1, nlerp / nlerp.norm() * 5, atol=1e-12)
    assert not torch.allclose(c[0] * x0 + c[1] * x1, (math.sin(0.8 * theta) * x0 + math.sin(0.2 * theta) * x1),
                              atol=1e-3)


def test_karcher_is_the_riemannian_mean_of_the_base_and_the_models(demo: Path, models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    base, a, b, c = _load(models, demo)
    merged = _merge(demo, tmp_path / "k", "karcher", [(models["a"], 1.0), (models["b"], 1.0)], chunk_rows=4)
    _close(merged, lambda n: ref_karcher([base[n], a[n], b[n]]), base)
    merged = _merge(demo, tmp_path / "k1", "karcher", [(models["c"], 1.0)], {"max_iter": 1, "tol": 1e-3})
    _close(merged, lambda n: ref_karcher([base[n], c[n]], max_iter=1, tol=1e-3), base)


def test_karcher_of_a_zero_point_and_antipodal_points() -> None:
    from mergekit_lite.methods.karcher import karcher_coefficients

    x = torch.stack([torch.tensor([1.0, 2.0, 2.0]), torch.zeros(3), torch.tensor([2.0, -1.0, 0.5])]).double()
    c = karcher_coefficients(x @ x.T, [1 / 3] * 3, 10, 1e-5)
    assert torch.allclose(sum(ci * xi for ci, xi in zip(c, x)), ref_karcher(list(x)), atol=1e-12)
    y = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])]).double()
    c = karcher_coefficients(y @ y.T, [0.5, 0.5], 10, 1e-5)
    assert torch.allclose(sum(ci * yi for ci, yi in zip(c, y)), ref_karcher(list(y)), atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("method,params,weights", [
    ("nuslerp", {}, [0.6, 0.4]), ("nuslerp", {"nuslerp_flatten": False}, [0.6, 0.4]),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [0.6, 0.4]),
    ("multislerp", {}, [0.5, 0.3, 0.2]), ("multislerp", {"base_weight": 1.0}, [1.0, 2.0]),
    ("karcher", {"max_iter": 20}, [1.0, 1.0, 1.0]),
])
def test_chunk_size_and_workers_change_no_byte(demo: Path, models: dict[str, Path], tmp_path: Path, method: str,
                                               params: dict, weights: list[float]) -> None:
    entries = list(zip([models["a"], models["b"], models["c"]], weights))
    first = _merge(demo, tmp_path / "1", method, entries, params, chunk_rows=1, workers=1)
    for index, options in enumerate(({"chunk_rows": 7, "workers": 2}, {})):
        other = _merge(demo, tmp_path / f"o{index}", method, entries, params, **options)
        assert all(torch.equal(first[k], other[k]) for k in first), (method, options)


def test_per_layer_weights_reach_nuslerp_and_multislerp(demo: Path, models: dict[str, Path], tmp_path: Path) -> None:
    """Weights are read by the method itself (t = w₂/(w₁+w₂), barycentric ŵ), per tensor, filters included."""
    base, a, b, _ = _load(models, demo)
    weight = [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    merged = _merge(demo, tmp_path / "n", "nuslerp", [(models["a"], 0.5), (models["b"], weight)])
    _close(merged, lambda n: base[n].double() + ref_nuslerp(0.9 / 1.4 if "mlp" in n else 0.5,
                                                           a[n].double() - base[n].double(),
                                                           b[n].double() - base[n].double()), base)
    merged = _merge(demo, tmp_path / "m", "multislerp", [(models["a"], 0.5), (models["b"], weight)])
    _close(merged, lambda n: ref_multislerp([a[n], b[n]], [0.5, 0.9 if "mlp" in n else 0.5], base[n]), base)


@pytest.mark.parametrize("method,params,count,message", [
    ("nuslerp", {}, 1, r"nuslerp with one input .*set parameters.base_weight"),
    ("nuslerp", {"base_weight": 0.5}, 2, r"base_weight is for one input"),
    ("nuslerp", {}, 3, r"'nuslerp' merges 1 to 2 inputs"),
    ("multislerp", {"base_weight": -1.0}, 1, r"weights sum to 0"),
    ("karcher", {"max_iter": 2.5}, 1, r"'max_iter' must be a whole number"),
    ("karcher", {"tol": 0}, 1, r"'tol' must be in"),
])
def test_bad_parameters_are_refused(demo: Path, method: str, params: dict, count: int, message: str) -> None:
    with pytest.raises(MergeConfigError, match=message):
        MergeConfig.from_dict({"base_model": "b", "method": method, "parameters": params,
                               "models": [{"path": f"m{i}"} for i in range(count)], "output": "o"})


def test_models_that_do_not_move_a_tensor_keep_it(demo: Path, tmp_path: Path) -> None:
    """Every input equal to the base: each method gives the base back (no division by a zero norm leaks)."""
    base = load_checkpoint(demo / "base")
    same = tmp_path / "same"
    save_weights(base, same)
    for name in ("config.json", "tokenizer.json"):
        (same / name).write_bytes((demo / "base" / name).read_bytes())
    other = tmp_path / "other"
    shutil.copytree(same, other)
    for method in ("nuslerp", "multislerp", "karcher"):
        merged = _merge(demo, tmp_path / method, method, [(same, 0.5), (other, 0.5)])
        for name, w in base.items():
            assert torch.allclose(merged[name], w, atol=1e-6 * float(w.abs().max()), rtol=0), (method, name)


def test_lora_adapters_as_points(demo: Path, tmp_path: Path) -> None:
    """Adapters give their τᵢ = sBA (zero where they do not touch a tensor, which then keeps the base for the task
    vector methods)."""
    from .reference import plain_lora_task_vectors

    adapters = [demo / "adapters" / "style", demo / "adapters" / "math"]
    base = load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(a) for a in adapters]
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": "multislerp",
                                    "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, (0.6, 0.4))],
                                    "output": {"path": str(tmp_path / "out")}})
    merged = load_checkpoint(merge(config, device="cpu", progress=False, chunk_rows=3).output_dir)
    for name, w in base.items():
        if name not in taus[0] and name not in taus[1]:
            assert torch.equal(merged[name], w), name
            continue
        t0, t1 = (tau.get(name, torch.zeros_like(w, dtype=torch.float64)) for tau in taus)
        expected = ref_multislerp([w.double() + t0, w.double() + t1], [0.6, 0.4], w)
        assert torch.allclose(merged[name].double(), expected, atol=3e-6 * float(expected.abs().max()), rtol=0), name


# -- sce (mergekit's, select_topk 1): a statistics pass (mean squares), then entry by entry ----------------------
def ref_sce(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """mergekit 0.1.5's sce_merge with select_topk 1, in float64."""
    taus = torch.stack([t.double() - base.double() for t in tensors])
    return sce_combine(base, taus)


def test_sce_is_mergekits_without_selection(demo: Path, models: dict[str, Path], tmp_path: Path) -> None:
    base, a, b, c = _load(models, demo)
    entries = [(models["a"], 1.0), (models["b"], 1.0), (models["c"], 1.0)]
    merged = _merge(demo, tmp_path / "s", "sce", entries, chunk_rows=3)
    _close(merged, lambda n: ref_sce(base[n], [a[n], b[n], c[n]]), base)
    other = _merge(demo, tmp_path / "s2", "sce", entries, chunk_rows=1, workers=2)
    assert all(torch.equal(merged[k], other[k]) for k in merged)


def test_sce_variance_selection_on_noisy_fine_tunes(demo: Path, models: dict[str, Path], tmp_path: Path) -> None:
    """select_topk 0.5 on untied variances (the tie rule: tests/test_sce.py) is the dense float64 reference."""
    base, a, b, c = _load(models, demo)
    entries = [(models["a"], 1.0), (models["b"], 1.0), (models["c"], 1.0)]
    merged = _merge(demo, tmp_path / "s", "sce", entries, {"select_topk": 0.5}, chunk_rows=5)
    _close(merged, lambda n: ref_sce_selected(base[n], [a[n], b[n], c[n]], 0.5), base)
