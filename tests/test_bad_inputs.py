"""The catalogue of bad inputs: each one stops `merge run` with exit 2 and one line naming what to fix.

Every case damages a private copy of the demo (base + adapters) or writes a bad config, runs the CLI, and
checks the same four things: exit code 2, a single `error:` line on stderr that contains the expected words,
no traceback, and nothing left at (or beside) the output path.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_lite.cli import main

from .configs import config_data
from .conftest import write_config

BASE_FILE = "base/model.safetensors"
STYLE = "adapters/style"
STYLE_FILE = f"{STYLE}/adapter_model.safetensors"
STYLE_CONFIG = f"{STYLE}/adapter_config.json"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


# -- helpers that damage files ------------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, data bytes) of a safetensors file, parsed by hand so tests can write broken ones."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path: Path, header: Any, data: bytes, header_bytes: bytes | None = None) -> None:
    """Write a safetensors file from a (possibly invalid) header object and data bytes."""
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(relative: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A damage that rewrites one file's header in place."""

    def damage(root: Path) -> None:
        header, data = read_raw(root / relative)
        change(header)
        write_raw(root / relative, header, data)

    return damage


def edit_json(relative: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """A damage that rewrites a JSON file (the change may return a whole new document)."""

    def damage(root: Path) -> None:
        path = root / relative
        document = json.loads(path.read_text())
        replaced = change(document)
        path.write_text(json.dumps(document if replaced is None else replaced))

    return damage


def shard_base(root: Path, weight_map_edit: Callable[[dict[str, str]], None] | None = None) -> None:
    """Split the base into two shards with an index (optionally edited afterwards)."""
    base = root / "base"
    tensors = load_file(base / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    weight_map = {}
    for shard, members in halves.items():
        save_file({n: tensors[n] for n in members}, base / shard)
        weight_map.update({n: shard for n in members})
    (base / "model.safetensors").unlink()
    if weight_map_edit:
        weight_map_edit(weight_map)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def set_entry(relative: str, tensor: str, **fields: Any) -> Callable[[Path], None]:
    return edit_header(relative, lambda h: h[tensor].update(fields))


def truncate(relative: str, keep: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def set_prefix(relative: str, length: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        path.write_bytes(struct.pack("<Q", length) + path.read_bytes()[8:])

    return damage


def replace_header_bytes(relative: str, header_bytes: bytes) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        _, data = read_raw(root / relative)
        write_raw(root / relative, None, data, header_bytes)

    return damage


def overlap(header: dict[str, Any]) -> None:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


def poison_adapter(value: float) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        tensors = load_file(root / STYLE_FILE)
        tensors[Q_PROJ_A][0, 0] = value
        save_file(tensors, root / STYLE_FILE)

    return damage


def rename_adapter_module(root: Path) -> None:
    tensors = load_file(root / STYLE_FILE)
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v for k, v in tensors.items()}
    save_file(renamed, root / STYLE_FILE)


def integer_factor(root: Path) -> None:
    tensors = load_file(root / STYLE_FILE)
    tensors[Q_PROJ_A] = tensors[Q_PROJ_A].to(torch.int32)
    save_file(tensors, root / STYLE_FILE)


def symlinked_shard(root: Path) -> None:
    outside = root / "elsewhere.safetensors"

    def redirect(weight_map: dict[str, str]) -> None:
        (root / "base" / "model-00002-of-00002.safetensors").rename(outside)
        (root / "base" / "model-00002-of-00002.safetensors").symlink_to(outside)

    shard_base(root, redirect)


def widen_q_proj(root: Path) -> None:
    """Cut the base's q_proj to 32 rows so the style adapter (64 rows) no longer fits: another base's adapter."""
    tensors = load_file(root / BASE_FILE)
    tensors[Q_PROJ] = tensors[Q_PROJ][:32].clone()
    save_file(tensors, root / BASE_FILE)


def remove(relative: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()

    return damage


# -- the catalogue ------------------------------------------------------------------------------------
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # base checkpoint: files and safetensors layout
    "base folder missing": (remove("base"), "base model folder not found"),
    "base weights missing": (remove(BASE_FILE), "no model.safetensors"),
    "base file shorter than its prefix": (truncate(BASE_FILE, 5), "too short for a safetensors header"),
    "base data truncated": (truncate(BASE_FILE, -100), "truncated file or corrupt header"),
    "base header truncated": (truncate(BASE_FILE, 40), "(truncated)"),
    "base header oversized": (set_prefix(BASE_FILE, 2**40), "implausibly large"),
    "base header not JSON": (replace_header_bytes(BASE_FILE, b"{not json"), "not valid JSON"),
    "base header not an object": (replace_header_bytes(BASE_FILE, b"[1, 2]"), "not an object"),
    "base header deeply nested": (replace_header_bytes(BASE_FILE, b"[" * 100000), "not valid JSON"),
    "base offsets out of range": (set_entry(BASE_FILE, Q_PROJ, data_offsets=[0, 10**12]), "lie outside"),
    "base offsets negative": (set_entry(BASE_FILE, Q_PROJ, data_offsets=[-8, 0]), "non-negative integers"),
    "base offsets overlap": (edit_header(BASE_FILE, overlap), "overlap"),
    "base unknown dtype": (set_entry(BASE_FILE, Q_PROJ, dtype="F42"), "unknown dtype 'F42'"),
    "base shape disagrees with offsets": (set_entry(BASE_FILE, Q_PROJ, shape=[64, 65]), "needs 16640 bytes"),
    "base shape not integers": (set_entry(BASE_FILE, Q_PROJ, shape=[64, "64"]), "not a list of non-negative"),
    "base metadata not strings": (edit_header(BASE_FILE, lambda h: h.update({"__metadata__": {"a": 1}})),
                                  "__metadata__"),
    # base checkpoint: sharded index
    "index names a parent path": (lambda r: shard_base(r, lambda m: m.update({Q_PROJ: "../model.safetensors"})),
                                  "not a plain relative file name"),
    "index names an absolute path": (lambda r: shard_base(r, lambda m: m.update({Q_PROJ: "/etc/passwd"})),
                                     "not a plain relative file name"),
    "index shard is a symlink leaving the folder": (symlinked_shard, "outside the model folder"),
    "index names a missing shard": (
        lambda r: shard_base(r, lambda m: m.update({Q_PROJ: "model-00003-of-00002.safetensors"})), "does not exist"),
    "index names a tensor no shard has": (lambda r: shard_base(r, lambda m: m.update({"ghost.weight": m[Q_PROJ]})),
                                          "'ghost.weight' is in model-"),
    "index is not JSON": (lambda r: (shard_base(r), (r / "base/model.safetensors.index.json").write_text("{")),
                          "not a valid weights index"),
    "index weight_map is a list": (lambda r: (shard_base(r), (r / "base/model.safetensors.index.json").write_text(
        '{"weight_map": ["a"]}')), "'weight_map' must map tensor names"),
    # adapters
    "adapter folder missing": (remove(STYLE), "adapter folder not found"),
    "adapter config missing": (remove(STYLE_CONFIG), "no adapter_config.json"),
    "adapter weights missing": (remove(STYLE_FILE), "no adapter_model.safetensors"),
    "adapter config not JSON": (lambda r: (r / STYLE_CONFIG).write_text("{'r': 4"), "not valid JSON"),
    "adapter config not an object": (edit_json(STYLE_CONFIG, lambda c: [c]), "must be a JSON object"),
    "adapter rank not an integer": (edit_json(STYLE_CONFIG, lambda c: c.update(r="four")), "'r' must be a positive"),
    "adapter rank zero": (edit_json(STYLE_CONFIG, lambda c: c.update(r=0)), "'r' must be a positive"),
    "adapter rank disagrees with tensors": (edit_json(STYLE_CONFIG, lambda c: c.update(r=8)),
                                            "rank 4 in its tensors but the config"),
    "adapter alpha not a number": (edit_json(STYLE_CONFIG, lambda c: c.update(lora_alpha="8")),
                                   "'lora_alpha' must be a finite number"),
    "adapter rank_pattern bad regex": (edit_json(STYLE_CONFIG, lambda c: c.update(rank_pattern={"q_proj(": 4})),
                                       "not a valid regular expression"),
    "adapter unsupported feature": (edit_json(STYLE_CONFIG, lambda c: c.update(peft_type="IA3")),
                                    "only LoRA adapters"),
    "adapter for another base": (widen_q_proj, "makes a 64x64 delta but base tensor"),
    "adapter targets a module the base lacks": (rename_adapter_module, "no base tensor 'model.layers.0.self_attn.qq_"),
    "adapter holds NaN": (poison_adapter(float("nan")), "holds 1 NaN/Inf value(s)"),
    "adapter holds Inf": (poison_adapter(float("inf")), "holds 1 NaN/Inf value(s)"),
    "adapter factor is not float": (integer_factor, "is not floating point"),
    "adapter weights truncated": (truncate(STYLE_FILE, -16), "truncated file or corrupt header"),
    "adapter pickle without opt-in": (lambda r: (r / STYLE_FILE).rename(r / STYLE / "adapter_model.bin"),
                                      "--allow-pickle"),
}


def demo_config(root: Path, out: Path) -> dict[str, Any]:
    """The mapping (for the tests to damage) of a task arithmetic merge of style and facts (weight 0.5)."""
    return config_data(root / "base", [{"path": root / STYLE}, {"path": root / "adapters" / "facts", "weight": 0.5}], out)


def assert_clean_refusal(result: Any, expected: str, out: Path) -> None:
    """Exit 2, one `error:` line with the expected words, no traceback, nothing at or beside the output."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_with_one_line_naming_what_to_fix(case: str, demo_copy: Path, tmp_path: Path) -> None:
    damage, expected = CASES[case]
    damage(demo_copy)
    out = tmp_path / "outputs" / "merged"
    config = write_config(tmp_path, demo_config(demo_copy, out))
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert_clean_refusal(result, expected, out)


BAD_CONFIGS: dict[str, tuple[bytes, str]] = {
    "yaml syntax error": (b"base_model: [unclosed\n", "not valid YAML"),
    "yaml is a list": (b"- base_model: x\n", "must be a mapping"),
    "yaml is a scalar": (b"just words\n", "must be a mapping"),
    "yaml too large": (b"# " + b"x" * (2 * 1024 * 1024) + b"\n", "too large for a merge config"),
    "yaml alias bomb": (
        b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + b"".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi"))
        + b"base_model: *i\n",
        "expands to more than",
    ),
    "yaml not utf-8": (b"base_model: \xff\xfe\n", "not UTF-8"),
    "yaml deeply nested": (b"[" * 5000 + b"]" * 5000, "not valid YAML"),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case == "yaml deeply nested" else case
                                  for case in BAD_CONFIGS])  # 5000 levels of YAML take a second to refuse
def test_bad_config_file_stops_with_one_line(case: str, tmp_path: Path) -> None:
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "config.yaml"
    config.write_bytes(text)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(out)])
    assert_clean_refusal(result, expected, out)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "merged")])
    assert_clean_refusal(result, "cannot read config", tmp_path / "merged")


def test_catalogue_size_is_what_the_readme_says() -> None:
    """The README's Reliability section quotes how many bad inputs the suite tries; keep them in step."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    total = len(CASES) + len(BAD_CONFIGS) + 1
    assert f"{total} bad inputs" in readme, f"README should say '{total} bad inputs'"


@pytest.fixture
def pickled_demo(demo_copy: Path) -> Path:
    """The demo with its base and the style adapter saved as torch pickles (zip format)."""
    base = demo_copy / "base"
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    adapter = demo_copy / STYLE
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    return demo_copy


def test_pickled_inputs_merge_only_with_the_opt_in_and_match_safetensors(
    pickled_demo: Path, demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "from_pickle"
    config = write_config(tmp_path, demo_config(pickled_demo, out))
    refused = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    assert_clean_refusal(refused, "--allow-pickle", out)
    allowed = CliRunner().invoke(main, ["run", str(config), "--no-progress", "--allow-pickle", "--device", "cpu"])
    assert allowed.exit_code == 0, allowed.output
    reference = tmp_path / "from_safetensors"
    config = write_config(tmp_path, demo_config(demo, reference), name="reference.yaml")
    assert CliRunner().invoke(main, ["run", str(config), "--no-progress", "--device", "cpu"]).exit_code == 0
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


class _RunsCode:
    """A pickle payload that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_malicious_pickle_is_refused_even_with_the_opt_in(where: str, demo_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    if where == "base":
        (demo_copy / BASE_FILE).unlink()
        torch.save({"x": _RunsCode(marker)}, demo_copy / "base" / "pytorch_model.bin")
    else:
        (demo_copy / STYLE_FILE).unlink()
        torch.save({"x": _RunsCode(marker)}, demo_copy / STYLE / "adapter_model.bin")
    out = tmp_path / "merged"
    config = write_config(tmp_path, demo_config(demo_copy, out))
    result = CliRunner().invoke(main, ["run", str(config), "--no-progress", "--allow-pickle"])
    assert_clean_refusal(result, "refused by torch.load(weights_only=True)", out)
    assert not marker.exists()


#: mergekit YAML whose values have the wrong shape (#23): one line naming the key, exit 2, nothing written
MERGEKIT_BAD: dict[str, tuple[str, str]] = {
    "weight a mapping": ("merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: {a: 1}}}\n",
                         "mergekit key 'models[0].parameters.weight': expected a number"),
    "parameters a string": ("merge_method: task_arithmetic\nbase_model: base\nparameters: \"lambda=1\"\n"
                            "models:\n  - {model: base, parameters: {weight: 1}}\n",
                            "mergekit key 'parameters': must be a mapping"),
    "model parameters a list": ("merge_method: task_arithmetic\nbase_model: base\n"
                                "models:\n  - {model: base, parameters: [weight, 1]}\n",
                                "mergekit key 'models[0].parameters': must be a mapping"),
    "slice parameters a list": ("merge_method: slerp\nbase_model: base\nslices:\n  - sources: [{model: base, "
                                "layer_range: [0, 2]}]\n    parameters: [t, 0.5]\n",
                                "mergekit key 'slices[0].parameters': must be a mapping"),
}


@pytest.mark.parametrize("case", list(MERGEKIT_BAD))
@pytest.mark.parametrize("command", ["run", "convert"])
def test_mergekit_values_of_the_wrong_shape_stop_with_one_line(case: str, command: str, tmp_path: Path) -> None:
    text, expected = MERGEKIT_BAD[case]
    config = tmp_path / "mergekit.yml"
    config.write_text(text)
    out = tmp_path / "merged"
    args = ["run", str(config), "--out", str(out)] if command == "run" else ["convert", str(config)]
    assert_clean_refusal(CliRunner().invoke(main, args), expected, out)


# -- data-aware merging (`method: learned`, issue #24): calibration data and training settings -----------------
def _calibration(root: Path, text: str | bytes, name: str = "prompts.jsonl") -> str:
    path = root / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def _only_test_task(root: Path) -> str:
    (root / "only_test.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    path = root / "only_test.yaml"
    path.write_text(f"task: only_test_calib\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {root / 'only_test.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
                    "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \" {{answer}}\"\n")
    return str(path)


LEARNED_BAD: dict[str, tuple[Callable[[Path], dict[str, Any]], str]] = {
    "adapter without calibration data": (lambda r: {}, "adapters[0]: no calibration data"),
    "calibration file missing": (lambda r: {"calibration": str(r / "nope.jsonl")}, "does not exist"),
    "calibration file empty": (lambda r: {"calibration": _calibration(r, "")}, "holds no prompts"),
    "calibration file not utf-8": (lambda r: {"calibration": _calibration(r, b"\xff\xfe{}\n")}, "not UTF-8"),
    "calibration row not JSON": (lambda r: {"calibration": _calibration(r, "{oops\n")}, "line 1 is not JSON"),
    "calibration rows without a usable field": (lambda r: {"calibration": _calibration(r, '{"question": "q"}\n')},
                                                "no 'prompt' or 'text' field"),
    "calibration template names a missing field": (
        lambda r: {"calibration": _calibration(r, '{"question": "q"}\n'), "calibration_template": "{{query}}"},
        "no field 'query'"),
    "calibration file of an unknown kind": (lambda r: {"calibration": _calibration(r, "x", "p.csv")},
                                            "must end in .jsonl, .txt or .yaml"),
    "calibration task with only a test split": (lambda r: {"calibration": _only_test_task(r)}, "has only a test split"),
    "steps negative": (lambda r: {"steps": -1}, "'steps' must be a whole number"),
    "lr zero": (lambda r: {"lr": 0}, "'lr' must be in (0, 1000]"),
    "batch_size zero": (lambda r: {"batch_size": 0}, "'batch_size' must be a positive whole number"),
    "init_method not linear": (lambda r: {"init_method": "ties"}, "'init_method' starts λ from a linear method"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if "task" in c else c for c in LEARNED_BAD])
def test_learned_bad_calibration_or_settings_stop_with_one_line(case: str, demo: Path, tmp_path: Path) -> None:
    make, expected = LEARNED_BAD[case]
    settings = make(tmp_path)
    good = _calibration(tmp_path, '{"prompt": "Q: hello\\nA:"}\n', "good.jsonl")
    per_adapter = {k: v for k, v in settings.items() if k.startswith("calibration")}
    data = {
        "base_model": str(demo / "base"),
        "method": "learned",
        "parameters": {"steps": 1, "max_new_tokens": 2, **{k: v for k, v in settings.items() if k not in per_adapter}},
        "adapters": [{"path": str(demo / STYLE), **per_adapter},
                     {"path": str(demo / "adapters" / "facts"), "calibration": good}],
        "output": {"path": str(tmp_path / "outputs" / "merged")},
    }
    if case != "adapter without calibration data" and "calibration" not in per_adapter:
        data["adapters"][0]["calibration"] = good
    out = tmp_path / "outputs" / "merged"
    config = write_config(tmp_path, data)
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"],
                                env={"MERGEKIT_LITE_CACHE": str(tmp_path / "cache")})
    assert_clean_refusal(result, expected, out)
