"""TIES, DARE and magnitude pruning: dense references, PEFT's ties, streaming invariants, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit_lite.randomness import keep_mask, stream_key
from mergekit_lite.engine.select import Trimmer

from mergekit_lite import MergeConfig, MergeConfigError, merge
from mergekit_lite.methods import get_method

from .reference import load_checkpoint, ties_combine, trim
from .configs import assert_demo_merge, demo_config
from .streaming import stream


def densities(values: list[float]) -> list[dict]:
    """Per-adapter entries setting each adapter's density."""
    return [{"density": d} for d in values]


def full_params(method: str, **given: object) -> tuple[dict, list[dict]]:
    row = get_method(method)
    global_params = {p.name: given.get(p.name, p.default) for p in row.params}
    return global_params, []


tied_values = st.integers(-4, 4).map(lambda v: v / 2)  # few distinct magnitudes: many ties


@st.composite
def sparse_cases(draw: st.DrawFn) -> dict:
    rows, cols, n = draw(st.integers(1, 9)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    taus = [torch.tensor(draw(st.lists(tied_values, min_size=rows * cols, max_size=rows * cols)),
                         dtype=torch.float32).reshape(rows, cols) for _ in range(n)]
    weights = draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 2.0, -0.75]), min_size=n, max_size=n))
    densities = [max(d, 1.0 / (rows * cols)) for d in draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n))]
    return {"taus": taus, "weights": weights, "densities": densities, "chunk_rows": draw(st.integers(1, rows))}


@settings(max_examples=60, deadline=None)
@given(case=sparse_cases(), sign=st.sampled_from(["sum", "count"]), normalize=st.booleans(), lam=st.sampled_from([1.0, 0.5, -2.0]))
def test_ties_equals_the_dense_reference_for_any_chunking(case: dict, sign: str, normalize: bool, lam: float) -> None:
    params = {"density": None, "sign": sign, "normalize": normalize, "lambda": lam}
    per_adapter = [{"density": d} for d in case["densities"]]
    got = stream("ties", case["taus"], case["weights"], params, per_adapter, case["chunk_rows"])
    updates = [w * trim(t.double(), d) for t, w, d in zip(case["taus"], case["weights"], case["densities"])]
    expected = ties_combine(updates, case["weights"], sign, normalize, lam)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(case=sparse_cases(), lam=st.sampled_from([1.0, -0.5]))
def test_magnitude_prune_equals_the_dense_reference(case: dict, lam: float) -> None:
    per_adapter = [{"density": d} for d in case["densities"]]
    got = stream("magnitude_prune", case["taus"], case["weights"], {"density": None, "lambda": lam}, per_adapter, case["chunk_rows"])
    expected = lam * sum(w * trim(t.double(), d) for t, w, d in zip(case["taus"], case["weights"], case["densities"]))
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(case=sparse_cases(), rescale=st.booleans(), seed=st.integers(0, 2**31), ties=st.booleans())
def test_dare_equals_the_dense_reference_with_the_same_masks(case: dict, rescale: bool, seed: int, ties: bool) -> None:
    method = "dare_ties" if ties else "dare_linear"
    params = {"density": None, "rescale": True, "lambda": 1.0, **({"sign": "sum", "normalize": True} if ties else {})}
    per_adapter = [{"density": d, "rescale": rescale} for d in case["densities"]]
    got = stream(method, case["taus"], case["weights"], params, per_adapter, case["chunk_rows"], seed=seed, name="w")
    updates = []
    for i, (tau, w, d) in enumerate(zip(case["taus"], case["weights"], case["densities"])):
        mask = keep_mask(stream_key(seed, i, "w"), d, 0, tau.numel(), torch.device("cpu")).reshape(tau.shape)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        # uᵢ = (τᵢ ⊙ mᵢ)·(wᵢ/d) in float32 (SEMANTICS §2): with a double reference, a sign vote that cancels
        # exactly in float32 (1.5·0.5/0.625 − 1·0.75/0.625) can round to either side and elect the other sign
        updates.append(((tau * mask) * (w / d if rescale else w)).double())
    expected = ties_combine(updates, case["weights"], "sum", True, 1.0) if ties else sum(updates)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def test_ties_equals_peft_ties_on_dense_task_vectors() -> None:
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    generator = torch.Generator().manual_seed(0)
    taus = [torch.randn(64, 48, generator=generator) for _ in range(3)]  # continuous: no magnitude ties
    params = {"density": None, "sign": "sum", "normalize": True, "lambda": 1.0}
    ours = stream("ties", taus, [1.0, 1.0, 1.0], params, [{"density": 0.3}] * 3, chunk_rows=5)
    peft = merge_utils.ties(torch.stack(taus), torch.ones(3), density=0.3, majority_sign_method="total")
    torch.testing.assert_close(ours, peft, atol=1e-6, rtol=1e-6)


SELECTION_PATHS = {
    "whole sample": {},  # fewer entries than the sample: selected directly
    "sampled band": {"SAMPLE": 64},  # a strided sample brackets the k-th value, one pass gathers the band
    "narrow band, may miss": {"SAMPLE": 128, "MARGIN_SIGMAS": 0.5, "MARGIN_ENTRIES": 0},  # misses fall back
    "radix, gathered bin": {"_sampled_band": lambda *args: None},
    "radix, low-bits histogram": {"_sampled_band": lambda *args: None, "BAND_LIMIT": 0},
}


@pytest.mark.parametrize("path", list(SELECTION_PATHS))
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.99])
def test_ties_trim_keeps_exactly_k_entries_across_chunk_sizes(
    density: float, ties: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergekit_lite.engine.select as select

    for name, value in SELECTION_PATHS[path].items():
        monkeypatch.setattr(select, name, value)
    generator = torch.Generator().manual_seed(1)
    if ties:
        tau = (torch.randint(1, 4, (50, 20), generator=generator) / 2).float()
        tau *= torch.randint(0, 2, tau.shape, generator=generator) * 2 - 1  # no zeros, many ties
    else:
        tau = torch.randn(50, 20, generator=generator)
    k = math.floor(density * tau.numel())
    trimmed = []
    for chunk_rows in (1, 3, 7, 50):
        chunks = [tau[s:s + chunk_rows] for s in range(0, 50, chunk_rows)]
        starts = [s * tau.shape[1] for s in range(0, 50, chunk_rows)]
        threshold = select.kth_largest_magnitude(lambda chunks=chunks: chunks, k, band_limit=select.BAND_LIMIT,
                                                 numel=tau.numel())
        in_order = Trimmer(threshold)  # counts ties as the chunks come
        trimmed.append(torch.cat([in_order.trim(c, start) for c, start in zip(chunks, starts)]))
        counted = Trimmer(threshold, lambda chunks=chunks: chunks)  # ties counted up front: any order
        backwards = [counted.trim(c, start) for c, start in reversed(list(zip(chunks, starts)))]
        trimmed.append(torch.cat(backwards[::-1]))
    assert all(torch.equal(t, trimmed[0]) for t in trimmed)
    assert int(torch.count_nonzero(trimmed[0])) == k  # τ has no zeros: exactly the k kept entries survive
    assert torch.equal(trimmed[0], trim(tau, density))


def test_a_band_of_one_tied_value_is_counted_not_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized τ (bf16 fine-tunes): the sample's k-th value ties across the whole band, so the band pass counts
    the entries above and equal to it per chunk; the threshold, the per-chunk tie counts and the trimmed chunks
    (each chunk's tie rule as one cut where all its ties are kept or all dropped) equal the exact radix path's."""
    import mergekit_lite.engine.select as select

    monkeypatch.setattr(select, "SAMPLE", 2000)  # a strided sample even on this small tensor
    generator = torch.Generator().manual_seed(5)
    draw = torch.rand(200, 50, generator=generator)
    tau = torch.where(draw < 0.2, 4.0, torch.where(draw < 0.8, 3.0, 1.0)) * 2.0 ** -13  # 60% tie at 3·2⁻¹³
    tau *= torch.randint(0, 2, tau.shape, generator=generator) * 2 - 1
    k = tau.numel() // 2
    for chunk_rows in (1, 7, 200):
        chunks = [tau[s:s + chunk_rows] for s in range(0, 200, chunk_rows)]
        starts = [s * tau.shape[1] for s in range(0, 200, chunk_rows)]
        counted = select.kth_largest_magnitude(lambda chunks=chunks: chunks, k, numel=tau.numel())
        with monkeypatch.context() as radix:
            radix.setattr(select, "_sampled_band", lambda *args: None)
            exact = select.kth_largest_magnitude(lambda chunks=chunks: chunks, k, numel=tau.numel())
        assert (counted.bits, counted.equal_keep, counted.equal_total) == (exact.bits, exact.equal_keep,
                                                                          exact.equal_total)
        value = float(tau.abs().max()) * 0.75
        assert counted.chunk_ties == tuple(int((c.abs() == value).sum()) for c in chunks)
        trimmer = Trimmer(counted, lambda chunks=chunks: chunks)
        cuts = 0
        for chunk, start in zip(chunks, starts):
            expected = trimmer.trim(chunk, start)
            below = trimmer.chunk_below(start)
            if below is not None:
                cuts += 1
                assert torch.equal(torch.nn.functional.hardshrink(chunk, below) if below >= 0 else chunk, expected)
        assert cuts >= len(chunks) - 1
        assert torch.equal(torch.cat([trimmer.trim(c, s) for c, s in zip(chunks, starts)]), trim(tau, 0.5))


def test_dare_masks_do_not_depend_on_chunking_or_tensor_order() -> None:
    key = stream_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    whole = keep_mask(key, 0.3, 0, 10_000, torch.device("cpu"))
    pieces = torch.cat([keep_mask(key, 0.3, s, min(999, 10_000 - s), torch.device("cpu")) for s in range(0, 10_000, 999)])
    assert torch.equal(whole, pieces)
    _ = keep_mask(stream_key(3, 0, "another.tensor"), 0.3, 0, 5000, torch.device("cpu"))  # other streams first
    assert torch.equal(keep_mask(key, 0.3, 0, 10_000, torch.device("cpu")), whole)
    assert not torch.equal(keep_mask(stream_key(4, 1, "model.layers.0.mlp.up_proj.weight"), 0.3, 0, 10_000, torch.device("cpu")), whole)


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_dare_kept_fraction_is_within_4_sigma_of_density(density: float) -> None:
    n = 2_000_000
    kept = int(keep_mask(stream_key(0, 0, "big"), density, 0, n, torch.device("cpu")).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 4 * sigma


SELECTION_MEMORY_PROBE = """
import re, torch
from mergekit_lite.engine.select import kth_largest_magnitude, Trimmer
torch.set_num_threads(1)
chunk, count, k = 1_000_000, 100, 12_345_678   # 100M float32 entries = 400 MB if ever materialized
def chunks():  # each chunk a fresh tensor, as the engine's rebuilt τ chunks are
    for i in range(count):
        yield torch.randn(chunk, generator=torch.Generator().manual_seed(i))
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def start():  # reset the peak to the current resident set, and return that
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status("VmRSS")
warm = torch.randn(chunk); Trimmer(kth_largest_magnitude(lambda: [warm], 10)).trim(warm); del warm  # one chunk only
before = start()
threshold = kth_largest_magnitude(chunks, k)
growth = status("VmHWM") - before
before = start()
held = list(chunks())   # the control: holding every chunk must show in the same measure
control = status("VmHWM") - before
greater = sum(int((c.abs() > threshold.value).sum()) for c in held)
equal = sum(int((c.abs() == threshold.value).sum()) for c in held)
print(growth, control, int(greater + threshold.equal_keep == k and equal == threshold.equal_total))
"""
# The peak resident set is VmHWM, reset just before each measured step: ru_maxrss would not do, since a child
# process starts with the parent's peak (pytest's, often larger than anything measured here).
# glibc keeps freed heap memory resident, and once a chunk-sized block has been freed its mmap threshold rises
# past the chunk size: every new chunk then comes from the heap, a small array the selection keeps per chunk lands
# in the hole the last chunk left, the next chunk no longer fits there, and the resident set grows by a chunk each
# time although only one chunk is alive. A fixed mmap threshold below the chunk size maps each chunk afresh and
# unmaps it when freed, so the peak counts what the selection holds, not what the allocator caches.
PROBE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}


def run_selection_probe() -> tuple[int, int, bool]:
    """(peak growth during the selection, peak growth holding every chunk, threshold exact) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", SELECTION_MEMORY_PROBE], capture_output=True, text=True,
                         env=PROBE_ENV, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    growth, control, exact = map(int, out.stdout.split())
    return growth, control, bool(exact)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak resident set as Linux does")
def test_selection_memory_is_bounded_by_the_chunk_not_the_tensor() -> None:
    growth, control, exact = run_selection_probe()
    assert exact  # the k-th largest magnitude of the 100M entries, ties counted
    assert growth < 10 * 4_000_000, growth  # < 10 chunks' worth of float32, against 400 MB for the whole tensor
    assert control > 300 * 10**6, control  # and the same measure does see the 400 MB tensor held whole


# -- through files: the demo adapters ------------------------------------------------------------------


@pytest.mark.slow  # three whole merges, about a second each (the dense-reference properties above stay fast)
@pytest.mark.parametrize("chunk_rows", [None, 1, 13])
def test_ties_through_files_equals_the_reference(demo: Path, tmp_path: Path, chunk_rows: int | None) -> None:
    config = demo_config(demo, tmp_path / "out", "ties", parameters={"density": 0.4}, per_adapter=densities([0.4, 0.2, 0.7]))
    weights = [1.0, -0.5, 2.0]

    def delta(name: str, taus: list[torch.Tensor]) -> torch.Tensor:
        updates = [w * trim(t.double(), d) for t, w, d in zip(taus, weights, [0.4, 0.2, 0.7])]
        return ties_combine(updates, weights, "sum", True, 1.0)

    assert_demo_merge(demo, config, delta, chunk_rows)


def test_dare_ties_is_reproducible_and_seed_dependent(demo: Path, tmp_path: Path) -> None:
    """Reproducible: the same seed gives the same bytes, even in other chunks (SEMANTICS §5: on CPU, dare_* bytes do
    not depend on the chunk size); another seed draws other masks."""
    config = demo_config(demo, tmp_path / "a", "dare_ties", parameters={"density": 0.5}, seed=11)
    first = merge(config, device="cpu", progress=False).output_dir
    again = merge(config, out=tmp_path / "b", device="cpu", chunk_rows=3, progress=False).output_dir
    other = merge(demo_config(demo, tmp_path / "c", "dare_ties", parameters={"density": 0.5}, seed=12),
                  device="cpu", progress=False).output_dir
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_checkpoint(first)[name], load_checkpoint(other)[name])


def test_card_records_method_paper_density_sign_and_seed(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "ties", parameters={"density": 0.5, "sign": "count"},
                         per_adapter=densities([0.5, 0.3, 0.5]), seed=5)
    card = (merge(config, device="cpu", progress=False).output_dir / "README.md").read_text()
    assert "**TIES**" in card and "arxiv.org/abs/2306.01708" in card
    assert "`sign=count`" in card and "Seed: `5`" in card
    assert "| density |" in card and "| 0.3 |" in card


@pytest.mark.parametrize(
    ("method", "parameters", "adapter_extra", "message"),
    [
        ("ties", {"density": 0}, {}, "must be in (0, 1]"),
        ("ties", {"density": 1.5}, {}, "must be in (0, 1]"),
        ("dare_ties", {"density": 0.5}, {"density": -0.1}, "must be in (0, 1]"),
        ("ties", {}, {}, "needs 'density'"),
        ("ties", {"density": 0.5, "sign": "majority"}, {}, "one of: sum, count"),
        ("ties", {"density": 0.5, "rescale": False}, {}, "takes no parameter 'rescale'"),
        ("dare_linear", {"density": 0.5, "sign": "sum"}, {}, "takes no parameter 'sign'"),
        ("ties", {"density": 0.5, "lambda": 1.0}, {"lambda": 2}, "global parameter"),
    ],
)
def test_bad_method_parameters_are_config_errors(method: str, parameters: dict, adapter_extra: dict, message: str) -> None:
    data = {"base_model": "b", "method": method, "parameters": parameters,
            "adapters": [{"path": "a", **adapter_extra}], "output": {"path": "o"}}
    with pytest.raises(MergeConfigError) as caught:
        MergeConfig.from_dict(data)
    assert message in str(caught.value)


def test_density_that_keeps_nothing_names_the_tensor(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "ties", parameters={"density": 1e-6})
    with pytest.raises(MergeConfigError, match=r"density 1e-06 keeps 0 of the \d+ entries of tensor 'model\."):
        merge(config, device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_selection_over_chunks_built_on_demand_holds_only_a_couple_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory bound: when τ is rebuilt chunk by chunk (too large to cache), selection never keeps them all."""
    import gc
    import weakref

    from mergekit_lite.engine import select

    monkeypatch.setattr(select, "SAMPLE", 256)  # a real sample and band pass, not the whole-sample shortcut
    tau = torch.randn(400, 64, generator=torch.Generator().manual_seed(5))
    alive, most = [0], [0]

    def released() -> None:
        alive[0] -= 1

    def chunks():
        for start in range(0, 400, 8):  # 50 chunks, each a fresh tensor as the engine's rebuilt τ chunks are
            chunk = tau[start:start + 8].clone()
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            weakref.finalize(chunk, released)
            yield chunk
            del chunk
            gc.collect()

    k = tau.numel() // 3
    threshold = select.kth_largest_magnitudes({0: chunks}, {0: k}, numel=tau.numel())[0]
    assert threshold.bits == int(tau.abs().flatten().kthvalue(tau.numel() - k + 1).values.view(torch.int32))
    assert most[0] <= 3, most[0]
