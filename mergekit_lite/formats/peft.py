"""PEFT's LoRA adapter layout, declared once: file names, the key prefix and the key grammar.

Read by the adapter source, written by the adapter writer, checked by `merge verify`, uploaded by `merge publish`
and fetched from the Hub by `hub/resolve.py`: all of them name the files and parse the keys through this module,
so the layout cannot drift between the reader and the writer.
"""

from __future__ import annotations

import re
from pathlib import Path

#: the adapter's config (PEFT's `LoraConfig` as JSON)
CONFIG_FILE = "adapter_config.json"
#: the adapter's tensors, the only weights file we read or write
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's legacy pickled weights: recognised only to refuse them (never unpickled)
PICKLED_WEIGHTS = "adapter_model.bin"
#: every tensor key of a LoRA adapter starts with it: `base_model.model.<module>.<part>`
KEY_PREFIX = "base_model.model."
#: (A part, B part) of a low-rank factor pair as keys end: Linear / Conv1D, and embeddings
FACTOR_PARTS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))

#: `<module>.<part>` (without the prefix) of the tensors a LoRA adapter holds per module
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?)$"
)
#: `<module>.base_layer.<param>` (without the prefix): a saved full tensor of a wrapped module
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


def factor_keys(module: str, embedding: bool = False) -> tuple[str, str]:
    """(A key, B key) of `module`'s factor pair, prefix included."""
    a_part, b_part = FACTOR_PARTS[1] if embedding else FACTOR_PARTS[0]
    return f"{KEY_PREFIX}{module}.{a_part}", f"{KEY_PREFIX}{module}.{b_part}"


def module_of(key: str, suffix: str = "") -> str:
    """The module path in an adapter key `base_model.model.<module><suffix>` (prefix and suffix removed when there)."""
    module = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    return module[: -len(suffix)] if suffix and module.endswith(suffix) else module


def is_adapter_folder(folder: Path) -> bool:
    """True for a PEFT adapter folder (a `format: peft` merge output): an adapter config and no model config."""
    return (folder / CONFIG_FILE).is_file() and not (folder / "config.json").is_file()
