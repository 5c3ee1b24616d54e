"""One vocabulary each: the output dtypes (formats/safetensors.DTYPES) and the layer index of a tensor name
(methods/gradients.LAYER_INDEX), the same for the config, the writers, `merge convert`, gradients and inspect."""

from __future__ import annotations

from typing import get_args

import pytest

from mergekit_lite.config import OutputDtype
from mergekit_lite.formats.safetensors import DTYPES, dtype_code
from mergekit_lite.inspection.analyse import layer_of
from mergekit_lite.methods.gradients import layer_count, layer_index, layer_position


def test_the_config_accepts_exactly_the_output_dtypes_dtypes_names() -> None:
    names = [d.config_name for d in DTYPES.values() if d.config_name]
    assert list(get_args(OutputDtype)) == names
    assert [dtype_code(n) for n in names] == ["F32", "F16", "BF16"]


def test_merge_convert_refuses_an_output_dtype_outside_the_vocabulary() -> None:
    from mergekit_lite.compat.mergekit import convert
    from mergekit_lite.errors import MergeConfigError

    data = {"merge_method": "linear", "base_model": "base", "dtype": "float64",
            "models": [{"model": "ft_a", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeConfigError, match=r"\(float32, float16, bfloat16\)"):
        convert(data)


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.3.self_attn.q_proj.weight", 3),       # Llama, Mistral
    ("transformer.h.11.attn.c_attn.weight", 11),          # GPT-2
    ("encoder.layer.2.attention.self.query.weight", 2),   # BERT
    ("encoder.block.3.layer.1.DenseReluDense.wi.weight", 3),  # T5: the block, not its sub-layer
    ("model.blocks.0.mlp.weight", 0),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.norm.weight", None),
    ("model.sublayers.3.weight", None),                   # a word that merely ends in 'layers' is not a block
])
def test_gradients_and_inspect_read_the_same_layer_index(name: str, index: int | None) -> None:
    assert layer_of(name) == layer_index(name) == index
    expected = 0.0 if index is None else index / 11
    assert layer_position(name, 12) == pytest.approx(expected)


def test_the_layer_count_is_the_largest_block_index_plus_one() -> None:
    assert layer_count(["encoder.block.0.layer.0.x.weight", "encoder.block.5.layer.2.x.weight", "shared.weight"]) == 6
