"""The inputs of `merge inspect`: a merge config (a method and an output are optional here), opened like `merge run`.

A config written only to inspect needs no `method:` and no `output:`. Rather than loosening `MergeConfig`
(whose required keys protect `merge run`), the missing keys are filled with a neutral method
(task_arithmetic, which takes no parameter) and a placeholder output that is never written.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import MAX_CONFIG_BYTES, MergeConfig, _check_expanded_size, _yaml_problem
from ..engine.device import single_threaded_torch
from ..engine.plan import MergePlan, build_plan
from ..errors import MergeConfigError
from ..hub.resolve import resolve_model_dir
from ..sources.adapter import PeftAdapter
from ..sources.checkpoint import BaseCheckpoint

#: what a config without `method:` is read as (it takes no parameter, so no adapter key can clash with it)
DEFAULT_METHOD = "task_arithmetic"
PLACEHOLDER_OUTPUT = "inspect_report/.unused_merge_output"


@dataclass(frozen=True)
class InspectConfig:
    """A merge config as inspect reads it, and whether the method came from the file."""

    config: MergeConfig
    method_given: bool


def load_inspect_config(path: str | Path) -> InspectConfig:
    """Read a YAML merge config as `load_config` does (same limits and messages), `method` and `output` optional."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MergeConfigError(f"{path}: {path.stat().st_size} bytes is too large for a merge config "
                                   f"(limit {MAX_CONFIG_BYTES // 1024} KiB); is this the right file?")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MergeConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise MergeConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise MergeConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    _check_expanded_size(data, path)
    try:
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
    adapters: list[PeftAdapter]
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
    """Resolve (local folder or Hub id), open and plan the inputs as `merge run` does, with no method checks:
    inspect reads every adapter's change, whichever method would merge them."""
    with ExitStack() as stack, single_threaded_torch():
        base = BaseCheckpoint(resolve_model_dir(config, config.base_model, kind="base"), allow_pickle=allow_pickle)
        stack.callback(base.close)
        adapters = []
        for spec in config.adapters:
            adapter = PeftAdapter(resolve_model_dir(config, spec.path, kind="adapter"), spec.label,
                                  allow_pickle=allow_pickle)
            stack.callback(adapter.close)
            adapters.append(adapter)
        plan = build_plan(base, adapters, None)
        stack.pop_all()
    return OpenedInputs(base, adapters, plan)
