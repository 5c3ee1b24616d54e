"""Fast checks that the offline fixture builders make real, deterministic checkpoints and PEFT adapters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evals.fixtures import (  # noqa: E402
    LLAMA_LINEAR,
    VARIANTS,
    build_adapter,
    build_demo,
    build_tiny_llama,
    make_tokenizer,
)

PREFIX = "base_model.model."


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, for byte comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, without loading the data."""
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def adapters(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter per Llama variant plus the GPT-2 LoRA, keyed by variant (``gpt2`` for GPT-2)."""
    root = tmp_path_factory.mktemp("fixture_adapters")
    out = {v: build_adapter(bases["llama_bias" if v == "bias" else "llama"], root / v, v) for v in VARIANTS}
    out["gpt2"] = build_adapter(bases["gpt2"], root / "gpt2", "lora")
    return out


def _config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def _keys(adapter: Path) -> dict[str, tuple[int, ...]]:
    return _shapes(adapter / "adapter_model.safetensors")


# --- demo ------------------------------------------------------------------------------------------


def test_demo_builds_byte_identical_files_twice(tmp_path: Path) -> None:
    a, b = build_demo(tmp_path / "a"), build_demo(tmp_path / "b")
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    assert {"base/model.safetensors", "adapters/style/adapter_model.safetensors",
            "adapters/math/adapter_config.json", "adapters/facts/adapter_model.safetensors"} <= set(files_a)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two builds"
    assert sum(len(v) for v in files_a.values()) < 1_500_000


#: stamps other libraries write into the files they save; a new release changes them, the project does not
FOREIGN_STAMPS = frozenset({"transformers_version", "peft_version"})
#: adapter_config.json keys the demo builder decides (they must be in both files and equal)
DECIDED_ADAPTER_KEYS = ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "peft_type", "use_dora",
                        "use_rslora", "bias", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save")


def _common_json(a: object, b: object, where: str) -> None:
    """Assert that `a` and `b` agree wherever both define a value (keys one release adds or drops are not ours)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted((a.keys() & b.keys()) - FOREIGN_STAMPS):
            _common_json(a[key], b[key], f"{where}.{key}")
        return
    assert a == b, f"{where}: {a!r} != {b!r}"


def _tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes): what the file holds, not how it is laid out."""
    return {name: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            for name, t in load_file(path).items()}


def test_committed_demo_matches_the_builder(tmp_path: Path) -> None:
    """The committed evals/demo was built in another process (other hash seed) and maybe other library releases:
    every tensor must be bit-identical and every JSON value both builds write must agree, version stamps aside.
    (PEFT's README card is PEFT's template, not ours: only its presence is compared.)"""
    committed = REPO / "evals" / "demo"
    if not (committed / "base" / "model.safetensors").exists():
        pytest.skip("evals/demo not built; run python evals/fixtures.py --out evals/demo")
    fresh_root = build_demo(tmp_path / "demo")
    fresh, old = _files(fresh_root), _files(committed)
    assert sorted(fresh) == sorted(old)
    for name in fresh:
        if name.endswith(".safetensors"):
            assert _tensor_bytes(fresh_root / name) == _tensor_bytes(committed / name), f"{name}: tensors differ"
        elif name.endswith(".json"):
            new_json, old_json = json.loads(fresh[name]), json.loads(old[name])
            if name.endswith("adapter_config.json"):
                for key in DECIDED_ADAPTER_KEYS:
                    assert key in new_json and key in old_json, f"{name}: '{key}' missing"
            _common_json(new_json, old_json, name)


def test_version_stamps_do_not_fail_the_demo_comparison() -> None:
    """The normalisation itself: a changed stamp or an added key passes, a changed value of ours fails."""
    old = {"r": 4, "peft_version": "0.21.2", "nested": {"transformers_version": "5.23.0", "hidden_size": 64}}
    _common_json({**old, "peft_version": "9.9", "new_key": None,
                  "nested": {"transformers_version": "9.9", "hidden_size": 64}}, old, "x")
    with pytest.raises(AssertionError, match="hidden_size"):
        _common_json({**old, "nested": {"hidden_size": 65}}, old, "x")


def test_demo_adapters_differ_by_seed_and_record_a_relative_base(tmp_path: Path) -> None:
    root = build_demo(tmp_path / "demo")
    tensors = {n: load_file(root / "adapters" / n / "adapter_model.safetensors") for n in ("style", "math", "facts")}
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.equal(tensors["style"][key], tensors["math"][key])
    assert not torch.equal(tensors["math"][key], tensors["facts"][key])
    for n in tensors:
        assert _config(root / "adapters" / n)["base_model_name_or_path"] == "../../base"
        assert "/tmp" not in (root / "adapters" / n / "README.md").read_text()


# --- tokenizer and bases ---------------------------------------------------------------------------


def test_tokenizer_has_special_tokens_and_round_trips_text() -> None:
    tok = make_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    text = "Hello, World! 12+30=42\n~{}"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"][1:] == [tok.unk_token_id]
    assert 95 < len(tok) <= 110


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_checkpoint_is_single_float32_file_with_matching_vocab(bases: dict[str, Path], arch: str) -> None:
    from transformers import AutoTokenizer

    base = bases[arch]
    assert (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").exists()
    config = json.loads((base / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(base)
    assert config["vocab_size"] == len(tok)
    gen = json.loads((base / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (
        tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_llama_base_uses_gqa_shapes_and_optional_biases(bases: dict[str, Path]) -> None:
    plain, biased = _shapes(bases["llama"] / "model.safetensors"), _shapes(bases["llama_bias"] / "model.safetensors")
    assert plain["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert plain["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads of 16
    assert plain["lm_head.weight"] == (len(make_tokenizer()), 64)  # untied by default
    assert not any(k.endswith(".bias") for k in plain)
    assert {f"model.layers.0.self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} <= set(biased)
    bias = load_file(bases["llama_bias"] / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"]
    assert bias.abs().sum() > 0  # not Llama's zero init, so bias merges are really exercised


def test_gpt2_base_stores_conv1d_weights_as_in_by_out(bases: dict[str, Path]) -> None:
    shapes = _shapes(bases["gpt2"] / "model.safetensors")
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (64, 192)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (64, 256)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (256, 64)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (64, 64)  # square: shape cannot tell the layout
    assert "lm_head.weight" not in shapes  # tied to transformer.wte.weight


def test_same_seed_gives_identical_bases_and_other_seed_differs(tmp_path: Path) -> None:
    a = (build_tiny_llama(tmp_path / "a", seed=5) / "model.safetensors").read_bytes()
    b = (build_tiny_llama(tmp_path / "b", seed=5) / "model.safetensors").read_bytes()
    c = (build_tiny_llama(tmp_path / "c", seed=6) / "model.safetensors").read_bytes()
    assert a == b and a != c


# --- adapter variants ------------------------------------------------------------------------------


def test_lora_adapter_targets_every_llama_linear_layer(adapters: dict[str, Path]) -> None:
    cfg, keys = _config(adapters["lora"]), _keys(adapters["lora"])
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["init_lora_weights"] is False and not cfg["use_rslora"] and not cfg["use_dora"]
    assert cfg["target_modules"] == sorted(LLAMA_LINEAR)
    assert len(keys) == 2 * 2 * len(LLAMA_LINEAR)
    assert keys[f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"] == (4, 64)
    assert keys[f"{PREFIX}model.layers.0.self_attn.k_proj.lora_B.weight"] == (32, 4)
    assert keys[f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"] == (4, 128)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def test_rslora_adapter_sets_use_rslora(adapters: dict[str, Path]) -> None:
    cfg = _config(adapters["rslora"])
    assert cfg["use_rslora"] is True and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}


def test_pattern_adapter_has_per_module_ranks_from_first_matching_key(adapters: dict[str, Path]) -> None:
    cfg, keys = _config(adapters["pattern"]), _keys(adapters["pattern"])
    assert cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {r"1\.mlp\.down_proj": 6, "down_proj": 3, "q_proj": 2}
    assert cfg["alpha_pattern"] == {r"0\.self_attn\.o_proj": 12, "o_proj": 5,
                                    r"layers\.0\.mlp\.up_proj": 3, "v_proj": 16}
    # The JSON stores pattern keys sorted (PEFT writes sort_keys=True): that order is what PEFT matches on load.
    assert list(cfg["rank_pattern"]) == sorted(cfg["rank_pattern"])
    assert keys[f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"] == (6, 128)
    assert keys[f"{PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"] == (3, 128)
    assert keys[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"] == (64, 2)
    assert keys[f"{PREFIX}model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, 64)


def test_dora_adapter_saves_a_magnitude_vector_per_module(adapters: dict[str, Path]) -> None:
    cfg, keys = _config(adapters["dora"]), _keys(adapters["dora"])
    assert cfg["use_dora"] is True
    mags = {k: s for k, s in keys.items() if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == 2 * len(LLAMA_LINEAR)
    assert mags[f"{PREFIX}model.layers.0.self_attn.k_proj.lora_magnitude_vector"] == (32,)
    assert mags[f"{PREFIX}model.layers.0.mlp.down_proj.lora_magnitude_vector"] == (64,)


def test_bias_adapter_saves_lora_b_bias_on_attention(adapters: dict[str, Path]) -> None:
    cfg, keys = _config(adapters["bias"]), _keys(adapters["bias"])
    assert cfg["lora_bias"] is True and cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert keys[f"{PREFIX}model.layers.0.self_attn.v_proj.lora_B.bias"] == (32,)
    assert sum(k.endswith(".lora_B.bias") for k in keys) == 8


def test_bias_variant_refuses_a_base_without_biases(bases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="attention_bias"):
        build_adapter(bases["llama"], tmp_path / "x", "bias")


def test_embedding_adapter_saves_factors_and_full_base_embedding(
    adapters: dict[str, Path], bases: dict[str, Path]
) -> None:
    keys = _keys(adapters["embedding"])
    vocab = len(make_tokenizer())
    assert keys[f"{PREFIX}model.embed_tokens.lora_embedding_A"] == (4, vocab)
    assert keys[f"{PREFIX}model.embed_tokens.lora_embedding_B"] == (64, 4)
    # PEFT (save_embedding_layers="auto") also stores the untouched base embedding in full.
    tensors = load_file(adapters["embedding"] / "adapter_model.safetensors")
    saved = tensors[f"{PREFIX}model.embed_tokens.base_layer.weight"]
    assert torch.equal(saved, load_file(bases["llama"] / "model.safetensors")["model.embed_tokens.weight"])


def test_modules_to_save_adapter_saves_a_perturbed_full_lm_head(
    adapters: dict[str, Path], bases: dict[str, Path]
) -> None:
    cfg = _config(adapters["modules_to_save"])
    assert cfg["modules_to_save"] == ["lm_head"]
    saved = load_file(adapters["modules_to_save"] / "adapter_model.safetensors")[f"{PREFIX}lm_head.weight"]
    base = load_file(bases["llama"] / "model.safetensors")["lm_head.weight"]
    assert saved.shape == base.shape and not torch.allclose(saved, base)


def test_gpt2_adapter_targets_conv1d_with_fan_in_fan_out(adapters: dict[str, Path]) -> None:
    cfg, keys = _config(adapters["gpt2"]), _keys(adapters["gpt2"])
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert keys[f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 64)
    assert keys[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"] == (192, 4)
    assert keys[f"{PREFIX}transformer.h.1.mlp.c_proj.lora_A.weight"] == (4, 256)


@pytest.mark.parametrize("variant", [*VARIANTS, "gpt2"])
def test_peft_loads_each_adapter_back_with_the_saved_tensors(
    adapters: dict[str, Path], bases: dict[str, Path], variant: str
) -> None:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = bases["llama_bias" if variant == "bias" else "gpt2" if variant == "gpt2" else "llama"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[variant])
    loaded = get_peft_model_state_dict(model)
    saved = load_file(adapters[variant] / "adapter_model.safetensors")
    assert set(saved) <= set(loaded)
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    lora_b = [v for k, v in saved.items() if "lora_B" in k or "lora_embedding_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # not PEFT's zero init: deltas are non-zero
