"""`inspect(config) -> InspectResult`: open the inputs, measure, write report.md, inspect.json and the figures
into the output folder atomically: a report folder of our own (writers.ownership's marker) is replaced whole; any
other non-empty folder, an input, or an unwritable place is refused before the inputs are opened."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MergeConfig
from ..engine.device import resolve_device
from ..engine.schedule import DEFAULT_MAX_MEMORY
from ..errors import MergeConfigError
from ..units import parse_size
from ..writers.ownership import check_output_folder, local_inputs, owned_folder
from .analyse import Inspection, InspectOptions, analyse
from .inputs import open_inputs
from .report import markdown_report, report_data, text_report

DEFAULT_OUT = "inspect_report"
REPORT_JSON, REPORT_MD = "inspect.json", "report.md"


@dataclass(frozen=True)
class InspectResult:
    """What `merge inspect` measured and wrote."""

    inspection: Inspection
    data: dict[str, Any]
    out_dir: Path

    @property
    def text(self) -> str:
        """The short report the CLI prints."""
        return text_report(self.data)


def inspect(config: MergeConfig, method_given: bool = True, out: str | Path = DEFAULT_OUT, *,
            density: float | None = None, sample: int | None = None, max_memory: int | str | None = None,
            device: str | torch.device = "auto", plots: bool = True, progress: bool = False,
            allow_pickle: bool = False) -> InspectResult:
    """Measure the config's adapters against its base and write the report folder `out`."""
    target = Path(out).resolve()
    check_output_folder(target, "inspect", local_inputs(config))
    if sample is not None and sample < 1:
        raise MergeConfigError(f"--sample {sample}: must be a positive number of entries")
    try:
        budget = parse_size(max_memory) if max_memory is not None else DEFAULT_MAX_MEMORY
    except ValueError as error:
        raise MergeConfigError(f"--max-memory {max_memory}: {error}") from None
    options = InspectOptions(density=density, sample=sample, max_memory=budget, device=resolve_device(device))
    with open_inputs(config, allow_pickle) as inputs:
        inspection = analyse(config, method_given, inputs, options, progress)
    with owned_folder(target, "inspect") as staging:
        figures = []
        if plots:
            from .figures import write_figures

            figures = write_figures(report_data(inspection, []), staging)
        data = report_data(inspection, figures)
        (staging / REPORT_JSON).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        (staging / REPORT_MD).write_text(markdown_report(data))
    return InspectResult(inspection, data, target)

