"""Human-friendly sizes ("5GB", "512MiB") as Hugging Face counts them: decimal units, binary with an i."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str) -> int:
    """Return a byte count from an int or a string like "5GB" (10^9) or "2GiB" (2^30)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value!r}")
        return int(value)
    match = _SIZE.match(value)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or a string like '5GB', '500MB', '2GiB')")
    number = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if number < 1:
        raise ValueError(f"a size must be at least one byte, got {value!r}")
    return int(number)


def format_size(num_bytes: float) -> str:
    """Return a short decimal size for messages and summaries ("1.23 GB")."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{int(num_bytes)} B"
