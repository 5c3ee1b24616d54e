"""The inputs of `merge inspect`: a merge config (a method and an output are optional here), opened like `merge run`.

A config written only to inspect needs no `method:` and no `output:`. Rather than loosening `MergeConfig`
(whose required keys protect `merge run`), the missing keys are filled with a neutral method
(task_arithmetic, which takes no parameter) and a placeholder output that is never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import PreparedMerge, prepare
from ..compat.mergekit import from_mergekit, is_mergekit_config
from ..config import MergeConfig, read_config_data
from ..errors import MergeConfigError
from ..hub.resolve import hub_reference
from .interference import split_calibration

#: what a config without `method:` is read as (it takes no parameter, so no adapter key can clash with it)
DEFAULT_METHOD = "task_arithmetic"
PLACEHOLDER_OUTPUT = "inspect_report/.unused_merge_output"


@dataclass(frozen=True)
class InspectConfig:
    """A merge config as inspect reads it, and whether the method came from the file."""

    config: MergeConfig
    method_given: bool
    #: each adapter's calibration keys when the method takes none (inspect reads them itself); None: not given
    calibration: list[dict[str, Any]] | None = None


def load_inspect_config(path: str | Path) -> InspectConfig:
    """Read a YAML merge config as `load_config` does (same checks and messages, mergekit's schema converted),
    `method` and `output` optional."""
    data, path = read_config_data(path)
    try:
        if is_mergekit_config(data):
            data = from_mergekit(data, path)
        return inspect_config_from_dict(data, path.resolve().parent)
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None


def inspect_config_from_dict(data: Any, base_dir: str | Path | None = None) -> InspectConfig:
    """Check a config mapping as `MergeConfig.from_dict` does, with `method` and `output` optional."""
    if not isinstance(data, dict):
        raise MergeConfigError("the config must be a mapping of keys (base_model, adapters, and optionally method)")
    filled = dict(data)
    method_given = "method" in filled
    calibration = None
    if not _takes_calibration(filled.get("method", DEFAULT_METHOD)):  # the adapters' data, not the method's
        filled, calibration = split_calibration(filled)
    if not method_given:
        if filled.get("parameters"):
            raise MergeConfigError("parameters: given without a method; add `method:` or drop them")
        filled["method"] = DEFAULT_METHOD
    filled.setdefault("output", {"path": PLACEHOLDER_OUTPUT})
    return InspectConfig(MergeConfig.from_dict(filled, base_dir), method_given, calibration)


def _takes_calibration(method: Any) -> bool:
    """True when the config's method reads `calibration:` itself (a data-aware method); an unknown method is left
    to MergeConfig's own message."""
    from ..methods.registry import REGISTRY

    row = REGISTRY.get(method) if isinstance(method, str) else None
    return row is None or any(p.name == "calibration" for p in row.params)


def open_inputs(config: MergeConfig, allow_pickle: bool = False) -> PreparedMerge:
    """Resolve (local folder or Hub id), open and plan the inputs as `merge run` does (adapters, then full models,
    each checked against the base), with no method checks: inspect reads every input's change, whichever method
    would merge them."""
    return prepare(config, allow_pickle=allow_pickle, method_checks=False)


def portable_folder(config: MergeConfig, reference: str, folder: Path) -> str:
    """Where `reference` was read from, without this machine's paths: a local folder relative to the config's
    folder (an absolute reference as given), a Hub snapshot relative to the Hub cache (repo and revision)."""
    if hub_reference(config, reference) is None:
        if Path(reference).expanduser().is_absolute():
            return reference
        return os.path.relpath(folder, config.resolve_path("."))
    from huggingface_hub import constants

    try:
        return str(folder.resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve()))
    except ValueError:  # fetched into a folder of its own
        return folder.name
