"""ram: mergekit's RAM (Reinforced Agent Merging), for sparse, heterogeneous task vectors (§3b).

Per entry, over the inputs' uᵢ = wᵢτᵢ (wᵢ = 1 by default; mergekit's RAM has no weights): an input changes the
entry when |uᵢ| > epsilon; an entry one input changes takes that change whole, one several inputs change takes
their mean: τ = Σ [|uᵢ| > ε] uᵢ / max(count, 1). Entry by entry, so any chunking gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .registry import ElementwisePhase, MergeMethod, Param, register


def _combine(updates: Sequence[torch.Tensor], _weights: Sequence[float], params: Mapping[str, Any]) -> torch.Tensor:
    """The merged delta of a chunk: each entry's changes summed over the inputs that make one, divided by their
    number."""
    total = torch.zeros_like(updates[0])
    count = torch.zeros_like(updates[0])
    for update in updates:
        changed = (update.abs() > params["epsilon"]).to(update.dtype)
        total += update * changed
        count += changed
    return total / count.clamp(min=1.0)


RAM = register(
    MergeMethod(
        name="ram",
        display_name="RAM",
        paper_url="https://arxiv.org/abs/2601.13572",
        summary="mergekit's RAM: entries changed by one input keep its change, entries changed by several take "
                "their mean",
        params=(Param("epsilon", 1e-5, float, "a change of at most this is no change", interval=(0.0, math.inf),
                      closed=True),),
        phase=ElementwisePhase(_combine),
    )
)
