"""Independent, obvious reference code for the tests: whole tensors, no streaming, no fusion."""

from __future__ import annotations

import json
import math
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
    k = floor_count(density, flat.numel())
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties_combine(updates: list[torch.Tensor], weights: list[float], sign: str, normalize: bool, lam: float,
                 vote_dtype: torch.dtype | None = None) -> torch.Tensor:
    """TIES steps (3)-(4) on whole stacked tensors, written from SEMANTICS §3.

    `vote_dtype`: sum the `sign: sum` ballots in that dtype, adapter after adapter, as the engine does in its
    compute dtype (§2) - needed where the uᵢ are not exact there and a vote can be 0 in float32 alone (DELLA's
    τ/q); None sums in float64."""
    stacked = torch.stack(updates)
    if sign == "sum" and vote_dtype is not None:
        vote = updates[0].to(vote_dtype)
        for update in updates[1:]:
            vote = vote + update.to(vote_dtype)
        vote = vote.to(stacked.dtype)
    else:
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


def floor_count(fraction: float, numel: int) -> int:
    """⌊fraction · numel⌋, forgiving a decimal fraction's last float bits (0.29 of 100 is 29)."""
    # "forgiven its last float bits" (SEMANTICS §3): a few ulps of the product, not an absolute 1e-9
    product = fraction * numel
    return numel if fraction >= 1 else min(numel, math.floor(product + 4 * math.ulp(product)))


def magnitude_order(flat: torch.Tensor) -> list[int]:
    """Flat indices from the largest magnitude down; equal magnitudes: lower flat index first (a full sort)."""
    return sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (SEMANTICS §3): drop the g = ⌊gamma·numel⌋ largest magnitudes, keep the next
    k = ⌊density·numel⌋ (g at most numel − k), zero the rest."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = floor_count(density, n)
    g = min(floor_count(gamma, n) if gamma > 0 else 0, n - k)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[magnitude_order(flat)[g:g + k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def magprune(tau: torch.Tensor, density: float, epsilon: float, rescale: bool, uniforms: torch.Tensor) -> torch.Tensor:
    """DELLA's MagPrune (SEMANTICS §3), row by row (a 1-D tensor is one row): the entry of magnitude rank d
    (0 = largest, equal magnitudes lower index first) among n is kept when its uniform u < q = (density + ε) −
    (2ε/(n − 1))·d (float64, in that order, as §3 fixes it; q = density when n = 1), and divided by q (float64)
    when `rescale`. `uniforms`: one per entry, flat. The result is float64: round it to the compute dtype."""
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() > 1 else tau.reshape(1, -1)
    u = uniforms.reshape(rows.shape).double()
    out = torch.zeros(rows.shape, dtype=torch.float64)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        for d, j in enumerate(magnitude_order(rows[r])):
            q = density if n == 1 else (density + epsilon) - (2 * epsilon / (n - 1)) * d
            if float(u[r, j]) < q:
                out[r, j] = float(rows[r, j]) / q if rescale else float(rows[r, j])
    return out.reshape(tau.shape)


def model_stock(base: torch.Tensor, updates: list[torch.Tensor | None]) -> torch.Tensor:
    """Model Stock (SEMANTICS §3): over the inputs that touch the tensor (uᵢ = wᵢτᵢ, flattened), the mean
    pairwise cosine c (a pair with a zero vector counts 0), clamped to [0, 1]; t = k·c / (1 + (k − 1)·c), t = 1
    for a single input; W' = W + t · mean uᵢ."""
    present = [u.double().reshape(-1) for u in updates if u is not None]
    k = len(present)
    if k == 0:
        return base.double()
    if k == 1:
        t = 1.0
    else:
        cosines = []
        for i in range(k):
            for j in range(i + 1, k):
                ni, nj = float(present[i].norm()), float(present[j].norm())
                cosines.append(0.0 if ni == 0 or nj == 0 else float(present[i] @ present[j]) / (ni * nj))
        c = min(1.0, max(0.0, sum(cosines) / len(cosines)))
        t = k * c / (1 + (k - 1) * c)
    return base.double() + t * (sum(present) / k).reshape(base.shape)


def reference_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP (SEMANTICS §3), whole flattened tensors in float64: normalise, cos, |cos| > 0.9995 → lerp, else the sines."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    nb = nb if nb > 1e-8 else torch.tensor(1.0, dtype=torch.float64)
    cos = float(torch.clamp((a / na) @ (b / nb), -1, 1))
    if abs(cos) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)).reshape(v0.shape)


def sce_combine(base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's sce_merge after selection, in float64: the majority sign by sum, then the mean-square weights
    of the adapters that agree with it, entry by entry (`taus` stacked, float64)."""
    majority = (taus.sum(dim=0) >= 0).double() * 2 - 1
    erase = (taus.sign() == majority).double()
    weights = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    weights = torch.ones_like(weights) / len(weights) if abs(float(weights.sum())) < 1e-6 else weights / weights.sum()
    erased = weights.view(-1, *[1] * (taus.dim() - 1)) * erase
    return base.double() + (taus * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def ref_mask(taus: torch.Tensor, share: float) -> torch.Tensor:
    """The kept entries: float32-rounded float64 population variance across dim 0, the ⌊share · #nonzero⌋ largest,
    ties to the lower flat index (a stable descending sort)."""
    variance = taus.double().var(dim=0, unbiased=False).to(torch.float32).reshape(-1)
    k = int(int(torch.count_nonzero(variance)) * share)
    order = torch.sort(variance, descending=True, stable=True).indices
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(taus.shape[1:])


def ref_sce(base: torch.Tensor, tensors: list[torch.Tensor], share: float) -> torch.Tensor:
    """mergekit 0.1.5's sce_merge in float64, with the selection of `ref_mask`."""
    taus = torch.stack([(t.float() - base.float()).double() for t in tensors])
    taus = taus * ref_mask(taus, share)
    return sce_combine(base, taus)
