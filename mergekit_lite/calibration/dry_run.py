"""What a data-aware merge will read before it writes, for `merge run --dry-run`: nothing is loaded or read here
beyond the config (a task's or file's prompts are counted when the merge runs; the dry run says "up to")."""

from __future__ import annotations

from typing import Any

from . import calibration_sources


def source_lines(config: Any, holdout: float = 0.0) -> list[str]:
    """One line per input: its label, how many prompts at most, from where (and the held-out share)."""
    lines = []
    for spec, source in zip(config.inputs, calibration_sources(config)):
        held = f", {holdout:.0%} held out" if holdout else ""
        lines.append(f"    '{spec.label}': up to {source.size} prompt(s) from {source.describe()} "
                     f"(seed {config.seed}{held})")
    return lines


def model_line() -> str:
    """The model the calibration loads (once, whatever the number of adapters)."""
    return ("  calibration: the base loaded once (transformers) with every adapter as a frozen low-rank branch; "
            "each adapter's model reads its own prompts")
