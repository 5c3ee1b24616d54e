"""The files every merge output holds beside its tensors, whatever its kind: the resolved config and the card.

Here, not in kinds.py, so that each kind (kinds.CheckpointOutput, adapter.PeftAdapterOutput) writes them
without importing the module that chooses between the kinds.
"""

from __future__ import annotations

from pathlib import Path

from .failures import naming

#: the resolved merge config, as `merge run` reads it back (merge eval --remerge, verify --against-inputs)
CONFIG_COPY = "mergekit_lite_config.yaml"
#: the model card (writers.card.CARD_FILE: what the Hub shows)
CARD = "README.md"


def write_text(path: Path, text: str) -> None:
    """Write a side file, naming it in any OS error."""
    with naming(path):
        path.write_text(text)
