"""Where a base or adapter reference points: a local folder now; Hub ids (org/name[@rev]) come later."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import MergeConfig


def resolve_model_dir(config: MergeConfig, reference: str, kind: str) -> Path:
    """The local folder for a base (`kind='base'`) or adapter reference of `config`."""
    return config.resolve_path(reference)
