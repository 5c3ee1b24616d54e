"""`merge verify OUT --quantize FORMATS [--base BASE] [--report DIR]`: every refusal comes before any work, and
the report folder is written whole (staged, then renamed) or not at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..writers.ownership import check_output_folder, owned_folder
from .formats import resolve
from .measure import MAX_MEMORY
from .merged import measure_merge, output_kind, recorded_base
from .report import summary_lines, write_report

COMMAND = "verify"


def quantize_report(output: str | Path, formats: str, base: str | None = None, report: str | Path | None = None,
                    *, progress: bool = False, max_memory: int = MAX_MEMORY) -> list[str]:
    """Measure what of the merge in `output` survives each format; write the report to `report` when given.

    Returns the console lines. Raises (exit 2, nothing written) for an unknown or unavailable format, a folder
    that is no merge output, a base that cannot be read, or a report folder that is not ours to write.
    """
    chosen = resolve(formats)
    folder = Path(output)
    output_kind(folder)
    base_folder = Path(base) if base is not None else recorded_base(folder)
    target = Path(report) if report is not None else None
    if target is not None:
        _check_report_folder(target, [("the merge output", folder), ("the base model", base_folder)])
    result = measure_merge(folder, base_folder, chosen, max_memory=max_memory, progress=progress)
    lines = summary_lines(result)
    if target is not None:
        names = _write(target, lambda staging: write_report(result, staging))
        lines.append(f"report: {target}/ ({', '.join(names)})")
    return lines


def _check_report_folder(target: Path, inputs: list[tuple[str, Path]]) -> bool:
    """Refuse a report folder we may not write, before any work; True when an earlier report of ours is replaced."""
    return check_output_folder(target, COMMAND, inputs, option="--report")


def _write(target: Path, body: Callable[[Path], list[str]]) -> list[str]:
    """Run `body(staging)` in a staging folder beside `target` (with our marker), then put it in place whole."""
    with owned_folder(target, COMMAND) as staging:
        return body(staging)
