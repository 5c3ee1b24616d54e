"""formats/peft.py: PEFT's adapter layout declared once; the writer's keys parse with the reader's grammar."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from mergekit_lite import merge
from mergekit_lite.formats import peft

from .configs import demo_config


def test_factor_keys_parse_with_the_key_grammar_and_give_the_module_back() -> None:
    for embedding in (False, True):
        for key in peft.factor_keys("model.layers.3.self_attn.q_proj", embedding):
            assert key.startswith(peft.KEY_PREFIX)
            match = peft.LORA_KEY.match(key[len(peft.KEY_PREFIX):])
            assert match is not None and match["module"] == "model.layers.3.self_attn.q_proj"
    assert peft.module_of("base_model.model.a.b.lora_B.bias", ".lora_B.bias") == "a.b"
    assert peft.BASE_LAYER_KEY.match("lm_head.base_layer.weight")["module"] == "lm_head"  # type: ignore[index]


def test_is_adapter_folder_needs_an_adapter_config_and_no_model_config(tmp_path: Path) -> None:
    assert not peft.is_adapter_folder(tmp_path)
    (tmp_path / peft.CONFIG_FILE).write_text("{}")
    assert peft.is_adapter_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not peft.is_adapter_folder(tmp_path)


def test_a_written_adapter_is_recognised_and_every_key_follows_the_grammar(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "task_arithmetic", output={"format": "peft"})
    folder = merge(config, device="cpu", progress=False).output_dir
    assert peft.is_adapter_folder(folder) and (folder / peft.WEIGHTS_FILE).is_file()
    with safe_open(folder / peft.WEIGHTS_FILE, "pt") as tensors:
        keys = list(tensors.keys())
    assert keys and all(k.startswith(peft.KEY_PREFIX) and peft.LORA_KEY.match(k[len(peft.KEY_PREFIX):]) for k in keys)
    assert not peft.is_adapter_folder(demo / "base")
