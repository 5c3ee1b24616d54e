"""'Did you mean' hints for unknown names, shared by config keys, methods and parameters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or a list of valid choices when none is close."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if options:
        return f" (valid: {', '.join(options)})"
    return ""
