"""Merge methods: one module each, all registered in `registry.REGISTRY` on import."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import (
    REGISTRY,
    ElementwisePhase,
    FactoredContext,
    FactoredPhase,
    InterpolationPhase,
    LinearPhase,
    LowRankFactors,
    MergeMethod,
    Param,
    Phase,
    get_method,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "ElementwisePhase", "FactoredContext", "FactoredPhase", "InterpolationPhase", "LinearPhase", "LowRankFactors", "MergeMethod", "Param", "Phase",
           "get_method", "register"]
