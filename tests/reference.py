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


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ largest |τ|; ties at the threshold go to the lower flat index (full sort)."""
    flat = tau.reshape(-1)
    k = int(density * flat.numel()) if density < 1 else flat.numel()
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties_combine(updates: list[torch.Tensor], weights: list[float], sign: str, normalize: bool, lam: float) -> torch.Tensor:
    """TIES steps (3)-(4) on whole stacked tensors, written from SEMANTICS §3."""
    stacked = torch.stack(updates)
    vote = stacked.sum(0) if sign == "sum" else torch.sign(stacked).sum(0)
    gamma = torch.where(vote >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (stacked != 0) & (torch.sign(stacked) == gamma)
    total = (stacked * agree).sum(0)
    if not normalize:
        return lam * total
    divisor = (agree * torch.tensor(weights, dtype=stacked.dtype).abs().reshape(-1, *[1] * tau_dims(stacked))).sum(0)
    return lam * torch.where(divisor > 0, total / divisor.clamp_min(1e-300), torch.zeros_like(total))


def tau_dims(stacked: torch.Tensor) -> int:
    """Number of dims of one stacked member."""
    return stacked.dim() - 1
