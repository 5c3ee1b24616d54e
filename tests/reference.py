"""Independent, obvious reference code for the tests: whole tensors, no streaming, no fusion."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def plain_lora_task_vectors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """τ = (alpha / r) · B @ A for each Linear module of a plain LoRA adapter, keyed by base tensor name."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    result = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            result[f"{module}.weight"] = scale * (b.double() @ a.double())
    return result


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
