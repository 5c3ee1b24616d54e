"""Which rows a `merge eval` scores: the base, each adapter alone (through PEFT), each merge, plain folders.

Everything is found locally (a folder, or the Hub cache): an evaluation never downloads a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvalError
from .harness import offline
from .scores import RetentionRef

if TYPE_CHECKING:
    from ..config import MergeConfig


@dataclass(frozen=True)
class ModelSpec:
    """One row of the report: a checkpoint folder, optionally with a PEFT adapter applied on top (unmerged)."""

    name: str
    kind: str  # "base", "adapter", "merge" or "model"
    path: Path
    adapter: Path | None = None

    def model_args(self, device: str, dtype: str = "auto") -> dict[str, Any]:
        """lm-eval `hf` model arguments: absolute paths only (a relative one looks like a Hub repo id)."""
        args: dict[str, Any] = {"pretrained": str(self.path.resolve()), "device": device, "dtype": dtype}
        if self.adapter is not None:
            args["peft"] = str(self.adapter.resolve())
        return args

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"name": self.name, "kind": self.kind, "path": str(self.path),
                "adapter": str(self.adapter) if self.adapter else None}


def file_stem(name: str) -> str:
    """A row's name as a file name (its results and lm-eval folders): safe characters only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def check_unique_names(models: Sequence[ModelSpec]) -> None:
    """Refuse two rows whose file names would be the same (one's results would overwrite the other's)."""
    seen: set[str] = set()
    for model in models:
        stem = file_stem(model.name)
        if stem in seen:
            raise EvalError(f"two models are both named '{model.name}': their result files would collide")
        seen.add(stem)


def local_model_dir(config: MergeConfig, reference: str, kind: str) -> Path:
    """A base or adapter folder without any download (local, or already in the Hub cache), else an error."""
    from ..hub.resolve import cached_model_dir

    with offline():
        folder = cached_model_dir(config, reference, kind)
    if folder is None:
        raise EvalError(f"{kind} '{reference}' is not available locally: merge eval never downloads; run "
                        "`merge run` (which fetches Hub references) first")
    return folder


def plan_models(configs: Sequence[MergeConfig], merged_dirs: Sequence[Path],
                model_dirs: Sequence[Path] = ()) -> tuple[list[ModelSpec], dict[str, RetentionRef]]:
    """Rows for configs (base, each adapter alone through PEFT, the merge) and plain model folders."""
    models: list[ModelSpec] = []
    by_key: dict[tuple[str, str | None], str] = {}
    taken: set[str] = set()

    def add(name: str, kind: str, path: Path, adapter: Path | None = None) -> str:
        key = (str(path.resolve()), str(adapter.resolve()) if adapter else None)
        if key in by_key:
            return by_key[key]
        unique, n = name, 2
        while file_stem(unique) in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(file_stem(unique))
        by_key[key] = unique
        models.append(ModelSpec(unique, kind, path.resolve(), adapter.resolve() if adapter else None))
        return unique

    references: dict[str, RetentionRef] = {}
    bases = {str(local_model_dir(c, c.base_model, "base").resolve()) for c in configs}
    for config, merged in zip(configs, merged_dirs):
        base_dir = local_model_dir(config, config.base_model, "base")
        base_name = add("base" if len(bases) == 1 else f"base:{base_dir.name}", "base", base_dir)
        adapter_names = tuple(
            add(spec.label, "adapter", base_dir, local_model_dir(config, spec.path, "adapter"))
            for spec in config.adapters
        )
        if is_adapter_output(Path(merged)):  # format: peft: the base with the merged adapter, unmerged
            merged_name = add(Path(merged).name, "merge", base_dir, Path(merged))
        else:
            merged_name = add(Path(merged).name, "merge", Path(merged))
        references[merged_name] = RetentionRef(base_name, adapter_names)
    for folder in model_dirs:
        if is_adapter_output(Path(folder)):
            add(Path(folder).resolve().name, "model", adapter_base(Path(folder)), Path(folder))
        else:
            add(Path(folder).resolve().name, "model", Path(folder))
    return models, references


def is_adapter_output(folder: Path) -> bool:
    """True for a PEFT adapter folder (a `format: peft` merge): adapter_config.json and no config.json."""
    from ..formats.peft import is_adapter_folder

    return is_adapter_folder(folder)


def adapter_base(folder: Path) -> Path:
    """The local base folder an adapter folder names (base_model_name_or_path), for evaluating it through PEFT."""
    recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    candidate = Path(recorded) if Path(recorded).is_absolute() else (folder / recorded)
    if not candidate.is_dir():
        raise EvalError(f"{folder}: its base '{recorded}' is not a local folder; evaluate the merge config instead, "
                        "which names the base")
    return candidate.resolve()

