"""lm-eval runs over base, adapters and merges (placeholder until the eval issue lands)."""

from __future__ import annotations

from typing import Any


def evaluate_after_merge(result: Any, progress: bool = True) -> str:
    """Evaluate a finished merge as its config's `eval:` section asks; return a summary line."""
    raise NotImplementedError("merge eval is not implemented yet")
