"""Fuzzing the loaders: mutated headers, index files, adapter configs and merge configs.

Every outcome must be a success or one of our own errors (MergeError) — never another exception, a hang or a
crash. And an input the mutations left as it was must load: each property runs the unmutated input first (an
@example) and whenever a draw changes nothing, so a loader that refuses everything fails. Each property runs a
fixed number of examples; under the "ci" Hypothesis profile (scripts/test.sh) they are derandomized, so CI sees
the same inputs every time, while the "dev" profile draws new ones on every run.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mergekit_lite.engine.plan import build_plan

from mergekit_lite.config import MergeConfig
from mergekit_lite.errors import MergeError
from mergekit_lite.sources.adapter import PeftAdapter
from mergekit_lite.sources.checkpoint import BaseCheckpoint

from .conftest import DEMO

#: examples per property; the README's Reliability section quotes the total
EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@contextmanager
def scratch_demo() -> Iterator[Path]:
    """A private copy of the demo per example (hypothesis cannot use function-scoped fixtures)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "demo"
        shutil.copytree(DEMO, root)
        yield root


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def read_everything(base: BaseCheckpoint) -> None:
    """What a merge does with a base: read every tensor's rows and bytes."""
    for info in base:
        if info.nbytes:
            base.read_bytes(info.name, 0, info.nbytes)
        base.read_rows(info.name, 0, info.rows)


def load_base(root: Path) -> bool:
    """Open the base and read all of it: True when it loaded, False on one of our errors (anything else raises)."""
    try:
        base = BaseCheckpoint(root / "base")
        try:
            read_everything(base)
        finally:
            base.close()
    except MergeError:
        return False
    return True


def load_adapter(root: Path) -> bool:
    """Plan the style adapter on the base and read its tensors: True when it loaded, False on one of our errors."""
    try:
        base = BaseCheckpoint(root / "base")
        adapter = PeftAdapter(root / "adapters" / "style", "style")
        try:
            build_plan(base, [adapter], None)
            for key in adapter.keys:
                adapter.tensor(key)
        finally:
            adapter.close()
            base.close()
    except MergeError:
        return False
    return True


LOADERS = {"base": load_base, "adapter": load_adapter}
FILES = {"base": "base/model.safetensors", "adapter": "adapters/style/adapter_model.safetensors"}


header_edits = st.one_of(
    st.tuples(st.just("field"), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values),
    st.tuples(st.just("entry"), st.just(""), json_values),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"]), st.none()),
    st.tuples(st.just("metadata"), st.just(""), json_values),
    st.tuples(st.just("offset"), st.integers(0, 1), st.integers(-5, 20000)),
)


@pytest.mark.slow
@FUZZ
@given(target=st.sampled_from(["base", "adapter"]), tensor=st.integers(0, 40), edits=st.lists(header_edits, max_size=3))
@example(target="base", tensor=0, edits=[]).via("the unmutated base")
@example(target="adapter", tensor=0, edits=[]).via("the unmutated adapter")
def test_mutated_safetensors_headers_load_or_fail_with_our_error(target: str, tensor: int, edits: list) -> None:
    with scratch_demo() as root:
        path = root / FILES[target]
        header, data = split(path)
        original = json.loads(json.dumps(header))
        names = [k for k in header if k != "__metadata__"]
        name = names[tensor % len(names)]
        for kind, field, value in edits:
            if kind == "field" and isinstance(header[name], dict):
                header[name][field] = value
            elif kind == "entry":
                header[name] = value
            elif kind == "drop" and isinstance(header[name], dict):
                header[name].pop(field, None)
            elif kind == "metadata":
                header["__metadata__"] = value
            elif kind == "offset" and isinstance(header[name], dict) and isinstance(header[name].get("data_offsets"), list) \
                    and len(header[name]["data_offsets"]) == 2:
                header[name]["data_offsets"][field] = value
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        loaded = LOADERS[target](root)
        assert loaded or header != original, "an unchanged header (re-encoded) was refused"


@pytest.mark.slow
@FUZZ
@given(target=st.sampled_from(["base", "adapter"]), position=st.integers(0, 10**6), value=st.integers(0, 255),
       cut=st.none() | st.integers(0, 10**6))
@example(target="base", position=0, value=-1, cut=None).via("the unmutated base")
@example(target="adapter", position=0, value=-1, cut=None).via("the unmutated adapter")
def test_flipped_or_truncated_safetensors_bytes_load_or_fail_with_our_error(
    target: str, position: int, value: int, cut: int | None
) -> None:
    with scratch_demo() as root:
        path = root / FILES[target]
        original = path.read_bytes()
        raw = bytearray(original)
        (length,) = struct.unpack("<Q", raw[:8])
        if value >= 0:  # -1 (the unmutated examples only): no byte changed
            raw[position % (8 + length)] = value  # damage the prefix or the header, where parsing happens
        damaged = bytes(raw[: cut % len(raw)] if cut is not None else raw)
        path.write_bytes(damaged)
        loaded = LOADERS[target](root)
        assert loaded or damaged != original, "the unchanged file was refused"


shard_names = st.sampled_from([
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "../model.safetensors",
    "/etc/passwd", "", ".", "sub/../model-00001-of-00002.safetensors", "model.safetensors", "missing.safetensors",
    "..\\model.safetensors", "model-00001-of-00002.bin",
])


@pytest.mark.slow
@FUZZ
@given(
    moves=st.dictionaries(st.integers(0, 40), shard_names | st.text(max_size=10) | json_values, max_size=4),
    extra=st.dictionaries(st.text(max_size=10), shard_names, max_size=2),
    whole=st.none() | json_values,
)
@example(moves={}, extra={}, whole=None).via("the base split in two shards, with a correct index")
def test_mutated_index_files_load_or_fail_with_our_error(moves: dict, extra: dict, whole: Any) -> None:
    from safetensors.torch import load_file, save_file

    with scratch_demo() as root:
        base = root / "base"
        tensors = load_file(base / "model.safetensors")
        names = sorted(tensors)
        weight_map: dict[str, Any] = {}
        for number, members in enumerate((names[:10], names[10:]), start=1):
            shard = f"model-0000{number}-of-00002.safetensors"
            save_file({n: tensors[n] for n in members}, base / shard)
            weight_map.update({n: shard for n in members})
        (base / "model.safetensors").unlink()
        correct = {"metadata": {}, "weight_map": dict(weight_map)}
        for index, shard in moves.items():
            weight_map[names[index % len(names)]] = shard
        weight_map.update(extra)
        document = {"metadata": {}, "weight_map": weight_map} if whole is None else whole
        (base / "model.safetensors.index.json").write_text(json.dumps(document))
        loaded = load_base(root)
        assert loaded or document != correct, "a correct index over two shards was refused"


config_fields = st.sampled_from([
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "use_rslora", "use_dora", "lora_bias",
    "init_lora_weights", "target_modules", "target_parameters", "layer_replication", "modules_to_save",
    "fan_in_fan_out", "trainable_token_indices",
])


@pytest.mark.slow
@FUZZ
@given(changes=st.dictionaries(config_fields, json_values, max_size=4), whole=st.none() | json_values)
@example(changes={}, whole=None).via("the unmutated adapter config")
def test_mutated_adapter_configs_load_or_fail_with_our_error(changes: dict, whole: Any) -> None:
    with scratch_demo() as root:
        path = root / "adapters" / "style" / "adapter_config.json"
        original = json.loads(path.read_text())
        config = {**original, **changes}
        written = config if whole is None else whole
        path.write_text(json.dumps(written))
        loaded = load_adapter(root)
        assert loaded or written != original, "the unchanged adapter config was refused"


UNMUTATED_MERGE_CONFIG = {"base_model": "base", "method": "ties", "parameters": {"density": 0.5},
                          "adapters": [{"path": "a"}, {"path": "b"}], "output": {"path": "out"}}
merge_keys = st.sampled_from(["base_model", "method", "parameters", "adapters", "output", "seed", "eval", "extra"])


@pytest.mark.slow
@FUZZ
@given(changes=st.dictionaries(merge_keys, json_values | st.sampled_from(["ties", "linear", "dare_ties"]), max_size=3),
       adapter_changes=st.dictionaries(st.sampled_from(["path", "weight", "name", "density", "epsilon", "x"]),
                                       json_values, max_size=3),
       params=st.dictionaries(st.sampled_from(["density", "normalize", "lambda", "epsilon", "rescale"]), json_values,
                              max_size=3))
@example(changes={}, adapter_changes={}, params={}).via("the unmutated merge config")
def test_mutated_merge_configs_parse_or_fail_with_our_error(changes: dict, adapter_changes: dict, params: dict) -> None:
    data: dict[str, Any] = copy.deepcopy(UNMUTATED_MERGE_CONFIG)
    data["parameters"].update(params)
    data["adapters"][0].update(adapter_changes)
    data.update(changes)
    try:
        MergeConfig.from_dict(data).to_yaml()
        parsed = True
    except MergeError:
        parsed = False
    assert parsed or data != UNMUTATED_MERGE_CONFIG, "the unchanged merge config was refused"


def test_readme_quotes_the_number_of_fuzzed_inputs() -> None:
    properties = [name for name, value in globals().items() if name.startswith("test_mutated") or
                  name.startswith("test_flipped")]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(properties) * EXAMPLES} fuzzed inputs" in readme
