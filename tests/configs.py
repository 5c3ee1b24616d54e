"""One way to build a merge config over the demo (base + three adapters) for the tests (a helper, not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_lite import MergeConfig

DEMO_ADAPTERS = ("style", "math", "facts")


def demo_config(demo: Path, out: Path, method: str, weights: tuple[float, ...] | list[float] = (1.0, -0.5, 2.0),
                per_adapter: list[dict[str, Any]] | None = None, **extra: Any) -> MergeConfig:
    """A config merging the demo adapters (weights in order; per-adapter keys merged into each entry) into `out`;
    `extra` adds top-level keys (`parameters`, `seed`, …), and `output` keys beside the path."""
    adapters = [{"path": str(demo / "adapters" / name), "weight": w, **((per_adapter or [{}] * 3)[i])}
                for i, (name, w) in enumerate(zip(DEMO_ADAPTERS, weights))]
    data = {"base_model": str(demo / "base"), "method": method, "adapters": adapters,
            "output": {"path": str(out), **extra.pop("output", {})}, **extra}
    return MergeConfig.from_dict(data)
