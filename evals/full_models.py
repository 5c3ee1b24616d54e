"""Seeded, offline builders of tiny full fine-tuned checkpoints of a base (for full-model merges and mergekit).

A "fine-tune" here is the base with seeded dense noise on every float tensor (``build_noisy_model``), or the base
with a PEFT adapter merged in by PEFT itself (``build_merged_model``: the same change as the adapter, stored in
full). Files look like ``save_pretrained`` output: config.json, tokenizer and generation config copied from the
base, safetensors weights (optionally in several shards with an index). The same seed gives the same bytes.

Run ``python evals/full_models.py --base evals/demo/base --out /tmp/full`` to build three noisy fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["build_noisy_model", "build_merged_model", "build_corpus_models", "copy_side_files", "main"]

#: files of the base folder a fine-tune shares with it (everything but the weights)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Copy the base's config and tokenizer files next to a fine-tune's weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)


def _base_tensors(base_dir: Path) -> dict[str, torch.Tensor]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(base_dir / shard))
        return tensors
    return load_file(base_dir / "model.safetensors")


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int = 1) -> None:
    """Write `tensors` as model.safetensors, or as `shards` files with a model.safetensors.index.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def build_noisy_model(base_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], seed: int = 1,
                      relative: float = 0.05, dtype: str | None = None, shards: int = 1,
                      skip: tuple[str, ...] = ()) -> Path:
    """The base plus seeded Gaussian noise of `relative` × each tensor's std (at least 0.02) on every float tensor
    (tensors whose name contains a string of `skip` stay exactly the base's), stored in `dtype` (default: as base)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in sorted(_base_tensors(base_dir).items()):
        if tensor.is_floating_point() and not any(s in name for s in skip):
            wide = tensor.to(torch.float32)
            scale = float(wide.std()) if wide.numel() > 1 else 0.0
            noise = torch.randn(wide.shape, generator=generator)
            tensor = wide + noise * (relative * max(scale, 0.02))
        target = _DTYPES[dtype] if dtype and tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.to(target)
    save_weights(tensors, out_dir, shards)
    copy_side_files(base_dir, out_dir)
    return out_dir


def build_merged_model(base_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """The base with a PEFT adapter merged in by PEFT (`merge_and_unload`, float32), stored in `dtype`: a full
    checkpoint that carries exactly the adapter's change (up to that storage rounding)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    names = set(_base_tensors(base_dir))
    state = {k: v.detach().to(_DTYPES[dtype]).clone() for k, v in merged.state_dict().items() if k in names}
    save_weights(state, out_dir)
    copy_side_files(base_dir, out_dir)
    return out_dir


def build_corpus_models(folder: str | os.PathLike[str], demo: str | os.PathLike[str] | None = None) -> Path:
    """The models `merge_configs/mergekit/` names, built into `folder`: `base` (the demo base), full fine-tunes
    `ft_a`, `ft_b`, `ft_c` (noise seeds 11-13) and the demo adapters `adapters/style`, `adapters/math`."""
    folder = Path(folder)
    demo = Path(demo) if demo is not None else Path(__file__).resolve().parent / "demo"
    shutil.copytree(demo / "base", folder / "base", dirs_exist_ok=True)
    for seed, name in enumerate(("ft_a", "ft_b", "ft_c"), start=11):
        build_noisy_model(demo / "base", folder / name, seed=seed, relative=0.2)
    for name in ("style", "math"):
        shutil.copytree(demo / "adapters" / name, folder / "adapters" / name, dirs_exist_ok=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """CLI: three noisy fine-tunes of a base (seeds 1-3)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the base checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write model_1..model_3 into")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    args = parser.parse_args(argv)
    for seed in (1, 2, 3):
        path = build_noisy_model(args.base, args.out / f"model_{seed}", seed=seed, dtype=args.dtype)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
