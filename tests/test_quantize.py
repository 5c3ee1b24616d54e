"""Merge, then quantize: the surviving share of ΔW under each format's own reference quantizer (issue #26)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mergekit_lite.quantize import QuantizeUnavailable, aligned_chunk_rows, format_of, measure_tensor, resolve

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

GGUF_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _bnb_names() -> list[str]:
    try:
        format_of("nf4")
    except QuantizeUnavailable:
        return []
    return ["nf4", "fp4", "int8"]


ALL_NAMES = GGUF_NAMES + _bnb_names()


def _library_roundtrip(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The library called directly on the whole tensor, as its own docs show: the reference our use must match."""
    if name.startswith("q"):
        qtype = GGMLQuantizationType[name.upper()]
        array = tensor.to(torch.float32).numpy()
        return torch.from_numpy(dequantize(quantize(array, qtype), qtype))
    import bitsandbytes.functional as F

    if name == "int8":
        q, scale, _ = F.int8_vectorwise_quant(tensor.to(torch.float16))
        return F.int8_vectorwise_dequant(q, scale).float()
    packed, state = F.quantize_4bit(tensor, blocksize=64, quant_type=name)
    return F.dequantize_4bit(packed, state).float()


def _dense_figures(name: str, base: torch.Tensor, merged: torch.Tensor) -> tuple[float, float, float]:
    """(share, cosine, error) from the definition, whole tensors, float64, through the library directly."""
    qw = _library_roundtrip(name, base).double()
    qm = _library_roundtrip(name, merged).double()
    delta = merged.double() - base.double()
    change = qm - qw
    inner = float((change * delta).sum())
    return (inner / float(delta.square().sum()),
            inner / math.sqrt(float(change.square().sum()) * float(delta.square().sum())),
            math.sqrt(float((qm - merged.double()).square().sum()) / float(delta.square().sum())))


def _rows(tensor: torch.Tensor):
    return lambda start, stop: tensor[start:stop]


def _pair(rows: int = 48, cols: int = 256, scale: float = 0.1, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=generator) * 0.02).to(dtype)
    delta = torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)
    merged = (base.float() + delta * scale * 0.02).to(dtype)
    return base, merged


@pytest.mark.parametrize("name", ALL_NAMES)
def test_our_roundtrip_is_the_librarys_dequantized_output_byte_for_byte(name):
    fmt = format_of(name)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensor = _pair(dtype=dtype)[1]
        ours = fmt.roundtrip(tensor)
        theirs = _library_roundtrip(name, tensor)
        assert ours.dtype == torch.float32
        assert ours.numpy().tobytes() == theirs.numpy().tobytes(), (name, dtype)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_row_chunks_quantize_as_the_whole_tensor(name):
    fmt = format_of(name)
    tensor = torch.randn(30, 256, generator=torch.Generator().manual_seed(3))
    whole = fmt.roundtrip(tensor)
    assert fmt.row_multiple(256) == 1
    for step in (1, 4, 7):
        pieces = torch.cat([fmt.roundtrip(tensor[s:s + step]) for s in range(0, 30, step)])
        assert pieces.numpy().tobytes() == whole.numpy().tobytes()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_figures_equal_the_dense_float64_reference(name):
    fmt = format_of(name)
    base, merged = _pair(scale=0.3)
    figures = measure_tensor(_rows(base), _rows(merged), base.shape, [fmt], chunk_rows=fmt.row_multiple(256) * 8)
    share, cosine, error = _dense_figures(name, base, merged)
    got = figures[name]
    assert got.share == pytest.approx(share, rel=1e-12, abs=1e-14)
    assert got.cosine == pytest.approx(cosine, rel=1e-12)
    assert got.error == pytest.approx(error, rel=1e-12)


def test_chunk_size_changes_no_byte_of_the_figures():
    formats = [format_of(n) for n in ALL_NAMES]
    base, merged = _pair(rows=64, cols=96 * 2, scale=0.5)  # 192 columns: nf4 blocks of 64 tile each row
    step = aligned_chunk_rows(192, formats, max_memory=1)
    results = [measure_tensor(_rows(base), _rows(merged), base.shape, formats, chunk_rows=rows)
               for rows in (step, step * 3, step * 7, 64)]
    for result in results[1:]:
        assert result == results[0]


def test_blocks_that_would_span_rows_are_not_measured():
    """bitsandbytes' 4-bit blocks run over the flattened tensor, yet its CPU dequantizer counts them per row:
    a row length that is no multiple of 64 is left out by name rather than measured wrongly."""
    if "nf4" not in ALL_NAMES:
        pytest.skip("bitsandbytes cannot run here")
    nf4 = format_of("nf4")
    assert nf4.unfit((8, 96)) == "row length 96 is not a multiple of nf4's block of 64"
    assert nf4.unfit((8, 192)) is None


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_a_change_far_above_the_step_survives_whole(name):
    base, merged = _pair(scale=1000.0)  # ΔW ~ 20x the weights: the block scales follow ΔW
    got = measure_tensor(_rows(base), _rows(merged), base.shape, [format_of(name)])[name]
    assert got.share == pytest.approx(1.0, abs=0.01)
    assert got.cosine > 0.99


def _on_grid(name: str, rows: int = 64, cols: int = 256) -> torch.Tensor:
    """A base already on the format's grid, each block's absmax entry 1.0 (a QAT base, or a dequantized model)."""
    generator = torch.Generator().manual_seed(1)
    raw = torch.rand(rows, cols, generator=generator) * 1.6 - 0.8
    raw[:, ::32] = 1.0  # the absmax of every block, positive, so q4_0's scale is -1/8 exactly
    return format_of(name).roundtrip(raw)


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_a_change_far_below_the_step_vanishes_on_a_base_that_sits_on_the_grid(name):
    fmt = format_of(name)
    base = _on_grid(name)
    generator = torch.Generator().manual_seed(2)
    delta = torch.randn(64, 256, generator=generator) * (1 / fmt.levels) * 0.01  # 1% of the step
    delta[:, ::32] = 0.0  # leave the block scales alone
    merged = base + delta
    got = measure_tensor(_rows(base), _rows(merged), base.shape, [fmt])[name]
    assert got.share == 0.0
    assert math.isnan(got.cosine)  # nothing arrives: no direction to compare
    assert got.error == pytest.approx(1.0, rel=1e-6)  # the merged weight is off by exactly the lost change


def test_a_change_far_below_the_step_arrives_only_as_noise_on_a_base_off_the_grid():
    """Off the grid, rounding dithers: on average the change arrives (s near 1) but as a few whole steps,
    so the cosine collapses and the rounding error dwarfs ΔW; the verdict reads both."""
    base, merged = _pair(rows=256, cols=512, scale=0.001)
    got = measure_tensor(_rows(base), _rows(merged), base.shape, [format_of("q4_0")])["q4_0"]
    assert 0.5 < got.share < 1.5
    assert got.cosine < 0.2
    assert got.error > 10


def test_a_change_quantization_reverses_gives_a_negative_share():
    """ΔW lifts a block's absmax (1.0 -> 1.1) and nudges the 31 other entries up by 0.01 from 7/8; the coarser
    grid then rounds each of them down by 0.05: the quantized merge moves against the change."""
    fmt = format_of("q4_0")
    base = torch.full((4, 32), 0.875)
    base[:, 0] = 1.0
    delta = torch.full((4, 32), 0.01)
    delta[:, 0] = 0.1
    merged = base + delta
    got = measure_tensor(_rows(base), _rows(merged), base.shape, [fmt])["q4_0"]
    change = fmt.roundtrip(merged).double() - fmt.roundtrip(base).double()
    assert (change[:, 1:] < 0).all()  # every nudged entry went down
    assert got.share < 0
    assert got.share == pytest.approx(_dense_figures("q4_0", base, merged)[0], rel=1e-12)
    # by hand, ignoring that q4_0 stores its scale in float16: (0.1·0.1 − 31·0.05·0.01) / (0.1² + 31·0.01²)
    assert got.share == pytest.approx((0.1 * 0.1 - 31 * 0.05 * 0.01) / (0.1 ** 2 + 31 * 0.01 ** 2), rel=0.05)


def test_a_negated_change_gives_a_negative_share():
    fmt = format_of("q8_0")
    base, merged = _pair(scale=50.0)
    flipped = measure_tensor(_rows(base), _rows(merged), base.shape, [fmt],
                             rows_of_delta=lambda a, b: base[a:b].double() - merged[a:b].double())["q8_0"]
    assert flipped.share == pytest.approx(-1.0, abs=0.01)
    assert flipped.cosine < -0.99


def test_resolve_refuses_unknown_and_unproducible_formats_by_name():
    assert [f.name for f in resolve("q8_0, Q4_0,q8_0")] == ["q8_0", "q4_0"]
    with pytest.raises(QuantizeUnavailable, match="did you mean .*'q4_0'"):
        resolve("q4_O")
    with pytest.raises(QuantizeUnavailable, match="no reference quantizer for K-/IQ-quants"):
        resolve("q4_k")
    with pytest.raises(QuantizeUnavailable, match="name at least one"):
        resolve(" , ")


def test_unfit_shapes_are_named():
    q4 = format_of("q4_0")
    assert q4.unfit((8, 48)) == "row length 48 is not a multiple of q4_0's block of 32"
    assert q4.unfit((8,)) == "1-D (only matrices are quantized)"
    assert q4.unfit((8, 64)) is None


def test_a_missing_library_is_refused_by_name(monkeypatch):
    import builtins

    from mergekit_lite.quantize import formats

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    formats._gguf_format.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    try:
        with pytest.raises(QuantizeUnavailable, match=r"q5_1: needs the gguf package, which is not installed"):
            format_of("q5_1")
    finally:
        monkeypatch.undo()
        formats._gguf_format.cache_clear()
    np.testing.assert_array_equal(format_of("q5_1").roundtrip(torch.zeros(1, 32)).numpy(), np.zeros((1, 32)))


# -------------------------------------------------------------------------------------------------------------
# merge verify OUT --quantize FORMATS
# -------------------------------------------------------------------------------------------------------------

DEMO_ADAPTERS = ("style", "math", "facts")


def _merge(demo, out, method="task_arithmetic", **output):
    from mergekit_lite import MergeConfig, merge

    data = {"base_model": str(demo / "base"), "method": method,
            "adapters": [{"path": str(demo / "adapters" / name), "weight": 1.0} for name in DEMO_ADAPTERS],
            "output": {"path": str(out), **output}}
    return Path(merge(MergeConfig.from_dict(data), device="cpu", progress=False).output_dir)


def _cli(*args):
    from click.testing import CliRunner

    from mergekit_lite.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def merged(demo, tmp_path_factory):
    """The demo's three adapters merged twice: as a checkpoint and as a PEFT adapter."""
    root = tmp_path_factory.mktemp("quantize_merges")
    return _merge(demo, root / "checkpoint"), _merge(demo, root / "adapter", format="peft")


def test_verify_quantize_writes_a_report_whose_figures_match_a_dense_reference(demo, merged, tmp_path):
    from safetensors.torch import load_file

    checkpoint, _ = merged
    report = tmp_path / "report"
    result = _cli("verify", checkpoint, "--quantize", "q8_0,q4_0", "--base", demo / "base", "--report", report,
                  "--no-progress")
    assert result.exit_code == 0, result.output
    assert "verdict: q4_0" in result.output and "verdict: q8_0" in result.output
    assert sorted(p.name for p in report.iterdir()) == [".mergekit_lite_output.json", "quantize.json", "quantize.md",
                                                        "quantize.png"]  # and our marker: a rerun may replace it
    data = json.loads((report / "quantize.json").read_text())
    base_tensors = load_file(demo / "base" / "model.safetensors")
    merged_tensors = load_file(checkpoint / "model.safetensors")
    changed = sorted(n for n, t in merged_tensors.items() if t.dim() == 2 and not torch.equal(t, base_tensors[n]))
    assert sorted(t["name"] for t in data["tensors"]) == changed
    one = data["tensors"][0]
    share, cosine, error = _dense_figures("q4_0", base_tensors[one["name"]], merged_tensors[one["name"]])
    assert one["figures"]["q4_0"]["share"] == pytest.approx(share, rel=1e-12)
    assert one["figures"]["q4_0"]["cosine"] == pytest.approx(cosine, rel=1e-12)
    assert one["figures"]["q4_0"]["error"] == pytest.approx(error, rel=1e-12)
    assert {row["layer"] for row in data["layers"]["q4_0"]} == {0, 1}
    assert set(data["verdicts"]) == {"q8_0", "q4_0"}
    assert "## Per module" in (report / "quantize.md").read_text()


def test_verify_quantize_of_a_peft_output_takes_dw_from_the_factors(demo, merged):
    from mergekit_lite.quantize import resolve
    from mergekit_lite.quantize.merged import measure_merge

    checkpoint, adapter = merged
    formats = resolve("q8_0,q4_0")
    from_checkpoint = measure_merge(checkpoint, demo / "base", formats)
    from_adapter = measure_merge(adapter, demo / "base", formats)
    assert from_adapter.kind == "peft"
    by_name = {t.name: t for t in from_checkpoint.tensors}
    assert sorted(by_name) == sorted(t.name for t in from_adapter.tensors)
    for tensor in from_adapter.tensors:
        for name in ("q8_0", "q4_0"):  # the same merge: ΔW differs only by float32 rounding of W + ΔW
            assert tensor.figures[name].share == pytest.approx(by_name[tensor.name].figures[name].share, abs=1e-4)


def test_verify_quantize_takes_the_base_from_the_merge_config(merged):
    result = _cli("verify", merged[0], "--quantize", "q8_0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "q8_0   share 1.0000" in result.output


@pytest.mark.parametrize(("formats", "message"), [
    ("q4_O", "--quantize q4_O: unknown format (did you mean"),
    ("q4_k", "no reference quantizer for K-/IQ-quants"),
])
def test_verify_quantize_refuses_a_format_in_one_line_writing_nothing(merged, tmp_path, formats, message):
    report = tmp_path / "report"
    result = _cli("verify", merged[0], "--quantize", formats, "--report", report)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_verify_quantize_refuses_a_missing_library_by_name(merged, tmp_path, monkeypatch):
    import sys

    from mergekit_lite.quantize import formats

    formats._bnb_format.cache_clear()
    formats._bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    try:
        result = _cli("verify", merged[0], "--quantize", "q8_0,nf4", "--report", tmp_path / "report")
    finally:
        formats._bnb_format.cache_clear()
        formats._bitsandbytes.cache_clear()
    assert result.exit_code == 2
    assert "--quantize nf4: needs bitsandbytes, which is not installed" in result.output
    assert list(tmp_path.iterdir()) == []


def test_verify_quantize_refuses_a_folder_that_is_no_merge(demo, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli("verify", tmp_path / "empty", "--quantize", "q8_0", "--base", demo / "base")
    assert result.exit_code == 2 and "not a merge output" in result.output
    # the base itself is a checkpoint, but nothing in it differs from the base
    result = _cli("verify", demo / "base", "--quantize", "q8_0", "--base", demo / "base",
                  "--report", tmp_path / "report")
    assert result.exit_code == 2 and "no quantizable tensor differs from the base" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_verify_quantize_never_writes_into_a_folder_that_is_not_empty(merged, tmp_path):
    report = tmp_path / "mine"
    report.mkdir()
    (report / "notes.txt").write_text("keep me")
    result = _cli("verify", merged[0], "--quantize", "q8_0", "--report", report)
    assert result.exit_code == 2 and "--report" in result.output
    assert [p.name for p in report.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("verify", merged[0], "--quantize", "q8_0", "--report", empty, "--no-progress").exit_code == 0
    assert sorted(p.name for p in empty.iterdir() if not p.name.startswith(".")) == [
        "quantize.json", "quantize.md", "quantize.png"]


# -------------------------------------------------------------------------------------------------------------
# merge eval --quantize FORMAT: the loaded model's weights quantized in memory
# -------------------------------------------------------------------------------------------------------------


def _tiny_model(demo, adapter=None):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo / "base", dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model


@pytest.mark.slow
def test_quantize_weights_replaces_each_linear_weight_by_the_librarys_roundtrip(demo):
    from mergekit_lite.quantize.model import quantize_weights

    model = _tiny_model(demo, demo / "adapters" / "math")
    before = {name: t.detach().clone() for name, t in model.named_parameters()}
    done = quantize_weights(model, format_of("q4_0"))
    after = dict(model.named_parameters())
    quantized = [n for n in before if n.endswith("base_layer.weight")]
    assert done.quantized == len(quantized) > 0 and not done.left
    for name, tensor in before.items():
        if name in quantized:
            expected = _library_roundtrip("q4_0", tensor)
            assert after[name].detach().numpy().tobytes() == expected.numpy().tobytes(), name
        else:  # LoRA factors, embeddings, norms and the head stay as they were
            assert torch.equal(after[name], tensor), name


def test_quantized_rows_patches_the_loader_only_while_open(monkeypatch):
    from types import SimpleNamespace

    from mergekit_lite.evaluation import lm_eval_runner
    from mergekit_lite.quantize.model import QuantizedRows

    layer = torch.nn.Linear(64, 4, bias=False)
    original_weight = layer.weight.detach().clone()
    monkeypatch.setattr(lm_eval_runner, "load_lm", lambda model, options: SimpleNamespace(model=layer))
    loader = lm_eval_runner.load_lm
    notes = []
    with QuantizedRows("q8_0", note=notes.append):
        lm_eval_runner.load_lm(SimpleNamespace(name="row"), None)
    assert lm_eval_runner.load_lm is loader
    assert layer.weight.detach().numpy().tobytes() == _library_roundtrip("q8_0", original_weight).numpy().tobytes()
    assert notes == ["row: 1 Linear weight(s) quantized to q8_0 in memory"]
    with QuantizedRows(None) as nothing:
        assert lm_eval_runner.load_lm is loader and nothing is None
    assert QuantizedRows(None).record() is None


def test_quantized_rows_record_what_each_row_was_scored_as(monkeypatch):
    from importlib import metadata
    from types import SimpleNamespace

    from mergekit_lite.evaluation import lm_eval_runner
    from mergekit_lite.quantize.model import SCOPE, QuantizedRows

    layers = {"base": torch.nn.Linear(64, 4), "odd": torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.Linear(4, 2))}
    monkeypatch.setattr(lm_eval_runner, "load_lm", lambda model, options: SimpleNamespace(model=layers[model.name]))
    rows = QuantizedRows("q4_0", note=lambda line: None)
    with rows:
        for name in layers:
            lm_eval_runner.load_lm(SimpleNamespace(name=name), None)
    assert rows.record() == {
        "format": "q4_0", "library": "gguf", "version": metadata.version("gguf"), "scope": SCOPE,
        "rows": {"base": {"quantized": 1, "left": []},
                 "odd": {"quantized": 1, "left": [{"module": "1", "why": "row length 4 is not a multiple of q4_0's block of 32"}]}}}


def _report(tmp_path, quantize):
    from mergekit_lite.evaluation.report import EvalReport
    from mergekit_lite.evaluation.rows import ModelSpec

    models = [ModelSpec("base", "base", tmp_path), ModelSpec("ties", "merge", tmp_path)]
    return EvalReport(out_dir=tmp_path, tasks=["add"], models=models,
                      scores={m.name: {"add": {"acc": 0.5}} for m in models}, retention={}, limit=4,
                      metrics=["acc"], lm_eval_version="test", quantize=quantize)


def test_the_eval_report_says_which_format_every_row_was_scored_as(tmp_path, monkeypatch):
    """scores.json's "quantize" (format, library, version, per row), one line of report.md, the chart's title,
    the console's last line; an unquantized report says nothing of it ("quantize": null)."""
    from mergekit_lite.evaluation import report as report_module

    monkeypatch.setattr(report_module, "write_chart", lambda report, path: path.write_bytes(b"png"))
    record = {"format": "q4_0", "library": "gguf", "version": "9.9", "scope": "what was quantized",
              "rows": {"base": {"quantized": 28, "left": []},
                       "ties": {"quantized": 27, "left": [{"module": "m.up", "why": "row length 4 is odd"}]}}}
    (tmp_path / "q").mkdir()
    report = _report(tmp_path / "q", record)
    report_module.write_report(report)
    assert json.loads((tmp_path / "q" / "scores.json").read_text())["quantize"] == record
    text = (tmp_path / "q" / "report.md").read_text()
    assert ("**Quantized: every row is scored as its `q4_0` model (gguf 9.9)**: what was quantized. Linear weights "
            "quantized per row: base 28, ties 27. Left as they were: 1 (e.g. ties: m.up, row length 4 is odd); "
            "scores.json lists them.") in text.splitlines()
    assert report_module.chart_title(report) == "lm-eval (limit 4), every row quantized to q4_0"
    assert "every row scored as its q4_0 model; report:" in report.summary()

    (tmp_path / "plain").mkdir()
    plain = _report(tmp_path / "plain", None)
    report_module.write_report(plain)
    assert json.loads((tmp_path / "plain" / "scores.json").read_text())["quantize"] is None
    assert "Quantized" not in (tmp_path / "plain" / "report.md").read_text()
    assert report_module.chart_title(plain) == "lm-eval (limit 4)" and "scored as" not in plain.summary()


@pytest.mark.slow  # about 2 s: the CLI resolves the suite's tasks
def test_merge_eval_quantize_passes_its_record_to_the_report(demo, tmp_path, monkeypatch):
    """The CLI wiring, lm-eval stood in for: each row loads through the quantizing loader, and the report the
    runner builds gets QuantizedRows.record, read after every row has loaded."""
    from types import SimpleNamespace

    from mergekit_lite.evaluation import lm_eval_runner

    seen = {}
    monkeypatch.setattr(lm_eval_runner, "load_lm", lambda model, options: SimpleNamespace(model=torch.nn.Linear(64, 4)))

    def fake_evaluate(models, out_dir, *, quantize=None, **_):
        for model in models:
            lm_eval_runner.load_lm(model, None)
        seen["record"] = quantize()
        (Path(out_dir) / "report.md").write_text("# lm-eval report\n")
        return SimpleNamespace(move_to=lambda folder: None, summary=lambda: "done")

    monkeypatch.setattr(lm_eval_runner, "evaluate_models", fake_evaluate)
    result = _cli("eval", demo / "base", "--quantize", "q8_0", "--tasks", "add", "--out", tmp_path / "report",
                  "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert seen["record"]["format"] == "q8_0" and seen["record"]["library"] == "gguf"
    assert seen["record"]["rows"] == {"base": {"quantized": 1, "left": []}}


def test_eval_quantize_refuses_a_format_before_any_work(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    result = _cli("eval", tmp_path / "model", "--quantize", "q4_k", "--out", tmp_path / "report")
    assert result.exit_code == 2
    assert "--quantize q4_k: the gguf package has no reference quantizer" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_verify_quantize_finds_a_relative_base_from_the_config_copy_wherever_it_runs(demo, tmp_path, monkeypatch):
    import shutil

    import yaml

    shutil.copytree(demo / "base", tmp_path / "models" / "base")
    shutil.copytree(demo / "adapters" / "math", tmp_path / "models" / "math")
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "merge.yaml"
    config.write_text(yaml.safe_dump({"base_model": "../models/base", "method": "task_arithmetic",
                                      "adapters": [{"path": "../models/math"}], "output": {"path": "../out/m"}}))
    assert _cli("run", config, "--no-progress").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = _cli("verify", tmp_path / "out" / "m", "--quantize", "q8_0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"against {tmp_path / 'models' / 'base'}" in result.output


@pytest.mark.slow
def test_the_near_step_table_script_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "evals/quantize_near_step.py", "--size", "128", "--formats", "q8_0,q4_0"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("| ‖ΔW‖/‖W‖ | q8_0") and len(lines) == 8


@pytest.fixture(scope="module")
def suite_ties(tmp_path_factory):
    """The README's suite merge (merge_configs/eval_ties.yaml), written to a temporary folder."""
    from mergekit_lite import merge
    from mergekit_lite.config import load_config

    repo = Path(__file__).resolve().parents[1]
    config = load_config(repo / "merge_configs" / "eval_ties.yaml")
    out = tmp_path_factory.mktemp("suite") / "ties"
    merge(config, out=out, device="cpu", progress=False)
    return out, repo / "mergekit_lite" / "evaluation" / "suite" / "base"


@pytest.mark.slow
def test_the_readme_suite_figures_of_ties(suite_ties, tmp_path):
    """The README's table row for ties, from `merge verify --quantize` as the README runs it."""
    out, base = suite_ties
    names = ["q8_0", "q4_0"] + [n for n in ("nf4", "int8") if n in ALL_NAMES]
    result = _cli("verify", out, "--quantize", ",".join(names), "--base", base, "--report", tmp_path / "r",
                  "--no-progress")
    assert result.exit_code == 0, result.output
    overall = json.loads((tmp_path / "r" / "quantize.json").read_text())["overall"]
    readme = {"q8_0": (1.000, 1.000), "q4_0": (0.998, 0.983), "nf4": (0.995, 0.980), "int8": (1.000, 1.000)}
    for name in names:
        assert round(overall[name]["share"], 3) == readme[name][0]
        assert round(overall[name]["cosine"], 3) == readme[name][1]
    assert round(overall["q4_0"]["relative_norm"], 2) == 0.71


@pytest.mark.slow
def test_merge_eval_quantize_scores_the_quantized_model(suite_ties, tmp_path):
    out, _ = suite_ties
    result = _cli("eval", out, "--quantize", "q4_0", "--tasks", "capitals", "--limit", "4", "--out",
                  tmp_path / "report", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "ties: 28 Linear weight(s) quantized to q4_0 in memory" in result.output
    recorded = json.loads((tmp_path / "report" / "scores.json").read_text())["quantize"]
    assert (recorded["format"], recorded["library"]) == ("q4_0", "gguf") and recorded["version"]
    assert recorded["rows"] == {"ties": {"quantized": 28, "left": []}}
    assert "**Quantized: every row is scored as its `q4_0` model (gguf " in (tmp_path / "report" / "report.md").read_text()


def _result_of(tensors):
    """A MergeQuantization over in-memory (name, base, merged) triples, for the report's rules."""
    from mergekit_lite.quantize.merged import MergeQuantization, TensorResult, layer_and_module

    formats = resolve("q8_0,q4_0")
    result = MergeQuantization(Path("out"), Path("base"), "checkpoint", formats)
    for name, base, merged in tensors:
        figures = measure_tensor(_rows(base), _rows(merged), base.shape, formats)
        result.tensors.append(TensorResult(name, tuple(base.shape), *layer_and_module(name), figures))
    return result


def test_verdicts_name_the_three_regimes_and_where():
    from mergekit_lite.quantize.report import layer_ranges, verdict

    grid = _on_grid("q4_0")
    small = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.001
    small[:, ::32] = 0.0
    tensors = []
    for layer in range(4):
        big_base, big_merged = _pair(scale=1000.0, seed=layer)
        tensors.append((f"model.layers.{layer}.self_attn.q_proj.weight", big_base, big_merged))
        # down_proj of layers 2-3 sits on the q4_0 grid, and its change is far below the step: erased
        base = grid if layer >= 2 else _pair(rows=64, seed=layer)[0]
        merged = base + (small if layer >= 2 else small * 1000)
        tensors.append((f"model.layers.{layer}.mlp.down_proj.weight", base, merged))
    result = _result_of(tensors)
    q4 = verdict(result, "q4_0")
    assert q4.startswith("q4_0 keeps 0% of the merge's change in mlp.down_proj layers 2–3 (under 1% of the merge's")
    # q8_0's step (1/127) is above this change too, so the advice goes past it
    assert q4.endswith("serve the merged adapter on a quantized base, or use a 16-bit model")
    q4_only = _result_of(tensors)
    q4_only.formats = [f for f in q4_only.formats if f.name == "q4_0"]
    assert verdict(q4_only, "q4_0").endswith("or use q8_0")
    assert verdict(_result_of(tensors[:1]), "q8_0").startswith("q8_0 keeps the merge's change: 100% arrives")
    noisy = [("model.layers.0.mlp.up_proj.weight", *_pair(rows=128, cols=512, scale=0.001))]
    assert "delivers the merge's change only as rounding noise in mlp.up_proj layers 0" in verdict(
        _result_of(noisy), "q4_0")
    assert layer_ranges([20, 21, 22, 3, 7, 8]) == "3, 7–8, 20–22"


# -------------------------------------------------------------------------------------------------------------
# merge inspect --quantize: adapters below a format's step
# -------------------------------------------------------------------------------------------------------------


def test_mean_step_is_the_mean_block_absmax_over_the_levels(demo):
    from safetensors.torch import load_file

    from mergekit_lite.quantize.steps import mean_step
    from mergekit_lite.sources.checkpoint import BaseCheckpoint

    tensors = load_file(demo / "base" / "model.safetensors")
    name = next(n for n, t in tensors.items() if t.dim() == 2 and n.endswith("down_proj.weight"))
    weight = tensors[name].double()
    with BaseCheckpoint(demo / "base") as base:
        for fmt_name, block, levels in (("q4_0", 32, 8), ("q8_0", 32, 127)):
            expected = float(weight.reshape(-1, block).abs().amax(dim=1).mean()) / levels
            assert mean_step(base, name, format_of(fmt_name), max_memory=weight.shape[1] * 8 * 3) == pytest.approx(
                expected, rel=1e-12)
        expected = float(weight.abs().amax(dim=1).mean()) / 127  # int8: one scale per row
        assert mean_step(base, name, format_of("int8")) == pytest.approx(expected, rel=1e-12)


def test_inspect_quantize_flags_an_adapter_below_the_step(demo, tmp_path):
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    tiny = tmp_path / "tiny"
    shutil.copytree(demo / "adapters" / "math", tiny)
    tensors = load_file(tiny / "adapter_model.safetensors")
    save_file({k: (v * 1e-4 if "lora_B" in k else v) for k, v in tensors.items()}, tiny / "adapter_model.safetensors")
    config = tmp_path / "inspect.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(demo / "base"), "adapters": [
        {"path": str(demo / "adapters" / "math")}, {"path": str(tiny)}]}))
    result = _cli("inspect", config, "--out", tmp_path / "report", "--no-plots", "--no-progress",
                  "--quantize", "q4_0,q8_0")
    assert result.exit_code == 0, result.output
    block = result.output[result.output.index("quantization steps"):].splitlines()
    assert block[1].startswith("  ok    q4_0  adapter 'math': 0/")
    assert block[2].startswith("  ok    q8_0  adapter 'math': 0/")
    assert block[3].startswith("  BELOW q4_0  adapter 'tiny'") and "(100% of its ‖τ‖²)" in block[3]
    assert "BELOW: a merge quantized to that format" in result.output


def test_inspect_quantize_refuses_an_unknown_format_before_any_work(demo, tmp_path):
    import yaml

    config = tmp_path / "inspect.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(demo / "base"),
                                      "adapters": [{"path": str(demo / "adapters" / "math")}]}))
    result = _cli("inspect", config, "--out", tmp_path / "report", "--quantize", "q3_0")
    assert result.exit_code == 2 and "--quantize q3_0: unknown format" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.yaml"]


@pytest.mark.slow
def test_a_peft_output_on_conv1d_gpt2_matches_its_checkpoint_merge(bases, tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): ΔW from the factors is transposed to the base's layout."""
    from evals.fixtures import build_adapter
    from mergekit_lite import MergeConfig, merge
    from mergekit_lite.quantize.merged import measure_merge

    adapter = build_adapter(bases["gpt2"], tmp_path / "adapter", seed=3)
    outs = {}
    for kind, output in (("checkpoint", {}), ("peft", {"format": "peft"})):
        config = MergeConfig.from_dict({"base_model": str(bases["gpt2"]), "method": "task_arithmetic",
                                        "adapters": [{"path": str(adapter)}],
                                        "output": {"path": str(tmp_path / kind), **output}})
        outs[kind] = measure_merge(Path(merge(config, device="cpu", progress=False).output_dir), bases["gpt2"],
                                   resolve("q8_0,q4_0"))
    assert outs["peft"].kind == "peft"
    by_name = {t.name: t for t in outs["checkpoint"].tensors}
    assert sorted(by_name) == sorted(t.name for t in outs["peft"].tensors) != []
    assert any("c_attn" in name for name in by_name)
    for tensor in outs["peft"].tensors:
        reference = by_name[tensor.name].figures["q4_0"]
        assert tensor.figures["q4_0"].share == pytest.approx(reference.share, abs=1e-4)
        assert tensor.figures["q4_0"].delta_sq == pytest.approx(reference.delta_sq, rel=1e-4)


def test_verify_report_and_quantize_go_together_and_apart_from_the_logit_check(merged, demo, tmp_path):
    result = _cli("verify", merged[0], "--report", tmp_path / "r")
    assert result.exit_code == 2 and "--report goes with --quantize" in result.output
    result = _cli("verify", merged[0], "--quantize", "q8_0", "--base", demo / "base", "--adapter",
                  demo / "adapters" / "math", "--report", tmp_path / "r")  # the logit check's column: no --report
    assert result.exit_code == 2 and "--report goes with --quantize and --base alone" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_report_of_ours_is_replaced_whole(merged, tmp_path):
    from mergekit_lite.writers import ownership

    report = tmp_path / "report"
    for formats in ("q8_0,q4_0", "q8_0"):
        result = _cli("verify", merged[0], "--quantize", formats, "--report", report, "--no-progress")
        assert result.exit_code == 0, result.output
    assert ownership.owner(report) == "verify"
    assert list(json.loads((report / "quantize.json").read_text())["overall"]) == ["q8_0"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left beside it
