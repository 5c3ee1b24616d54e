"""τ built per tile (#27): the band, sample and consensus kernels computing a low-rank τ from its factors give what
the same kernels give on the materialised τ, bit for bit, and a merge through them is the same bytes as one without."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_lite import merge
from mergekit_lite.engine import kernels
from mergekit_lite.engine.schedule import EngineOptions, schedule_tensor
from mergekit_lite.methods import get_method

from .configs import demo_config

built = pytest.mark.skipif(not kernels.per_tile_built(), reason="the fused kernels were not built (no C compiler)")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                       b.contiguous().view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32))


def factors_of(rows: int, cols: int, ranks: tuple[int, ...], seed: int, integer: bool = False
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row factors (left, right); `integer` makes τ tie-heavy (small integer products: many equal magnitudes)."""
    generator = torch.Generator().manual_seed(seed)
    if integer:
        return [(torch.randint(-2, 3, (rows, r), generator=generator).float(),
                 torch.randint(-2, 3, (r, cols), generator=generator).float()) for r in ranks]
    return [(torch.randn(rows, r, generator=generator), torch.randn(r, cols, generator=generator)) for r in ranks]


def materialised(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [kernels.lowrank(left, right, torch.empty(left.shape[0], right.shape[1])) for left, right in factors]


SHAPES = [(1, 1, (1,)), (5, 37, (1, 3, 5)), (6, 16, (16, 16)), (7, 300, (8, 2, 16)), (13, 529, (4,)),
          (95, 1100, (16, 16, 16))]


@built
@pytest.mark.parametrize(("rows", "cols", "ranks"), SHAPES)
@pytest.mark.parametrize("kind", [kernels.SUM, kernels.TIES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_per_tile_consensus_is_the_consensus_of_the_materialised_taus(rows: int, cols: int, ranks: tuple[int, ...],
                                                                      kind: int, out_dtype: torch.dtype) -> None:
    factors = factors_of(rows, cols, ranks, seed=rows * cols)
    taus = materialised(factors)
    count = len(factors)
    below = [0.5, -1.0, 2.0][:count]
    scale = [0.3, -1.2, 0.7][:count]
    weights = [0.3, 1.2, 0.7][:count]
    for base_dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(rows, cols).to(base_dtype)
        for sign_count, normalize in ((False, True), (True, False)):
            reference = torch.empty(rows, cols, dtype=out_dtype)
            tiled = torch.empty(rows, cols, dtype=out_dtype)
            expected = kernels.consensus_into(kind, base, [t.clone() for t in taus], below, scale, weights,
                                              out=reference, sign_count=sign_count, normalize=normalize, lam=0.9)
            got = kernels.lowrank_consensus_into(kind, base, factors, below, scale, weights, out=tiled,
                                                 sign_count=sign_count, normalize=normalize, lam=0.9)
            assert got == expected
            assert same_bytes(tiled, reference)


@built
def test_per_tile_consensus_counts_outputs_that_overflow() -> None:
    left, right = torch.full((3, 2), 1e20), torch.full((2, 40), 1e20)
    base = torch.zeros(3, 40, dtype=torch.bfloat16)
    out = torch.empty_like(base)
    assert kernels.lowrank_consensus_into(kernels.SUM, base, [(left, right)], [-1.0], [1.0], [1.0], out=out) == 120


@built
@pytest.mark.parametrize(("rows", "cols", "ranks"), SHAPES)
@pytest.mark.parametrize("integer", [False, True])
def test_per_tile_band_count_and_sample_match_the_materialised_tau(rows: int, cols: int, ranks: tuple[int, ...],
                                                                  integer: bool) -> None:
    for factors, tau in zip(factors_of(rows, cols, ranks, seed=7, integer=integer),
                            materialised(factors_of(rows, cols, ranks, seed=7, integer=integer))):
        magnitudes = tau.abs().reshape(-1).numpy()
        for high_q, low_q in ((0.9, 0.7), (0.5, 0.5), (1.0, 0.0)):
            high, low = float(np.quantile(magnitudes, high_q)), float(np.quantile(magnitudes, low_q))
            above, band = kernels.band(tau, high, low, 1 << 22)
            tiled_above, tiled_band = kernels.lowrank_band(factors, high, low, 1 << 22)
            assert tiled_above == above
            assert band is not None and tiled_band is not None
            assert np.array_equal(np.sort(tiled_band), np.sort(band))  # gathered tile by tile, not in flat order
            assert kernels.lowrank_band_counts(factors, high, low) == kernels.band_counts(tau, high, low)
        for first, stride in ((0, 1), (0, 7), (3, 13), (magnitudes.size - 1, 5), (magnitudes.size, 3)):
            assert np.array_equal(kernels.lowrank_sample(factors, first, stride), magnitudes[first::stride])


@built
def test_per_tile_band_reports_an_overflowing_band() -> None:
    (factors,) = factors_of(40, 300, (4,), seed=3)
    assert kernels.lowrank_band(factors, float("inf"), 0.0, 100)[1] is None
    assert kernels.band(materialised([factors])[0], float("inf"), 0.0, 100)[1] is None


@built
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 20), cols=st.integers(1, 300), ranks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       seed=st.integers(0, 2**16), kind=st.sampled_from([kernels.SUM, kernels.TIES]), integer=st.booleans())
def test_per_tile_consensus_property(rows: int, cols: int, ranks: list[int], seed: int, kind: int,
                                     integer: bool) -> None:
    factors = factors_of(rows, cols, tuple(ranks), seed, integer)
    taus = materialised(factors)
    below = [float(i) / 2 - 0.5 for i in range(len(ranks))]
    scale = [1.0 - 0.25 * i for i in range(len(ranks))]
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    reference, tiled = torch.empty_like(base), torch.empty_like(base)
    kernels.consensus_into(kind, base, taus, below, scale, [abs(s) for s in scale], out=reference)
    kernels.lowrank_consensus_into(kind, base, factors, below, scale, [abs(s) for s in scale], out=tiled)
    assert same_bytes(tiled, reference)


@built
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.4}), ("ties", {"density": 0.6, "sign": "count", "normalize": False, "lambda": 0.8}),
    ("magnitude_prune", {"density": 0.3}), ("breadcrumbs", {"density": 0.8, "gamma": 0.1}),
])
@pytest.mark.parametrize(("chunk_rows", "max_memory"), [(None, "64KiB"), (3, "64KiB"), (3, None)])
def test_per_tile_merges_are_the_same_bytes_as_materialising_tau(demo: Path, tmp_path: Path, method: str,
                                                                 parameters: dict, chunk_rows: int | None,
                                                                 max_memory: str | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A small memory budget keeps τ from being cached: merged per tile (TIES, magnitude_prune), and Breadcrumbs'
    selection runs from the factors."""
    config = demo_config(demo, tmp_path / "tiled", method, [1.0, -0.5, 2.0], parameters=parameters)
    tiled = merge(config, device="cpu", chunk_rows=chunk_rows, workers=2, max_memory=max_memory,
                  progress=False).output_dir
    monkeypatch.setattr(kernels, "per_tile_built", lambda: False)  # τ materialised (cached or rebuilt per pass)
    whole = merge(config, out=tmp_path / "whole", device="cpu", chunk_rows=chunk_rows, workers=2,
                  max_memory=max_memory, progress=False).output_dir
    assert (tiled / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


@built
def test_low_rank_tensors_are_cached_when_they_fit_and_merged_per_tile_when_not(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite.engine.plan import build_plan  # noqa: PLC0415
    from mergekit_lite.sources.adapter import PeftAdapter  # noqa: PLC0415
    from mergekit_lite.sources.checkpoint import BaseCheckpoint  # noqa: PLC0415

    method = get_method("ties")
    base = BaseCheckpoint(demo / "base")
    adapters = [PeftAdapter(folder, folder.name) for folder in sorted((demo / "adapters").iterdir())[:2]]
    plan = build_plan(base, adapters, None)
    roomy = EngineOptions(device=torch.device("cpu"))
    tight = EngineOptions(device=torch.device("cpu"), max_memory=1024)  # no τ fits half of it
    touched = [t for t in plan.tensors if t.touched]
    assert touched
    params, own = method.resolve_params({"density": 0.5}, [{}, {}], [1.0, 1.0])
    for tensor in touched:
        cached = schedule_tensor(tensor, method, [1.0, 1.0], params, own, roomy)
        assert cached.caches_taus and not cached.tiled  # built once and sliced: the fewest operations
        tiled = schedule_tensor(tensor, method, [1.0, 1.0], params, own, tight)
        assert tiled.tiled and not tiled.caches_taus
    # Breadcrumbs cuts τ in place (it must see it): never merged per tile
    crumbs = get_method("breadcrumbs")
    params, own = crumbs.resolve_params({"density": 0.8, "gamma": 0.1}, [{}, {}], [1.0, 1.0])
    for tensor in touched:
        assert schedule_tensor(tensor, crumbs, [1.0, 1.0], params, own, roomy).caches_taus
        assert not schedule_tensor(tensor, crumbs, [1.0, 1.0], params, own, tight).tiled


@built
@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "breadcrumbs"])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunks_holding_a_split_tie_fall_back_to_tau_and_the_merge_keeps_its_bytes(method: str, chunk: int) -> None:
    """Integer factors: τ ties at the trim threshold almost everywhere; the chunk holding the split cannot take its
    cut without seeing τ, so it is materialised there; every chunk's bytes equal the torch path's."""
    from mergekit_lite.engine.elementwise import SparseTensorMerge  # noqa: PLC0415
    from mergekit_lite.engine.select import Lazy  # noqa: PLC0415

    rows, cols, weights = 16, 24, [1.0, -0.5, 2.0]
    factors = factors_of(rows, cols, (2, 3, 1), seed=5, integer=True)
    taus = materialised(factors)
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    spec = get_method(method)
    parameters = {"density": 0.4, **({"gamma": 0.05} if method == "breadcrumbs" else {})}
    params, own = spec.resolve_params(parameters, [{}, {"density": 0.7}, {}], weights)

    def prepared(lazy: bool) -> SparseTensorMerge:
        sparse = SparseTensorMerge(spec, "t", rows * cols, [0, 1, 2], weights, params, own, seed=3)
        sources = {}
        for i in range(3):
            if not sparse.needs_selection(i):
                continue
            if lazy:
                sources[i] = lambda i=i: (Lazy(lambda s=s: taus[i][s:s + chunk].clone(), min(chunk, rows - s) * cols,
                                               (factors[i][0][s:s + chunk], factors[i][1])) for s in range(0, rows, chunk))
            else:
                sources[i] = lambda i=i: (taus[i][s:s + chunk] for s in range(0, rows, chunk))
        sparse.prepare_many(sources)
        return sparse

    tiled_sparse, reference_sparse = prepared(True), prepared(False)
    fell_back = 0
    for start in range(0, rows, chunk):
        rows_ = base[start:start + chunk].to(torch.bfloat16)
        flat = start * cols
        expected, _ = reference_sparse.merged_rows(rows_.clone(), {i: taus[i][start:start + chunk].clone()
                                                                  for i in range(3)}, flat, torch.bfloat16)
        below = tiled_sparse.tiled_cuts(flat)
        if below is None:
            fell_back += 1
            got, _ = tiled_sparse.merged_rows(rows_.clone(), {i: taus[i][start:start + chunk].clone()
                                                             for i in range(3)}, flat, torch.bfloat16)
        else:
            got, _ = tiled_sparse.merged_rows_tiled(rows_.clone(), {i: (factors[i][0][start:start + chunk],
                                                                        factors[i][1]) for i in range(3)},
                                                    below, torch.bfloat16)
        assert same_bytes(got, expected), start
    if method == "breadcrumbs":
        assert fell_back == len(range(0, rows, chunk))  # its cut drops entries in place: never per tile
    elif chunk < rows:
        assert 0 < fell_back < len(range(0, rows, chunk))  # the split ties' chunks only
