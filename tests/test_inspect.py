"""`merge inspect`'s numbers against dense float64 references on hand-made adapters: geometry, conflicts, invariances."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergekit_lite.errors import MergeConfigError
from mergekit_lite.inspection.analyse import Inspection, InspectOptions, analyse, layer_of
from mergekit_lite.inspection.conflicts import ConflictCounts, count_chunk
from mergekit_lite.inspection.inputs import inspect_config_from_dict, open_inputs
from mergekit_lite.inspection.streamed import sample_ranges

from .inspect_fixtures import (
    SHAPES,
    dense_conflicts,
    dense_effective_rank,
    dense_overlap,
    dense_tau,
    dense_tau32,
    random_factors,
    write_adapter,
    write_base,
)

Q0, D0, Q1, HEAD = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head"


def run(root: Path, adapters: list[Path], weights: list[float] | None = None, method: dict | None = None,
        **options: object) -> Inspection:
    """Inspect base `root/base` with `adapters` (a config without a method unless `method` is given)."""
    data: dict = {"base_model": str(root / "base"),
                  "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, weights or [1.0] * len(adapters))]}
    data.update(method or {})
    loaded = inspect_config_from_dict(data, root)
    with open_inputs(loaded.config) as inputs:
        return analyse(loaded.config, loaded.method_given, inputs, InspectOptions(**options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    """A base and three adapters: plain (alpha 8, r 2), rsLoRA (r 3) and rank/alpha patterns; their dense τ."""
    root = tmp_path_factory.mktemp("inspect_three")
    write_base(root / "base")
    f0 = random_factors(1, {Q0: 2, D0: 2, Q1: 2})
    f1 = random_factors(2, {Q0: 3, D0: 3, HEAD: 3})
    f2 = random_factors(3, {Q0: 1, D0: 2, Q1: 1})
    paths = [
        write_adapter(root / "plain", f0, alpha=8),
        write_adapter(root / "rslora", f1, alpha=6, use_rslora=True),
        write_adapter(root / "pattern", f2, alpha=4, rank_pattern={"q_proj": 1}, alpha_pattern={"down_proj": 10}, r=2),
    ]
    scales = [{m: 8 / 2 for m in f0}, {m: 6 / math.sqrt(3) for m in f1}, {Q0: 4 / 1, Q1: 4 / 1, D0: 10 / 2}]
    taus = [{m: dense_tau(a, b, s[m]) for m, (a, b) in f.items()} for f, s in zip((f0, f1, f2), scales)]
    factors = [{m: (a, b, s[m]) for m, (a, b) in f.items()} for f, s in zip((f0, f1, f2), scales)]
    return root, paths, {"taus": taus, "factors": factors}


def test_geometry_equals_dense_float64_reference(three: tuple[Path, list[Path], dict]) -> None:
    root, paths, dense = three
    taus = dense["taus"]
    weights = [1.0, -0.5, 2.0]
    result = run(root, paths, weights)
    from safetensors.torch import load_file

    base = {k: v.double() for k, v in load_file(str(root / "base" / "model.safetensors")).items()}
    by_name = {t.name: t for t in result.tensors}
    assert set(by_name) == {f"{m}.weight" for m in (Q0, D0, Q1, HEAD)}
    for module in (Q0, D0, Q1, HEAD):
        t = by_name[f"{module}.weight"]
        assert t.base_norm == pytest.approx(float(base[f"{module}.weight"].norm()), rel=1e-12)
        present = [i for i in range(3) if module in taus[i]]
        assert t.adapters == present
        for a, i in enumerate(present):
            x = taus[i][module]
            assert t.norm(i) == pytest.approx(float(x.norm()), rel=1e-9)
            assert t.geometry.effective_ranks[a] == pytest.approx(dense_effective_rank(x), rel=1e-9)
            assert t.geometry.ranks[a] == int(torch.linalg.matrix_rank(x))
            for b, j in enumerate(present):
                y = taus[j][module]
                cos = float((x * y).sum() / (x.norm() * y.norm()))
                assert t.geometry.cosine(a, b) == pytest.approx(cos, abs=1e-12)
                assert t.geometry.column_overlap[a][b] == pytest.approx(dense_overlap(x, y), abs=1e-9)
                assert t.geometry.row_overlap[a][b] == pytest.approx(dense_overlap(x.T, y.T), abs=1e-9)
        summed = sum(weights[i] * taus[i][module] for i in present)
        expected = torch.linalg.svdvals(summed)
        expected = expected[expected > expected[0] * max(summed.shape) * 2.0**-52]
        assert t.geometry.sum_spectrum == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
    for i in range(3):
        total = sum(float((x**2).sum()) for x in taus[i].values())
        assert result.square_norm(i) == pytest.approx(total, rel=1e-9)
        base_total = sum(float((base[f"{m}.weight"] ** 2).sum()) for m in taus[i])
        assert result.relative_norm(i) == pytest.approx(math.sqrt(total / base_total), rel=1e-9)
        layer0 = [m for m in taus[i] if ".layers.0." in m]
        assert result.relative_norm(i, 0) == pytest.approx(math.sqrt(
            sum(float((taus[i][m] ** 2).sum()) for m in layer0) / sum(float((base[f"{m}.weight"] ** 2).sum()) for m in layer0)),
            rel=1e-9)
        for j in range(3):
            shared = [m for m in taus[i] if m in taus[j]]
            inner = sum(float((taus[i][m] * taus[j][m]).sum()) for m in shared)
            norm_j = sum(float((x**2).sum()) for x in taus[j].values())
            assert result.cosine(i, j) == pytest.approx(inner / math.sqrt(total * norm_j), abs=1e-12)
            overlaps = [dense_overlap(taus[i][m], taus[j][m]) for m in shared]
            assert result.overlap(i, j, "column") == pytest.approx(sum(overlaps) / len(overlaps), abs=1e-9)


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_conflict_counts_equal_dense_reference(three: tuple[Path, list[Path], dict], density: float) -> None:
    root, paths, dense = three
    weights = [1.0, -0.5, 2.0]
    result = run(root, paths, weights, density=density)
    for t in result.tensors:
        active = t.conflict_adapters
        if len(active) < 2:
            assert t.conflicts is None
            continue
        module = t.name.removesuffix(".weight")
        taus = [dense_tau32(*dense["factors"][i][module]) for i in active]
        expected = dense_conflicts(taus, [weights[i] for i in active], [density] * len(active))
        got = t.conflicts
        assert (got.overlapping, got.conflicting, got.kept, got.dropped) == (
            expected["overlapping"], expected["conflicting"], expected["kept"], expected["dropped"])
        for (a, b), (both, opposite) in expected["pairs"].items():
            assert (got.pair_both[a][b], got.pair_opposite[a][b]) == (both, opposite)
        assert got.entries == t.numel


def integer_factors(seed: int, rank: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with entries in {-1, 0, 1}: τ is small integers, full of equal magnitudes (exact in float32)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-1, 2, (rank, cols), generator=generator).float(),
            torch.randint(-1, 2, (rows, rank), generator=generator).float())


@pytest.mark.parametrize("max_memory", [1 << 30, 1])  # whole tensors, and one row per chunk
def test_ties_at_the_threshold_keep_the_lower_flat_index_like_ties(tmp_path: Path, max_memory: int) -> None:
    shapes = {"model.layers.0.mlp.up_proj.weight": (16, 12)}
    write_base(tmp_path / "base", shapes)
    module = "model.layers.0.mlp.up_proj"
    factors = [integer_factors(seed, 3, 16, 12) for seed in (5, 6, 7)]
    paths = [write_adapter(tmp_path / f"a{i}", {module: f}, alpha=3) for i, f in enumerate(factors)]
    weights = [1.0, 1.0, -1.0]
    taus = [dense_tau32(a, b, 1.0) for a, b in factors]
    for density in (0.3, 0.45, 0.61):
        kth = [torch.sort(t.abs().reshape(-1), descending=True).values[math.floor(density * t.numel()) - 1] for t in taus]
        assert any(int((t.abs() == k).sum()) > 1 for t, k in zip(taus, kth)), "the fixture must split ties"
        got = run(tmp_path, paths, weights, density=density, max_memory=max_memory).tensors[0].conflicts
        expected = dense_conflicts(taus, weights, [density] * 3)
        assert (got.overlapping, got.conflicting, got.kept, got.dropped) == (
            expected["overlapping"], expected["conflicting"], expected["kept"], expected["dropped"])
        assert got.pair_both[0][2] == expected["pairs"][(0, 2)][0]
        assert got.pair_opposite[1][2] == expected["pairs"][(1, 2)][1]


def test_rotating_an_adapters_factors_changes_no_geometry(three: tuple[Path, list[Path], dict], tmp_path: Path) -> None:
    root, paths, dense = three
    write_base(tmp_path / "base")
    generator = torch.Generator().manual_seed(11)
    rotated = {}
    for module, (a, b, _) in dense["factors"][0].items():
        g = torch.randn(a.shape[0], a.shape[0], generator=generator, dtype=torch.float64) + 3 * torch.eye(a.shape[0])
        rotated[module] = ((torch.linalg.inv(g) @ a.double()).float(), (b.double() @ g).float())
    moved = write_adapter(tmp_path / "plain_rotated", rotated, alpha=8)
    write_adapter(tmp_path / "rslora", random_factors(2, {Q0: 3, D0: 3, HEAD: 3}), alpha=6, use_rslora=True)
    original = run(root, paths[:2])
    turned = run(tmp_path, [moved, tmp_path / "rslora"])
    assert turned.cosine(0, 1) == pytest.approx(original.cosine(0, 1), abs=1e-6)
    for before, after in zip(original.tensors, turned.tensors):
        assert after.base_norm == pytest.approx(before.base_norm)
        assert after.inner.reshape(-1).tolist() == pytest.approx(before.inner.reshape(-1).tolist(), rel=1e-5, abs=1e-6)
        g0, g1 = before.geometry, after.geometry
        for space in ("column_overlap", "row_overlap"):
            flat0 = [v for row in getattr(g0, space) for v in row]
            assert [v for row in getattr(g1, space) for v in row] == pytest.approx(flat0, abs=1e-6)
        assert g1.effective_ranks == pytest.approx(g0.effective_ranks, rel=1e-5)
        assert g1.sum_spectrum == pytest.approx(g0.sum_spectrum, rel=1e-5)


def test_identical_adapters_have_cosine_1_overlap_1_and_no_conflict(tmp_path: Path) -> None:
    write_base(tmp_path / "base")
    factors = random_factors(4, {Q0: 2, D0: 2})
    paths = [write_adapter(tmp_path / name, factors) for name in ("one", "same")]
    result = run(tmp_path, paths)
    assert result.cosine(0, 1) == pytest.approx(1.0, abs=1e-12)
    assert result.overlap(0, 1, "column") == pytest.approx(1.0, abs=1e-9)
    assert result.overlap(0, 1, "row") == pytest.approx(1.0, abs=1e-9)
    counts = result.conflicts()
    assert counts.rate == 0.0 and counts.pair_rate(0, 1) == 0.0 and counts.dropped == 0
    assert counts.overlapping == sum(math.floor(0.5 * t.numel) for t in result.tensors)


def test_an_adapter_and_its_negation_have_cosine_minus_1_and_conflict_rate_1(tmp_path: Path) -> None:
    write_base(tmp_path / "base")
    factors = random_factors(4, {Q0: 2, D0: 2, HEAD: 2})
    negated = {m: (a, -b) for m, (a, b) in factors.items()}
    paths = [write_adapter(tmp_path / "plus", factors), write_adapter(tmp_path / "minus", negated)]
    result = run(tmp_path, paths)
    assert result.cosine(0, 1) == pytest.approx(-1.0, abs=1e-12)
    assert result.overlap(0, 1, "column") == pytest.approx(1.0, abs=1e-9)
    counts = result.conflicts()
    assert counts.rate == 1.0 and counts.pair_rate(0, 1) == 1.0
    assert counts.overlapping > 0


def test_a_zero_weight_adapter_takes_no_part_in_conflicts(three: tuple[Path, list[Path], dict]) -> None:
    root, paths, _ = three
    result = run(root, paths, [1.0, 0.0, 1.0])
    assert all(1 not in t.conflict_adapters for t in result.tensors)
    assert result.conflicts().pair_both[0][1] == 0


def test_count_chunk_by_hand() -> None:
    counts = ConflictCounts(3)
    count_chunk([torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([-3.0, 1.0, 0.0, 0.0]),
                 torch.tensor([0.0, 0.0, 5.0, 1.0])], counts)
    # position 0: +1, -3 -> conflict (vote -2: the +1 is dropped); 1: +2, +1 agree; 2: alone; 3: -1, +1 conflict
    # (vote 0 elects +, the -1 is dropped)
    assert (counts.overlapping, counts.conflicting, counts.kept, counts.dropped) == (3, 2, 7, 2)
    assert counts.pair_both[0][1] == 2 and counts.pair_opposite[0][1] == 1 and counts.pair_rate(0, 2) == 1.0


def test_the_config_method_density_is_the_default_and_a_density_keeping_nothing_is_an_error(
        three: tuple[Path, list[Path], dict]) -> None:
    root, paths, _ = three
    result = run(root, paths, method={"method": "ties", "parameters": {"density": 0.2}})
    assert result.densities == [0.2, 0.2, 0.2] and result.method_given
    assert run(root, paths).densities == [0.5, 0.5, 0.5]
    with pytest.raises(MergeConfigError, match=r"tensor .*down_proj.weight.*density 0.01 keeps 0 of its 28 entries"):
        run(root, paths, density=0.01)
    with pytest.raises(MergeConfigError, match="--density"):
        run(root, paths, density=1.5)


def test_sampling_bounds_the_counted_entries_and_says_so(three: tuple[Path, list[Path], dict]) -> None:
    root, paths, _ = three
    exact = run(root, paths)
    assert not exact.sampled
    sampled = run(root, paths, sample=10)
    assert sampled.sampled
    for t in sampled.tensors:
        if t.conflicts is not None:
            assert t.conflicts.entries <= max(10, t.shape[1])
    # geometry never samples
    assert sampled.cosine(0, 2) == exact.cosine(0, 2)


def test_sample_ranges_are_spread_and_disjoint() -> None:
    ranges = sample_ranges(1000, 10, 500, 7)
    rows = [r for a, b in ranges for r in range(a, b)]
    assert len(rows) == len(set(rows)) == 48 and rows == sorted(rows)
    assert rows[0] == 0 and rows[-1] == 999
    assert sample_ranges(5, 10, 1000, 2) == [(0, 2), (2, 4), (4, 5)]


def test_layer_of_reads_the_usual_layer_names() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("lm_head.weight") is None and layer_of("model.embed_tokens.weight") is None


def test_conv1d_layout_is_transposed_before_comparing(tmp_path: Path) -> None:
    shapes = {"transformer.h.0.attn.c_attn.weight": (5, 9)}  # GPT-2 Conv1D: stored in×out
    write_base(tmp_path / "base", shapes, model_type="gpt2")
    module = "transformer.h.0.attn.c_attn"
    generator = torch.Generator().manual_seed(8)
    fs = [(torch.randn(2, 5, generator=generator), torch.randn(9, 2, generator=generator)) for _ in range(2)]
    paths = [write_adapter(tmp_path / f"c{i}", {module: f}, alpha=4) for i, f in enumerate(fs)]
    result = run(tmp_path, paths)
    x, y = (dense_tau(a, b, 2.0, transposed=True) for a, b in fs)
    t = result.tensors[0]
    assert t.geometry.column_overlap[0][1] == pytest.approx(dense_overlap(x, y), abs=1e-9)
    assert t.geometry.row_overlap[0][1] == pytest.approx(dense_overlap(x.T, y.T), abs=1e-9)
    assert result.cosine(0, 1) == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())), abs=1e-12)


def test_shapes_fixture_is_what_the_tests_assume() -> None:
    assert SHAPES[f"{Q0}.weight"] == (6, 5)


@pytest.mark.parametrize("adapters", [2, 3, 4, 5])  # 4: the most the byte codes hold
def test_the_sign_pattern_histogram_counts_what_the_boolean_passes_count(adapters: int) -> None:
    from mergekit_lite.inspection.conflicts import count_chunk_directly

    generator = torch.Generator().manual_seed(adapters)
    updates = [torch.randn(500, generator=generator) * (torch.rand(500, generator=generator) > 0.4)
               for _ in range(adapters)]
    updates[0][:7] = 0.0
    updates[1][:7] = 0.0  # positions nobody keeps, and a vote of exactly 0
    fast, slow = ConflictCounts(adapters), ConflictCounts(adapters)
    count_chunk(updates, fast)
    count_chunk_directly(updates, slow)
    assert vars(fast) == vars(slow)


def test_counts_and_norms_do_not_depend_on_workers_cache_or_chunks(three: tuple[Path, list[Path], dict]) -> None:
    root, paths, _ = three
    weights = [1.0, -0.5, 2.0]
    # default: τ cached, chunks side by side; one worker; no cache (τ rebuilt per pass), one row per chunk
    runs = [run(root, paths, weights, density=0.4, **options)  # type: ignore[arg-type]
            for options in ({}, {"workers": 1}, {"max_memory": 1}, {"max_memory": 1, "workers": 3})]
    first = runs[0]
    for other in runs[1:]:
        for a, b in zip(first.tensors, other.tensors):
            assert a.base_norm == pytest.approx(b.base_norm, rel=1e-12)
            assert torch.equal(a.inner, b.inner)
            assert (a.conflicts is None) == (b.conflicts is None)
            if a.conflicts is not None:
                assert vars(a.conflicts) == vars(b.conflicts)


def test_a_full_model_entry_gets_streamed_dense_norms_and_cosines(demo: Path, tmp_path: Path) -> None:
    """A `models:` entry (τ = W_model − W) is inspected like a saved full tensor: kind dense, norms and cosines
    equal to float64 dense differences, conflicts counted, no spans."""
    from safetensors.torch import load_file

    from evals.full_models import build_noisy_model

    from .reference import plain_lora_task_vectors

    model = build_noisy_model(demo / "base", tmp_path / "noisy", seed=3)
    data = {"base_model": str(demo / "base"), "adapters": [{"path": str(demo / "adapters" / "style")}],
            "models": [{"path": str(model), "weight": 0.5}]}
    loaded = inspect_config_from_dict(data, tmp_path)
    with open_inputs(loaded.config) as inputs:
        result = analyse(loaded.config, loaded.method_given, inputs, InspectOptions(max_memory=1 << 20))
    base = {k: v.double() for k, v in load_file(str(demo / "base" / "model.safetensors")).items()}
    tuned = {k: v.double() for k, v in load_file(str(model / "model.safetensors")).items()}
    assert result.labels[1] == loaded.config.models[0].label and result.weights == [1.0, 0.5]
    adapter_taus = plain_lora_task_vectors(demo / "adapters" / "style")
    by_name = {t.name: t for t in result.tensors}
    changed = [name for name in base if base[name].is_floating_point() and not torch.equal(tuned[name], base[name])]
    assert changed and set(changed) <= set(by_name)
    both = 0
    for name in changed:
        t = by_name[name]
        tau = tuned[name] - base[name]
        assert t.kind == "dense" and t.geometry is None
        assert t.norm(1) == pytest.approx(float(tau.norm()), rel=1e-9)
        assert t.base_norm == pytest.approx(float(base[name].norm()), rel=1e-12)
        if 0 in t.adapters:  # changed by the adapter too: the cosine of the dense differences
            both += 1
            style = adapter_taus[name]
            assert t.norm(0) == pytest.approx(float(style.norm()), rel=1e-6)
            expected = float((style * tau).sum() / (style.norm() * tau.norm()))
            assert float(t.inner[0, 1]) / (t.norm(0) * t.norm(1)) == pytest.approx(expected, abs=1e-6)
            assert t.conflicts is not None and t.conflicts.entries == t.numel
    assert both > 0
    full_square = sum(float(((tuned[n] - base[n]) ** 2).sum()) for n in changed)
    assert result.square_norm(1) == pytest.approx(full_square, rel=1e-9)
