"""Publishing a merged folder to the Hub (placeholder until the Hub issue lands)."""

from __future__ import annotations

from typing import Any


def publish_after_merge(result: Any) -> str:
    """Push a finished merge to `output.push_to_hub`; return a summary line with the URL."""
    raise NotImplementedError("publishing is not implemented yet")
