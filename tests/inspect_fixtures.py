"""Tiny hand-made bases and LoRA adapters for the `merge inspect` tests, and the dense float64 references.

The factors are chosen by each test (random, rotated, negated, integer-valued for exact ties), written in
PEFT's file layout, so every number `merge inspect` reports can be recomputed from dense τᵢ = s·BᵢAᵢ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."
#: base tensor name -> shape; the Llama-like names give layers 0 and 1, the head has no layer
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (6, 5),
    "model.layers.0.mlp.down_proj.weight": (4, 7),
    "model.layers.1.self_attn.q_proj.weight": (6, 5),
    "lm_head.weight": (9, 5),
}


def write_base(folder: Path, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0,
               model_type: str = "llama") -> Path:
    """A base checkpoint of random float32 tensors (one model.safetensors and a config.json)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(*shape, generator=generator) for name, shape in (shapes or SHAPES).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float = 8.0,
                  use_rslora: bool = False, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                  r: int | None = None) -> Path:
    """A PEFT LoRA adapter: module path -> (A r×in, B out×r); `r` in the config defaults to the first module's rank."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous().float()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous().float()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    first_rank = r or next(iter(factors.values()))[0].shape[0]
    config = {"peft_type": "LORA", "r": first_rank, "lora_alpha": alpha, "use_rslora": use_rslora,
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def random_factors(seed: int, ranks: dict[str, int], shapes: dict[str, tuple[int, ...]] | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) for each module (base tensor name without `.weight`), Linear layout."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module, rank in ranks.items():
        rows, cols = (shapes or SHAPES)[f"{module}.weight"]
        out[module] = (torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator))
    return out


def dense_tau(a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool = False) -> torch.Tensor:
    """τ = s·B·A (or its transpose) in float64."""
    tau = scale * (b.double() @ a.double())
    return tau.T if transposed else tau


def dense_tau32(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """τ as the engine rounds it: float32, the scale folded into B, the rank summed k = 0..r-1 in order."""
    left = b.float() * float(scale)
    out = left[:, :1] * a.float()[:1]
    for k in range(1, left.shape[1]):
        out = out + left[:, k:k + 1] * a.float()[k:k + 1]
    return out


def orthonormal_span(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of a dense float64 matrix (numpy's rank rule)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0:
        return u[:, :0]
    rank = int((s > s[0] * max(x.shape) * 2.0**-52).sum())
    return u[:, :rank]


def dense_overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of two dense matrices."""
    a, b = orthonormal_span(x), orthonormal_span(y)
    cosines = torch.linalg.svdvals(a.T @ b)
    return float((cosines**2).sum()) / min(a.shape[1], b.shape[1])


def dense_effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of a dense matrix (above numpy's rank rule)."""
    s = torch.linalg.svdvals(x)
    s = s[s > s[0] * max(x.shape) * 2.0**-52]
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ largest |τ| (ties: lower flat index first), by a full stable sort."""
    flat = tau.reshape(-1)
    k = math.floor(density * flat.numel() * (1 + 2.0**-50)) if density < 1 else flat.numel()
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def dense_conflicts(taus: list[torch.Tensor], weights: list[float], densities: list[float]) -> dict:
    """The conflict counts of one tensor from whole dense τᵢ, written from the definitions in docs/INSPECT.md."""
    updates = torch.stack([trim(t, d).reshape(-1).double() * w for t, w, d in zip(taus, weights, densities)])
    nonzero, positive, negative = updates != 0, updates > 0, updates < 0
    gamma = torch.where(updates.sum(0) >= 0, 1.0, -1.0).double()
    pairs = {}
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            both = nonzero[i] & nonzero[j]
            pairs[(i, j)] = (int(both.sum()), int((both & (positive[i] != positive[j])).sum()))
    return {
        "overlapping": int((nonzero.sum(0) >= 2).sum()),
        "conflicting": int((positive.any(0) & negative.any(0)).sum()),
        "kept": int(nonzero.sum()),
        "dropped": int((nonzero & (updates * gamma < 0)).sum()),
        "pairs": pairs,
    }
