"""The fused CPU kernels give the same bytes as the torch path they replace (mergekit_lite/engine/_kernels.c)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit_lite.engine.elementwise import SparseTensorMerge

from mergekit_lite import merge
from mergekit_lite.engine import kernels
from mergekit_lite.methods import get_method
from mergekit_lite.methods.sparsifying import sum_consensus, ties_consensus

from .configs import demo_config

built = pytest.mark.skipif(not kernels.enabled(), reason="the fused kernels were not built (no C compiler)")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_kernels_are_built_where_a_compiler_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV, raising=False)
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels.enabled(), kernels.describe()
        assert kernels.describe() == "fused C kernels"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not kernels.enabled() and "MERGEKIT_LITE_KERNELS=torch" in kernels.describe()


def torch_consensus(kind: int, base: torch.Tensor, taus: list[torch.Tensor], below: list[float], scale: list[float],
                    weights: list[float], params: dict) -> torch.Tensor:
    """The engine's torch steps for one chunk: trim (hardshrink), weight, consensus, add."""
    updates = [(F.hardshrink(t, b) if b >= 0 else t.clone()).mul_(s) for t, b, s in zip(taus, below, scale)]
    combine = ties_consensus if kind == kernels.TIES else sum_consensus
    return base.clone().add_(combine(updates, weights, params))


def chunk_values(numel: int) -> st.SearchStrategy[list[float]]:
    """Values with many exact zeros, ties, both signed zeros and a wide range (where rounding could differ)."""
    value = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5]),
                      st.floats(-1e4, 1e4, allow_nan=False, width=32))
    return st.lists(value, min_size=numel, max_size=numel)


@built
@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), count=st.integers(1, 5), numel=st.sampled_from([1, 7, 128, 129, 300]),
       kind=st.sampled_from([kernels.SUM, kernels.TIES]), sign=st.sampled_from(["sum", "count"]),
       normalize=st.booleans(), lam=st.sampled_from([1.0, 0.7, -1.3]),
       base_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_consensus_kernel_matches_the_torch_steps_bit_for_bit(data: st.DataObject, count: int, numel: int, kind: int,
                                                               sign: str, normalize: bool, lam: float,
                                                               base_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    taus = [torch.tensor(data.draw(chunk_values(numel)), dtype=torch.float32) for _ in range(count)]
    base = torch.tensor(data.draw(chunk_values(numel)), dtype=base_dtype)
    below = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 0.75, 3.0]), min_size=count, max_size=count))
    weights = data.draw(st.lists(st.sampled_from([1.0, -1.0, 0.3, 2.5, -0.7]), min_size=count, max_size=count))
    scale = [w / data.draw(st.sampled_from([1.0, 0.3])) for w in weights]
    params = {"sign": sign, "normalize": normalize, "lambda": lam}
    expected = torch_consensus(kind, base.float(), taus, below, scale, weights, params).to(out_dtype)
    got = torch.empty(numel, dtype=out_dtype)
    not_finite = kernels.consensus_into(kind, base, taus, below, scale, [abs(w) for w in weights], out=got,
                                      sign_count=sign == "count", normalize=normalize, lam=lam)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (got, expected)
    assert not_finite == int((~torch.isfinite(expected)).sum())


@built
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_consensus_kernel_counts_values_that_overflow(out_dtype: torch.dtype) -> None:
    base = torch.tensor([3e38, -3e38, 1.0, 3.3e38])
    tau = torch.tensor([3e38, -3e38, 1.0, 1e37])
    out = torch.empty(4, dtype=out_dtype)
    not_finite = kernels.consensus_into(kernels.SUM, base, [tau], [-1.0], [1.0], [1.0], out=out)
    assert not_finite == int((~torch.isfinite((base + tau).to(out_dtype))).sum()) >= 2


@built
@pytest.mark.parametrize("numel", [1, 127, 128, 1000, 1 << 16])
def test_band_kernel_counts_and_gathers_like_numpy(numel: int) -> None:
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3
    values[::7] = 1.0  # ties at the band's edges
    for high, low in [(1.0, 0.5), (float("inf"), 0.0), (1.0, 1.0), (0.2, 0.1)]:
        magnitudes = values.abs().numpy()
        above, band = kernels.band(values, high, low, limit=numel)
        assert above == np.count_nonzero(magnitudes > high)
        assert band is not None and np.array_equal(band, magnitudes[(magnitudes >= low) & (magnitudes <= high)])


@built
def test_band_kernel_reports_an_overflowing_band() -> None:
    values = torch.ones(1000)
    assert kernels.band(values, 2.0, 0.5, limit=999)[1] is None
    above, band = kernels.band(values, 2.0, 0.5, limit=1000)
    assert above == 0 and band is not None and len(band) == 1000


def tie_heavy_taus(rows: int, cols: int, count: int) -> list[torch.Tensor]:
    """Task vectors of small integers: the trim threshold splits a tie in almost every one."""
    generator = torch.Generator().manual_seed(rows * cols + count)
    return [torch.randint(-4, 5, (rows, cols), generator=generator).float() * 0.25 for _ in range(count)]


@built
@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_fused_tensor_merge_matches_the_torch_path_with_split_ties(method: str, chunk: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rows, cols, weights = 16, 24, [1.0, -0.5, 2.0]
    taus = tie_heavy_taus(rows, cols, 3)
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    spec = get_method(method)
    params, own = spec.resolve_params({"density": 0.4}, [{}, {"density": 0.7}, {}], weights)

    def run() -> torch.Tensor:
        sparse = SparseTensorMerge(spec, "t", rows * cols, [0, 1, 2], weights, params, own, seed=3)
        for index in range(3):
            if sparse.needs_selection(index):
                sparse.prepare(index, lambda index=index: (taus[index][s:s + chunk] for s in range(0, rows, chunk)))
        out = base.clone()
        for start in reversed(range(0, rows, chunk)):  # out of order: the tie counts were taken up front
            taus_chunk = {i: taus[i][start:start + chunk].clone() for i in range(3)}
            merged, finite = sparse.merged_rows(out[start:start + chunk].clone(), taus_chunk, start * cols, torch.bfloat16)
            assert finite
            out[start:start + chunk] = merged.float()
        return out

    with_kernels = run()
    monkeypatch.setenv(kernels.ENV, "torch")
    assert same_bytes(with_kernels, run())


@built
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.4}), ("ties", {"density": 0.6, "sign": "count", "normalize": False, "lambda": 0.8}),
    ("dare_ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
])
def test_checkpoints_are_the_same_bytes_with_and_without_kernels(demo: Path, tmp_path: Path, method: str,
                                                                 parameters: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = demo_config(demo, tmp_path / "fused", method, [1.0, -0.5, 2.0], parameters=parameters)
    with_kernels = merge(config, device="cpu", chunk_rows=5, workers=2, progress=False).output_dir
    monkeypatch.setenv(kernels.ENV, "torch")
    without = merge(config, out=tmp_path / "torch", device="cpu", chunk_rows=5, workers=2, progress=False).output_dir
    assert (with_kernels / "model.safetensors").read_bytes() == (without / "model.safetensors").read_bytes()


@built
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_low_rank_kernel_is_the_product_added_once_and_does_not_depend_on_row_splits(out_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    left, right = torch.randn(37, 48, generator=generator), torch.randn(48, 300, generator=generator) * 0.01
    base = torch.randn(37, 300, generator=generator).to(torch.bfloat16)
    in_float32 = torch.empty(37, 300)
    assert kernels.lowrank_add(left, right, base, in_float32) == 0
    exact = base.double() + left.double() @ right.double()
    assert float((in_float32.double() - exact).abs().max()) <= 4 * 2**-24 * float(exact.abs().max())
    whole = torch.empty(37, 300, dtype=out_dtype)
    assert kernels.lowrank_add(left, right, base, whole) == 0
    assert torch.equal(whole, in_float32.to(out_dtype))  # rounded once, from the float32 result
    pieces = torch.empty_like(whole)
    for start, stop in [(0, 1), (1, 10), (10, 11), (11, 37)]:  # odd offsets: alignment must not matter
        assert kernels.lowrank_add(left[start:stop], right, base[start:stop], pieces[start:stop]) == 0
    assert torch.equal(whole.view(torch.uint8), pieces.view(torch.uint8))


@built
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_linear_merges_are_the_same_bytes_for_any_chunking_and_workers(demo: Path, tmp_path: Path, method: str) -> None:
    config = demo_config(demo, tmp_path / "whole", method, [1.0, -0.5, 2.0])
    whole = merge(config, device="cpu", workers=1, progress=False).output_dir
    for chunk_rows, workers in [(1, 2), (3, 1), (7, 4)]:
        other = merge(config, out=tmp_path / f"c{chunk_rows}w{workers}", device="cpu", chunk_rows=chunk_rows,
                      workers=workers, progress=False).output_dir
        assert (whole / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()


@built
@pytest.mark.parametrize(("rows", "rank", "cols"), [(1, 1, 1), (3, 5, 15), (6, 16, 16), (9, 48, 300), (13, 7, 529)])
def test_low_rank_product_tiles_keep_the_scalar_order_bit_for_bit(rows: int, rank: int, cols: int) -> None:
    """The register-blocked tiles (6 rows x 16 columns, remainders row by row and column by column) give each
    output exactly s = l0*r0, then s = s + lk*rk for k = 1..r-1, each rounded: torch's float32 ops, one by one."""
    generator = torch.Generator().manual_seed(rows * 1000 + cols)
    left, right = torch.randn(rows, rank, generator=generator), torch.randn(rank, cols, generator=generator)
    out = kernels.lowrank(left, right, torch.empty(rows, cols))
    expected = left[:, :1] * right[:1]
    for k in range(1, rank):
        expected = expected + left[:, k:k + 1] * right[k:k + 1]
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@built
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9999999, 1.0])
def test_the_fused_dare_keep_mask_equals_torch_rand_masks_for_any_cut_of_the_blocks(density: float) -> None:
    """mkl_dare_keep draws torch.rand's uniforms itself (MT19937 as torch seeds it): same bytes as multiplying
    by randomness.keep_mask, for chunks that start and end inside blocks, span several, or cover one exactly."""
    from mergekit_lite.randomness import BLOCK, UniformStream, keep_mask, stream_key

    key = stream_key(3, 1, "model.layers.0.mlp.down_proj.weight")
    generator = torch.Generator().manual_seed(11)
    for start, count in [(0, BLOCK), (5, 17), (BLOCK - 3, 10), (7 * BLOCK + 100, 3 * BLOCK + 5), (2 * BLOCK, 1)]:
        tau = torch.randn(count, generator=generator)
        special = torch.tensor([-0.0, float("nan"), -2.5])[:count]
        tau[: len(special)] = special
        expected = tau * keep_mask(key, density, start, count, torch.device("cpu"))
        fused = UniformStream(key).apply_keep(tau.clone(), density, start, kernels.fused_keep())
        assert torch.equal(fused.view(torch.int32), expected.view(torch.int32)), (start, count)
