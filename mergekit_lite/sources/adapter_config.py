"""Type checks for the adapter_config.json fields we read, so a stranger's file fails with its field's name."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import AdapterError


def check_config_types(config: Any, path: Path) -> None:
    """Raise AdapterError naming the field unless every field the merge reads has a usable type and value."""
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: must be a JSON object, not a {type(config).__name__}")
    if "peft_type" in config and not isinstance(config["peft_type"], str):
        raise AdapterError(f"{path}: 'peft_type' must be a string, got {config['peft_type']!r}")
    _rank(config.get("r", 8), path, "r")
    _alpha(config.get("lora_alpha", 8), path, "lora_alpha")
    for field in ("use_rslora", "use_dora"):
        if not isinstance(config.get(field, False), (bool, type(None))):
            raise AdapterError(f"{path}: '{field}' must be true or false, got {config[field]!r}")
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: '{field}' must be an object of regex -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterError(f"{path}: {field} key {pattern!r} is not a valid regular expression ({error})") \
                    from None
            check(value, path, f"{field}[{pattern!r}]")


def _rank(value: Any, path: Path, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{path}: '{where}' must be a positive integer rank, got {value!r}")


def _alpha(value: Any, path: Path, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{path}: '{where}' must be a finite number, got {value!r}")
