"""What the subspace methods share: parameters, and the merge of 1-D changes, which have no core."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .lowrank_core import weighted_sum
from .registry import FactoredContext, Param

ALPHA = Param("alpha", 1.0, float, "global scale of the merged delta")


def mean_of_vectors(taus: Sequence[torch.Tensor], weights: Sequence[float], params: Mapping[str, Any],
                    context: FactoredContext) -> torch.Tensor:
    """1-D changes (lora_bias shifts) are averaged, Σ wᵢτᵢ / T, as the papers do for 1-D parameters."""
    return weighted_sum(taus, weights) / len(taus)
