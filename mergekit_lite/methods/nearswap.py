"""nearswap: mergekit's NearSwap, the base pulled towards one model where the two are already close (§3b).

Per entry, with the input's task vector u = wτ (w = 1 by default; mergekit's NearSwap has no weight):
W' = W + clamp(t / max(|u|, 10⁻⁶), 0, 1) · u — entries that differ by at most t take the model's value, the others
move by t towards it. Entry by entry, so any chunking gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .registry import ElementwisePhase, MergeMethod, Param, register


def _combine(updates: Sequence[torch.Tensor], _weights: Sequence[float], params: Mapping[str, Any]) -> torch.Tensor:
    """The merged delta of a chunk: clamp(t / |u|, 0, 1) · u."""
    update = updates[0]
    share = (params["t"] / update.abs().clamp(min=1e-6)).clamp(min=0.0, max=1.0)
    return update * share


NEARSWAP = register(
    MergeMethod(
        name="nearswap",
        display_name="NearSwap",
        paper_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        summary="mergekit's NearSwap: W + clamp(t / |τ|, 0, 1) · τ, the base moved towards one model where they are "
                "close",
        params=(Param("t", None, float, "distance below which an entry takes the model's value", required=True,
                      interval=(0.0, math.inf), closed=True),),
        phase=ElementwisePhase(_combine),
        input_count=(1, 1),
    )
)
