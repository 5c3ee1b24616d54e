"""The inputs of `merge inspect`: a merge config (a method and an output are optional here), opened like `merge run`.

A config written only to inspect needs no `method:` and no `output:`. Rather than loosening `MergeConfig`
(whose required keys protect `merge run`), the missing keys are filled with a neutral method
(task_arithmetic, which takes no parameter) and a placeholder output that is never written.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compat.mergekit import from_mergekit, is_mergekit_config
from ..config import MergeConfig, read_config_data
from ..engine.device import single_threaded_torch
from ..engine.plan import MergePlan, build_plan
from ..errors import MergeConfigError
from ..hub.resolve import hub_reference, resolve_model_dir
from ..sources.adapter import PeftAdapter
from ..sources.checkpoint import BaseCheckpoint
from ..sources.full_model import FullModel

#: what a config without `method:` is read as (it takes no parameter, so no adapter key can clash with it)
DEFAULT_METHOD = "task_arithmetic"
PLACEHOLDER_OUTPUT = "inspect_report/.unused_merge_output"


@dataclass(frozen=True)
class InspectConfig:
    """A merge config as inspect reads it, and whether the method came from the file."""

    config: MergeConfig
    method_given: bool


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
    if not method_given:
        if filled.get("parameters"):
            raise MergeConfigError("parameters: given without a method; add `method:` or drop them")
        filled["method"] = DEFAULT_METHOD
    filled.setdefault("output", {"path": PLACEHOLDER_OUTPUT})
    return InspectConfig(MergeConfig.from_dict(filled, base_dir), method_given)


@dataclass
class OpenedInputs:
    """The base and adapters opened lazily, and the plan of what each adapter changes; closes them on exit."""

    base: BaseCheckpoint
    adapters: list[PeftAdapter | FullModel]
    plan: MergePlan

    def close(self) -> None:
        """Close every file the inputs opened."""
        for adapter in self.adapters:
            adapter.close()
        self.base.close()

    def __enter__(self) -> OpenedInputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_inputs(config: MergeConfig, allow_pickle: bool = False) -> OpenedInputs:
    """Resolve (local folder or Hub id), open and plan the inputs as `merge run` does (adapters, then full models,
    each checked against the base), with no method checks: inspect reads every input's change, whichever method
    would merge them."""
    with ExitStack() as stack, single_threaded_torch():
        base = BaseCheckpoint(resolve_model_dir(config, config.base_model, kind="base"), allow_pickle=allow_pickle)
        stack.callback(base.close)
        adapters: list[PeftAdapter | FullModel] = []
        for spec in config.adapters:
            adapter = PeftAdapter(resolve_model_dir(config, spec.path, kind="adapter"), spec.label,
                                  allow_pickle=allow_pickle)
            stack.callback(adapter.close)
            adapters.append(adapter)
        for spec in config.models:
            model = FullModel(resolve_model_dir(config, spec.path, kind="base"), spec.label, allow_pickle=allow_pickle)
            stack.callback(model.close)
            model.check_against(base)
            adapters.append(model)
        plan = build_plan(base, adapters, None)  # type: ignore[arg-type]
        stack.pop_all()
    return OpenedInputs(base, adapters, plan)


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
