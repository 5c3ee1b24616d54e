"""'Did you mean' hints for unknown names, shared by config keys, methods and parameters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], *, matches: int = 1, otherwise: str | None = None) -> str:
    """' (did you mean 'x'?)' for the closest choices (up to `matches`); when none is close, `otherwise` (for
    thousands of names, where a list would not help), else the list of valid choices."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=matches, cutoff=0.6)
    if close:
        return " (did you mean " + ", ".join(f"'{c}'" for c in close) + "?)"
    if otherwise is not None:
        return f" ({otherwise})"
    if options:
        return f" (valid: {', '.join(options)})"
    return ""
