"""Seeded synthetic Llama-shaped bf16 bases and rank-r LoRA adapters at any size, for benchmarks.

Written tensor by tensor, so building a 1B-parameter base needs memory for one tensor, not the model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """Llama dimensions; the defaults give the 492M-parameter setup of the benchmarks issue."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 4

    def linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear module of a layer, by module path."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        prefix = f"model.layers.{layer}"
        return {
            f"{prefix}.self_attn.q_proj": (self.hidden, self.hidden),
            f"{prefix}.self_attn.k_proj": (kv, self.hidden),
            f"{prefix}.self_attn.v_proj": (kv, self.hidden),
            f"{prefix}.self_attn.o_proj": (self.hidden, self.hidden),
            f"{prefix}.mlp.gate_proj": (self.intermediate, self.hidden),
            f"{prefix}.mlp.up_proj": (self.intermediate, self.hidden),
            f"{prefix}.mlp.down_proj": (self.hidden, self.intermediate),
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every base tensor name and shape, in checkpoint order."""
        result: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            result += [(f"{m}.weight", s) for m, s in self.linear_shapes(layer).items()]
            result += [(f"model.layers.{layer}.input_layernorm.weight", (self.hidden,)),
                       (f"model.layers.{layer}.post_attention_layernorm.weight", (self.hidden,))]
        result += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return result

    def parameters(self) -> int:
        """Total parameter count."""
        total = 0
        for _, shape in self.tensors():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


#: entries of the seeded pool a tiled base's matrices are cut from (256 MB of bf16)
POOL = 1 << 27


def build_base(folder: Path, shape: Shape, seed: int = 0, shard_bytes: int = 2 * 10**9, tiled: bool = False) -> Path:
    """A bf16 base in HF layout (sharded safetensors + index + config.json), written shard by shard.

    `tiled` (the 7B shape): each shard is streamed tensor by tensor (header first: memory is one tensor, where
    safetensors' save_file held ~5x a 2 GB shard), and each matrix is cut from one seeded pool of N(0, 0.02²)
    bf16 entries at a seeded offset, wrapping around (a 5.9B base in minutes on a shared machine, not ~20 min of
    randn). The entries are still Gaussian; no benchmark depends on two tensors being independent.
    """
    if tiled:
        return _build_tiled(folder, shape, seed, shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: list[list[str]] = [[]]
    for name, dims in shape.tensors():
        nbytes = 2
        for d in dims:
            nbytes *= d
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            names.append([])
            size = 0
        names[-1].append(name)
        size += nbytes
    weight_map = {}
    total = 0
    shape_of = dict(shape.tensors())
    for index, members in enumerate(names):
        file = f"model-{index + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for name in members:
            dims = shape_of[name]
            if len(dims) == 1:
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_config(folder, shape)
    return folder


def _write_config(folder: Path, shape: Shape) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _build_tiled(folder: Path, shape: Shape, seed: int, shard_bytes: int) -> Path:
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=generator) * 0.02).to(torch.bfloat16)
    pool = torch.cat([pool, pool])  # any offset < POOL then has POOL entries after it
    members: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = 2 * _count(dims)
        if members[-1] and size + nbytes > shard_bytes:
            members.append([])
            size = 0
        members[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    for index, tensors in enumerate(members):
        file = f"model-{index + 1:05d}-of-{len(members):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims in tensors:
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + 2 * _count(dims)]}
            offset += 2 * _count(dims)
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name, dims in tensors:
                count = _count(dims)
                if len(dims) == 1:
                    data = torch.ones(count, dtype=torch.bfloat16)
                else:
                    data = torch.empty(count, dtype=torch.bfloat16)
                    done = 0
                    while done < count:  # wrap around the pool from a seeded start
                        start = int(torch.randint(POOL, (1,), generator=generator))
                        take = min(POOL, count - done)
                        data[done:done + take] = pool[start:start + take]
                        done += take
                out.write(data.view(torch.int16).numpy().tobytes())
                total += 2 * count
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_config(folder, shape)
    return folder


def _count(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def build_adapter(folder: Path, shape: Shape, seed: int, rank: int = 16, alpha: int = 32) -> Path:
    """A PEFT LoRA adapter (float32 factors) on all linear layers, as PEFT saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for layer in range(shape.layers):
        for module, (out_features, in_features) in shape.linear_shapes(layer).items():
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.002
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(LINEAR), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build(root: Path, shape: Shape, adapters: int = 3, rank: int = 16, tiled: bool = False) -> Path:
    """Base + adapters under `root` (skipped when already there)."""
    if not (root / "base" / "model.safetensors.index.json").is_file():
        build_base(root / "base", shape, tiled=tiled)
    for index in range(adapters):
        if not (root / f"adapter_{index}" / "adapter_config.json").is_file():
            build_adapter(root / f"adapter_{index}", shape, seed=index, rank=rank)
    return root


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The size knobs shared by this script and the benchmark runner."""
    parser.add_argument("--hidden", type=int, default=Shape.hidden)
    parser.add_argument("--intermediate", type=int, default=Shape.intermediate)
    parser.add_argument("--layers", type=int, default=Shape.layers, help="depth: the memory-scaling knob")
    parser.add_argument("--vocab", type=int, default=Shape.vocab)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)


def main() -> None:
    """CLI: build a synthetic setup."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    add_shape_arguments(parser)
    args = parser.parse_args()
    shape = Shape(args.hidden, args.intermediate, args.layers, args.vocab)
    build(args.root, shape, args.adapters, args.rank)
    print(f"{args.root}: {shape.parameters() / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
