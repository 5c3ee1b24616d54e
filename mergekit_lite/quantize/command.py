"""`merge verify OUT --quantize FORMATS [--base BASE] [--report DIR]`: every refusal comes before any work, and
the report folder is written whole (staged, then renamed) or not at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import OutputPathError
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


def _knows_verify() -> bool:
    """Whether writers.ownership has a marker for `merge verify`'s reports (then an earlier report of ours may be
    replaced whole); until it does, the report goes to a new or empty folder only."""
    from ..writers import ownership

    return COMMAND in ownership.COMMANDS


def _check_report_folder(target: Path, inputs: list[tuple[str, Path]]) -> bool:
    """Refuse a report folder we may not write, before any work; True when an earlier report of ours is replaced."""
    from ..writers.ownership import check_output_folder

    if _knows_verify():
        return check_output_folder(target, COMMAND, inputs, option="--report")
    check_output_folder(target, COMMAND, inputs, option="--report", accept=())
    return False


def _write(target: Path, body: Callable[[Path], list[str]]) -> list[str]:
    """Run `body(staging)` in a staging folder beside `target`, then put it in place whole."""
    if _knows_verify():
        from ..writers.ownership import owned_folder

        with owned_folder(target, COMMAND) as staging:
            return body(staging)
    from ..writers.atomic import atomic_directory

    resolved = target.resolve()
    with atomic_directory(resolved, overwrite=True) as staging:
        names = body(staging)
        if resolved.exists() and (not resolved.is_dir() or any(resolved.iterdir())):
            raise OutputPathError(f"--report {target}: files appeared there while measuring; nothing was replaced")
    return names
