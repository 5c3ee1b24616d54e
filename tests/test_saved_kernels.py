"""The saved-tensor kernels (engine/_saved_kernels.c) give the bytes of the paths they replace: the two-step C
path (a mixed-dtype subtraction per model, then the consensus kernel) and the torch steps, for full fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from evals.full_models import build_noisy_model
from mergekit_lite import MergeConfig, merge
from mergekit_lite.cli import main
from mergekit_lite.engine import kernels, saved_kernels

from .refusals import one_line

built = pytest.mark.skipif(not (saved_kernels.enabled() and kernels.enabled()),
                           reason="the C kernels were not built (no C compiler)")

SIZES = [1, 7, 15, 16, 17, 128, 300, 1029]


def _values(numel: int, generator: torch.Generator, spread: float) -> torch.Tensor:
    """Entries over a wide range with exact zeros, both signed zeros and ties (where rounding could differ)."""
    values = torch.randn(numel, generator=generator) * torch.exp(torch.randn(numel, generator=generator) * spread)
    values[torch.rand(numel, generator=generator) < 0.1] = 0.0
    values[torch.rand(numel, generator=generator) < 0.05] = -0.0
    values[torch.rand(numel, generator=generator) < 0.05] = 1.0
    return values


def _inputs(numel: int, count: int, base_dtype: torch.dtype, saved_dtypes: list[torch.dtype], seed: int
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = _values(numel, generator, 3.0).to(base_dtype)
    saved = []
    for i in range(count):  # a fine-tune: W plus a change of every size, sometimes none
        change = _values(numel, generator, 2.0) * 10.0 ** float(torch.randint(-4, 1, (), generator=generator))
        saved.append((base.float() + change).to(saved_dtypes[i % len(saved_dtypes)]))
    return base, saved


def two_step(base: torch.Tensor, saved: list[torch.Tensor], coefs: list[float], out_dtype: torch.dtype,
             lam: float = 1.0) -> tuple[torch.Tensor, int]:
    """The path the kernel replaces (deltas._merged_saved_rows before it): τᵢ = torch.sub(savedᵢ, f32(W)), then the
    consensus kernel, kind SUM, nothing trimmed."""
    wide = base.float()
    taus = [torch.sub(s, wide) if s.dtype == torch.float32 else torch.sub(s, wide, out=torch.empty_like(wide))
            for s in saved]
    out = torch.empty(base.shape, dtype=out_dtype)
    bad = kernels.consensus_into(kernels.SUM, base, taus, [-1.0] * len(taus), coefs, [1.0] * len(taus), out=out,
                                 lam=lam)
    return out, bad


def torch_steps(base: torch.Tensor, saved: list[torch.Tensor], coefs: list[float], out_dtype: torch.dtype
                ) -> torch.Tensor:
    """TensorDeltas.add_rows' steps: each dense part (savedᵢ − W)·cᵢ, summed in order, added to W once, cast."""
    wide = base.to(torch.float32, copy=True)
    total = None
    for s, c in zip(saved, coefs):
        part = (s.float() - wide) * c
        total = part if total is None else total + part
    return wide.add_(total).to(out_dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@built
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_saved_sum_is_the_bytes_of_the_two_step_path_and_the_torch_steps(count: int, base_dtype: torch.dtype,
                                                                         out_dtype: torch.dtype) -> None:
    coefs = [1.0, -0.5, 0.7, 2.0][:count]
    for numel in SIZES:
        for saved_dtypes in ([torch.bfloat16], [torch.float32], [torch.float32, torch.bfloat16]):
            base, saved = _inputs(numel, count, base_dtype, saved_dtypes, seed=numel * 10 + count)
            expected, expected_bad = two_step(base, saved, coefs, out_dtype)
            assert same_bytes(expected, torch_steps(base, saved, coefs, out_dtype))
            for portable in (False, True):
                out = torch.empty(numel, dtype=out_dtype)
                bad, bad_inputs = saved_kernels.saved_sum(base, saved, coefs, out, portable=portable)
                assert same_bytes(out, expected), (numel, saved_dtypes, portable)
                assert (bad, bad_inputs) == (expected_bad, 0)


@built
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_saved_sum_keeps_the_scale_and_lambda_order_and_any_cut_of_the_rows(out_dtype: torch.dtype) -> None:
    base, saved = _inputs(1000, 3, torch.bfloat16, [torch.bfloat16, torch.float32], seed=5)
    coefs = [0.3, -1.7, 0.0]
    expected, _ = two_step(base, saved, coefs, out_dtype, lam=0.9)
    whole = torch.empty(1000, dtype=out_dtype)
    saved_kernels.saved_sum(base, saved, coefs, whole, lam=0.9)
    assert same_bytes(whole, expected)
    pieces = torch.empty_like(whole)
    for start, stop in [(0, 1), (1, 18), (18, 19), (19, 500), (500, 1000)]:  # odd offsets: alignment must not matter
        saved_kernels.saved_sum(base[start:stop], [s[start:stop] for s in saved], coefs, pieces[start:stop], lam=0.9)
    assert same_bytes(pieces, whole)


@built
def test_saved_sum_may_write_over_the_base_rows() -> None:
    base, saved = _inputs(300, 2, torch.bfloat16, [torch.bfloat16], seed=9)
    expected, _ = two_step(base, saved, [1.0, 1.0], torch.bfloat16)
    saved_kernels.saved_sum(base, saved, [1.0, 1.0], base)
    assert same_bytes(base, expected)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
def test_saved_sum_counts_non_finite_inputs_and_outputs(dtype: torch.dtype, portable: bool) -> None:
    base, saved = _inputs(300, 3, torch.float32, [dtype], seed=3)
    saved[1][[0, 17, 299]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    saved[2][100] = float("nan")
    base[5] = float("inf")  # W is not an input the kernel checks; its output is not finite
    out = torch.empty(300, dtype=torch.bfloat16)
    bad, bad_inputs = saved_kernels.saved_sum(base, saved, [1.0, 1.0, 1.0], out, portable=portable)
    assert bad_inputs == 4 and bad >= 1
    ones, big = torch.ones(40), torch.full((40,), 3e38)  # finite inputs whose sum overflows
    out = torch.empty(40)
    assert saved_kernels.saved_sum(ones, [big, big], [1.0, 1.0], out, portable=portable) == (40, 0)
    assert saved_kernels.saved_sum(ones, [big.to(torch.bfloat16)], [1.0], out, lam=2.0, portable=portable) == (40, 0)
    assert saved_kernels.saved_sum(ones, [big], [0.5], out, portable=portable) == (0, 0)


@built
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_saved_tau_is_the_float32_difference_and_counts_non_finite_saved_entries(base_dtype: torch.dtype,
                                                                    saved_dtype: torch.dtype) -> None:
    for numel in SIZES:
        base, (saved,) = _inputs(numel, 1, base_dtype, [saved_dtype], seed=numel)
        expected = saved.float() - base.float()  # the engine's τ (never bf16 − bf16 rounded to bf16)
        if torch.float32 in (base_dtype, saved_dtype):
            assert same_bytes(torch.sub(saved, base, out=torch.empty(numel)), expected)  # as _saved_rows does it
        for portable in (False, True):
            for start, stop in [(0, numel), (numel // 3, numel), (1, max(numel - 1, 1))]:  # unaligned starts too
                out = torch.full((stop - start,), 7.0)
                assert saved_kernels.saved_tau(saved[start:stop], base[start:stop], out, portable=portable) == 0
                assert same_bytes(out, expected[start:stop]), (numel, start, portable)
    base, (saved,) = _inputs(300, 1, base_dtype, [saved_dtype], seed=1)
    saved[[3, 150, 299]] = torch.tensor([float("nan"), float("-inf"), float("inf")], dtype=saved_dtype)
    base[7] = float("nan")  # W is not checked here
    for portable in (False, True):
        assert saved_kernels.saved_tau(saved, base, torch.empty(300), portable=portable) == 3


def test_the_kernel_is_built_where_a_compiler_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.delenv(kernels.ENV, raising=False)
    if shutil.which("cc") or shutil.which("gcc"):
        assert saved_kernels.enabled()
    monkeypatch.setattr(saved_kernels, "_library", lambda: None)  # not built: the engine takes its other paths
    assert not saved_kernels.enabled() and not saved_kernels.usable(torch.zeros(4), torch.float32)


@built
def test_the_kernel_is_off_with_the_torch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not saved_kernels.enabled() and not saved_kernels.usable(torch.zeros(4), torch.float32)


# -- through the engine: full fine-tunes merged with and without the kernel ---------------------------------------------

@pytest.fixture(scope="module")
def fine_tunes(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three fine-tunes of the demo base: bfloat16 in two shards, float32, bfloat16 (changes of a few steps)."""
    root = tmp_path_factory.mktemp("saved")
    return [build_noisy_model(demo / "base", root / "a", seed=11, dtype="bfloat16", shards=2),
            build_noisy_model(demo / "base", root / "b", seed=12, relative=0.01),
            build_noisy_model(demo / "base", root / "c", seed=13, relative=0.002, dtype="bfloat16")]


def _config(demo: Path, out: Path, method: str, models: list[Path], weights: list[float], out_dtype: str,
            parameters: dict | None = None) -> MergeConfig:
    return MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": method, "parameters": parameters or {},
        "models": [{"path": str(p), "weight": w} for p, w in zip(models, weights)],
        "output": {"path": str(out), "dtype": out_dtype}})


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@built
@pytest.mark.parametrize(("method", "count", "weights", "out_dtype"), [
    ("task_arithmetic", 1, [0.6], "bfloat16"),
    ("task_arithmetic", 3, [1.0, -0.5, 0.0], "float32"),
    ("linear", 2, [0.7, 0.3], "bfloat16"),
    ("task_arithmetic", 3, [1.0, 1.0, 1.0], "bfloat16"),
])
def test_full_model_merges_are_the_same_bytes_with_the_kernel_the_two_step_path_and_torch(
        demo: Path, fine_tunes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        count: int, weights: list[float], out_dtype: str) -> None:
    config = _config(demo, tmp_path / "whole", method, fine_tunes[:count], weights, out_dtype)
    calls = []
    real = saved_kernels.saved_sum
    monkeypatch.setattr(saved_kernels, "saved_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = _bytes(merge(config, device="cpu", workers=1, progress=False).output_dir)
    assert calls  # the kernel ran
    for chunk_rows, workers in [(1, 2), (3, 1), (7, 4)]:
        out = tmp_path / f"c{chunk_rows}w{workers}"
        assert _bytes(merge(config, out=out, device="cpu", chunk_rows=chunk_rows, workers=workers,
                            progress=False).output_dir) == reference
    monkeypatch.setattr(saved_kernels, "usable", lambda *_: False)  # the two-step C path
    calls.clear()
    assert _bytes(merge(config, out=tmp_path / "two_step", device="cpu", chunk_rows=5, progress=False).output_dir) \
        == reference
    monkeypatch.setenv(kernels.ENV, "torch")
    assert _bytes(merge(config, out=tmp_path / "torch", device="cpu", chunk_rows=5, progress=False).output_dir) \
        == reference
    assert not calls


@built
@pytest.mark.slow
def test_a_full_model_and_an_adapters_saved_module_sum_to_the_same_bytes(
        demo: Path, fine_tunes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm_head saved in full by both a fine-tune and a PEFT adapter (modules_to_save): both read checked, one sum."""
    from evals.fixtures import build_adapter

    adapter = build_adapter(demo / "base", tmp_path / "saved_head", "modules_to_save")
    data = {"base_model": str(demo / "base"), "method": "task_arithmetic",
            "models": [{"path": str(fine_tunes[0]), "weight": 0.9}],
            "adapters": [{"path": str(adapter), "weight": -0.4}], "output": {"dtype": "bfloat16"}}
    config = MergeConfig.from_dict({**data, "output": {**data["output"], "path": str(tmp_path / "kernel")}})
    calls = []
    real = saved_kernels.saved_sum
    monkeypatch.setattr(saved_kernels, "saved_sum", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    reference = _bytes(merge(config, device="cpu", chunk_rows=3, progress=False).output_dir)
    assert 2 in calls  # lm_head: the model's rows and the adapter's saved module in one call
    monkeypatch.setattr(saved_kernels, "usable", lambda *_: False)
    assert _bytes(merge(config, out=tmp_path / "two_step", device="cpu", chunk_rows=5, progress=False).output_dir) \
        == reference


@built
@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
])
def test_sparsifying_merges_of_full_models_are_the_same_bytes_with_the_tau_kernel(
        demo: Path, fine_tunes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        parameters: dict) -> None:
    config = _config(demo, tmp_path / "kernel", method, fine_tunes, [1.0, -0.6, 0.8], "bfloat16", parameters)
    calls = []
    real = saved_kernels.saved_tau
    monkeypatch.setattr(saved_kernels, "saved_tau", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = _bytes(merge(config, device="cpu", chunk_rows=3, workers=2, progress=False).output_dir)
    assert calls
    assert _bytes(merge(config, out=tmp_path / "other", device="cpu", chunk_rows=8, workers=1,
                        progress=False).output_dir) == reference
    monkeypatch.setattr(saved_kernels, "usable", lambda *_: False)  # torch.sub and the read's check
    assert _bytes(merge(config, out=tmp_path / "sub", device="cpu", chunk_rows=5, progress=False).output_dir) \
        == reference


def _poisoned(model: Path, tmp_path: Path, key: str, row: int, value: float) -> Path:
    """A copy of a fine-tune with one entry of `key` (in whichever shard holds it) set to `value`."""
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / f"poisoned_{model.name}"
    shutil.copytree(model, folder)
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    tensors = load_file(folder / file)
    tensors[key][row, 3] = value
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    return folder


@built
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_non_finite_entry_in_a_full_model_is_refused_naming_model_tensor_and_rows(
        demo: Path, fine_tunes: list[Path], tmp_path: Path, value: float, method: str) -> None:
    key = "model.layers.1.mlp.down_proj.weight"
    bad = _poisoned(fine_tunes[0], tmp_path, key, row=9, value=value)
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({
        "base_model": str(demo / "base"), "method": method, "parameters": {"density": 0.5} if method == "ties" else {},
        "models": [{"path": str(fine_tunes[1])}, {"path": str(bad)}, {"path": str(fine_tunes[2])}],
        "output": {"path": str(tmp_path / "out"), "dtype": "bfloat16"}}))
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress", "--chunk-rows", "4"])
    one_line(result, f"model '{bad.name}'", f"tensor '{key}'", "holds 1 NaN/Inf value(s)", "rows 8-12")
    assert not (tmp_path / "out").exists()


@built
def test_a_merge_that_overflows_is_refused_as_before(demo: Path, fine_tunes: list[Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    key = "model.layers.0.self_attn.q_proj.weight"
    huge = _poisoned(fine_tunes[1], tmp_path, key, row=2, value=3e38)  # finite, float32: W + 2·τ overflows
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({
        "base_model": str(demo / "base"), "method": "task_arithmetic",
        "models": [{"path": str(huge), "weight": 2.0}], "output": {"path": str(tmp_path / "out")}}))
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert f"merged tensor '{key}' has inf/NaN" in result.output and result.exit_code != 0
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(kernels.ENV, "torch")
    before = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert (before.exit_code, before.output) == (result.exit_code, result.output)
