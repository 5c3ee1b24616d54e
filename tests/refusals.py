"""How the tests check a CLI refusal (a helper module, not a test module): exit 2 and one line."""

from __future__ import annotations

from typing import Any


def one_line(result: Any, *words: str) -> str:
    """The one line of a refused command (exit 2; `sweep: ` progress lines aside), holding each of `words`."""
    lines = [line for line in result.output.splitlines() if not line.startswith("sweep: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
