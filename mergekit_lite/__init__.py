"""mergekit_lite: merge PEFT LoRA adapters into one standard checkpoint, streamed, with exact semantics."""

from __future__ import annotations

from .api import MergeResult, describe_plan, merge
from .config import MergeConfig, load_config
from .errors import AdapterError, CheckpointError, InputError, MergeConfigError, MergeError, NonFiniteError
from .version import tool_version

__version__ = tool_version()

__all__ = [
    "AdapterError",
    "CheckpointError",
    "InputError",
    "MergeConfig",
    "MergeConfigError",
    "MergeError",
    "MergeResult",
    "NonFiniteError",
    "__version__",
    "describe_plan",
    "load_config",
    "merge",
]
