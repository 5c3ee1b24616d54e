"""One cheap test for inf/NaN, shared by the adapter loader and the engine's output check."""

from __future__ import annotations

import math

import torch


def all_finite(values: torch.Tensor) -> bool:
    """True when no value is inf or NaN: checking the two extremes suffices, since NaN propagates into them.

    Run on an output-dtype chunk it also catches values that overflowed in the cast. Far cheaper on CPU than
    a boolean isfinite over the tensor (and no bool kernels, which are slow here).
    """
    if values.numel() == 0 or not values.is_floating_point():
        return True
    low, high = torch.aminmax(values)
    return math.isfinite(low.item()) and math.isfinite(high.item())
