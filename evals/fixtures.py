"""Seeded, offline builders of tiny base checkpoints and real PEFT LoRA adapters.

Tests and the demo need checkpoints that look exactly like what users merge (``save_pretrained``
output of transformers and PEFT) without any download. Everything here is built from a seed on the
CPU in well under a second per call, and the same seed gives byte-identical safetensors files.

Run ``python evals/fixtures.py --out evals/demo`` to (re)build the committed demo.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# Never reach for the Hub: every path these builders touch is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "VARIANTS",
    "GPT2_VARIANTS",
    "make_tokenizer",
    "build_tiny_llama",
    "build_tiny_gpt2",
    "build_adapter",
    "build_demo",
    "main",
]

#: Adapter variants ``build_adapter`` can make on a Llama base (``"bias"`` needs ``attention_bias=True``).
VARIANTS: tuple[str, ...] = ("lora", "rslora", "pattern", "dora", "bias", "embedding", "modules_to_save")
#: Adapter variants ``build_adapter`` can make on a GPT-2 base.
GPT2_VARIANTS: tuple[str, ...] = ("lora",)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
LLAMA_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
GPT2_CONV1D: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")

# Scale of the noise added to every trainable adapter tensor, relative to that tensor's std.
_NOISE = 0.1
# Embedding LoRA factors are shrunk by this factor each (so the delta by its square).
_EMBEDDING_FACTOR_SCALE = 0.1
# Extra seed offset so that the noise stream differs from PEFT's own init stream.
_NOISE_SEED_OFFSET = 10_007


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (which model/PEFT init uses) without leaking the state to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and library warnings while building; restore them afterwards."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices and PEFT hints, not actionable here
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def make_tokenizer() -> Any:
    """Build a character-level tokenizer over printable ASCII fully offline.

    Special tokens come first (``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3); a BOS is prepended like
    Llama's tokenizer does. Returns a ``transformers.PreTrainedTokenizerFast``; ``len(tok)`` is the
    model vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab[c] = len(vocab)
    # BPE without merges = one token per character; unknown characters become <unk>.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    core.decoder = decoders.Fuse()  # join characters back without inserted spaces
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
    return tok


def _save_base(model: Any, tok: Any, out_dir: Path) -> Path:
    """Write model (float32, one model.safetensors), tokenizer and generation config into ``out_dir``."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    with _quiet():
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="2GB")
        tok.save_pretrained(out_dir)
        GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
        ).save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
) -> Path:
    """Save a randomly initialised (seeded) tiny LlamaForCausalLM so tests have a real base checkpoint.

    ``num_kv_heads < num_heads`` gives k/v projections a different shape from q/o (GQA), which catches
    shape mix-ups; ``attention_bias=True`` gives q/k/v/o biases, needed for ``lora_bias`` adapters.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
        if attention_bias:
            # Llama zero-initialises biases; make them non-trivial so bias merges are really tested.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(".bias"):
                        p.normal_(0.0, 0.02)
    return _save_base(model, tok, Path(out_dir))


def build_tiny_gpt2(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
) -> Path:
    """Save a randomly initialised (seeded) tiny GPT2LMHeadModel: its ``Conv1D`` layers store W as (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    with _seeded(seed):
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # GPT-2 zero-initialises biases; make them non-trivial
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.02)
    return _save_base(model, tok, Path(out_dir))


def _lora_config_kwargs(variant: str, model_type: str, target_modules: list[str] | str | None) -> dict[str, Any]:
    """Translate a variant name into LoraConfig arguments for the given architecture."""
    if model_type == "gpt2":
        if variant not in GPT2_VARIANTS:
            raise ValueError(f"variant {variant!r} is not available for GPT-2 bases; choose from {GPT2_VARIANTS}")
        return {"target_modules": list(target_modules or GPT2_CONV1D), "fan_in_fan_out": True}
    if model_type != "llama":
        raise ValueError(f"unsupported base model_type {model_type!r}; build it with build_tiny_llama/gpt2")
    linear = list(target_modules or LLAMA_LINEAR)
    if variant == "lora":
        return {"target_modules": linear}
    if variant == "rslora":
        return {"target_modules": linear, "use_rslora": True}
    if variant == "pattern":
        # Overlapping keys: PEFT takes the first key that matches in dict order, and it writes
        # adapter_config.json with sort_keys=True, so the order that counts after a save/load round trip
        # is the sorted one. "1\.mlp..." / "0\.self..." sort before "down_proj" / "o_proj", so the specific
        # key wins for layer 1's down_proj (r=6) and layer 0's o_proj (alpha=12) both when PEFT creates
        # the adapter and when it loads it back; the other layer falls through to the generic key.
        return {
            "target_modules": linear,
            "rank_pattern": {r"1\.mlp\.down_proj": 6, "down_proj": 3, "q_proj": 2},
            "alpha_pattern": {r"0\.self_attn\.o_proj": 12, "o_proj": 5, r"layers\.0\.mlp\.up_proj": 3, "v_proj": 16},
        }
    if variant == "dora":
        return {"target_modules": linear, "use_dora": True}
    if variant == "bias":
        return {"target_modules": list(target_modules or LLAMA_ATTENTION), "lora_bias": True}
    if variant == "embedding":
        return {"target_modules": list(target_modules or ["embed_tokens", "q_proj", "v_proj"])}
    if variant == "modules_to_save":
        return {"target_modules": list(target_modules or ["q_proj", "v_proj"]), "modules_to_save": ["lm_head"]}
    raise ValueError(f"unknown adapter variant {variant!r}; choose from {VARIANTS}")


def _perturb_trainable(peft_model: Any, seed: int) -> None:
    """Add seeded noise to every trainable tensor so each delta is clearly non-zero and seed-specific."""
    gen = torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():  # named_parameters order is deterministic
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + _NOISE * noise)  # keep magnitudes positive-ish and near the row norms
            elif "lora_embedding_" in name:
                # With init_lora_weights=False PEFT draws both embedding factors from randn (std 1), giving
                # deltas ~100x the embeddings; scale to the size of the linear layers' deltas instead.
                p.mul_(_EMBEDDING_FACTOR_SCALE).add_(_NOISE * _EMBEDDING_FACTOR_SCALE * noise)
            else:
                scale = float(p.detach().float().std()) if p.numel() > 1 else 0.0
                p.add_(_NOISE * max(scale, 0.02) * noise)


def build_adapter(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    variant: str = "lora",
    seed: int = 1,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: list[str] | str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Create and save a real PEFT LoRA adapter of the given ``variant`` for the base in ``base_dir``.

    ``init_lora_weights=False`` plus seeded noise makes every delta non-zero. The adapter is written
    by PEFT's own ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``), so it
    has exactly the key layout users' adapters have. ``base_model_name_or_path`` overrides the path
    PEFT records (by default the absolute ``base_dir``), e.g. to keep committed files machine-independent.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = _lora_config_kwargs(variant, model.config.model_type, target_modules)
    if variant == "bias" and not any(n.endswith("q_proj.bias") for n, _ in model.named_parameters()):
        raise ValueError(
            "variant 'bias' needs a base with attention biases: build_tiny_llama(..., attention_bias=True)"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **kwargs,
    )
    with _seeded(seed), _quiet():
        peft_model = get_peft_model(model, config)
        _perturb_trainable(peft_model, seed)
        if base_model_name_or_path is not None:
            peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
            model.config._name_or_path = base_model_name_or_path  # what PEFT's README card records
            model.name_or_path = base_model_name_or_path  # and its "base_model:adapter:" tag
        out_dir.mkdir(parents=True, exist_ok=True)
        # Explicit, so PEFT never probes the Hub; "embedding" matches PEFT's "auto" (full base embedding saved).
        peft_model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=variant == "embedding")
    _sort_target_modules(out_dir / "adapter_config.json")
    return out_dir


def _sort_target_modules(config_path: Path) -> None:
    """Rewrite ``target_modules`` sorted: PEFT stores it as a set, so its JSON order varies with PYTHONHASHSEED."""
    data = json.loads(config_path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True))  # PEFT's own formatting


def build_demo(out_root: str | os.PathLike[str]) -> Path:
    """Build the demo: ``base`` (tiny Llama, seed 0) and adapters ``adapters/{style,math,facts}`` (seeds 1-3).

    Adapters record the base as the relative path ``../../base`` so the committed files do not depend on
    where they were built; all files are byte-identical across runs.
    """
    out_root = Path(out_root)
    base = build_tiny_llama(out_root / "base", seed=0)
    for seed, name in enumerate(("style", "math", "facts"), start=1):
        build_adapter(base, out_root / "adapters" / name, variant="lora", seed=seed, r=4, lora_alpha=8,
                      base_model_name_or_path="../../base")
    return out_root


def main(argv: list[str] | None = None) -> int:
    """CLI: build the demo checkpoint and adapters (default ``evals/demo`` next to this file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo",
                        help="folder to write base/ and adapters/ into (default: evals/demo)")
    args = parser.parse_args(argv)
    root = build_demo(args.out)
    total = 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        size = f.stat().st_size
        total += size
        print(f"{size:>9}  {f.relative_to(root)}")
    print(f"{total:>9}  total bytes in {root}")
    print(json.dumps({"base": str(root / "base"), "adapters": sorted(p.name for p in (root / "adapters").iterdir())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
