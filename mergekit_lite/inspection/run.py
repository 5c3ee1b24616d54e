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
from .interference import (SUGGESTED_YAML, calibration_specs, check_size, measure, read_prompts, report_json,
                           source_names, sources_of, suggested_config)
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
            allow_pickle: bool = False, calibration: list[dict[str, Any]] | None = None,
            calibration_size: int | None = None) -> InspectResult:
    """Measure the config's adapters against its base and write the report folder `out`.

    With calibration data (the method's own `calibration:` keys, or `calibration` as `load_inspect_config` set them
    aside), the interference matrix is measured too (`interference.measure`) and suggested_merge.yaml written."""
    from ..writers.preflight import resolve_output

    target = resolve_output(Path(out), "--out")  # a symlink loop is one line
    check_output_folder(target, "inspect", local_inputs(config))
    if sample is not None and sample < 1:
        raise MergeConfigError(f"--sample {sample}: must be a positive number of entries")
    try:
        budget = parse_size(max_memory) if max_memory is not None else DEFAULT_MAX_MEMORY
    except ValueError as error:
        raise MergeConfigError(f"--max-memory {max_memory}: {error}") from None
    options = InspectOptions(density=density, sample=sample, max_memory=budget, device=resolve_device(device))
    check_size(calibration_size)
    specs = calibration_specs(config, calibration)
    sources = sources_of(config, specs, calibration_size) if specs is not None else None
    texts = read_prompts(sources, config.seed) if sources is not None else None  # refused before any input opens
    measured = None
    with open_inputs(config, allow_pickle) as inputs:
        inspection = analyse(config, method_given, inputs, options, progress)
        if sources is not None:
            measured = measure(inputs, sources, device=options.device, seed=config.seed, progress=progress,
                               texts=texts)
            measured.sources = source_names(config, sources)
    interference = report_json(measured, SUGGESTED_YAML if measured.weights else None) if measured else None
    with owned_folder(target, "inspect") as staging:
        figures = []
        if plots:
            from .figures import write_figures

            figures = write_figures(report_data(inspection, [], interference), staging)
        data = report_data(inspection, figures, interference)
        if measured is not None and measured.weights:
            (staging / SUGGESTED_YAML).write_text(suggested_config(config, measured.weights, target, (
                "# Starting weights from merge inspect's interference matrix (report.md): every pairwise merge's\n"
                "# measured loss is at most the share stated there. Run: merge run suggested_merge.yaml; score:\n"
                "# merge eval suggested_merge.yaml; or sweep around them, or use method: learned.\n")))
        (staging / REPORT_JSON).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        (staging / REPORT_MD).write_text(markdown_report(data))
    return InspectResult(inspection, data, target)

