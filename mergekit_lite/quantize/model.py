"""`merge eval --quantize FORMAT`: score each row as its quantized model would behave.

After lm-eval loads a row's model, every Linear weight (the head aside, as bitsandbytes and llama.cpp's mixes
keep it finer) is replaced in memory by dequantize(quantize(W)) from the format's own library. A PEFT row
(an adapter alone, or a merge written as an adapter) keeps its LoRA factors unquantized: that row is the
adapter served unmerged on a quantized base, the alternative a merge-then-quantize loses against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from dataclasses import dataclass
from typing import Any

import torch

from .formats import QuantFormat, format_of

logger = logging.getLogger(__name__)

#: Linear modules left unquantized: the output head, and LoRA's own factors
_SKIP = ("lm_head", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
#: rows quantized at a time (bounded temporaries on large weights)
_ROWS = 4096
#: what --quantize does to each row, in the report's words
SCOPE = ("every Linear weight but the output head quantized and dequantized in memory after loading; adapter "
         "rows keep their LoRA factors unquantized (the adapter served unmerged on a quantized base)")


@dataclass(frozen=True)
class QuantizedWeights:
    """What `quantize_weights` did: tensors replaced, and tensors left as they were (with why)."""

    quantized: int
    left: list[tuple[str, str]]


def _eligible(name: str, module: torch.nn.Module) -> bool:
    """A Linear module that --quantize rounds: not the output head, not a LoRA factor."""
    return isinstance(module, torch.nn.Linear) and not any(part in _SKIP for part in name.split("."))


def quantize_weights(model: torch.nn.Module, fmt: QuantFormat) -> QuantizedWeights:
    """Replace every eligible Linear weight of `model` by its quantized-dequantized value, in place."""
    quantized = 0
    left: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not _eligible(name, module):
            continue
        weight = module.weight
        why = fmt.unfit(tuple(weight.shape))
        if why is not None:
            left.append((name, why))
            continue
        with torch.no_grad():
            for start in range(0, weight.shape[0], _ROWS):
                rows = weight.data[start:start + _ROWS]
                rows.copy_(fmt.roundtrip(rows.to("cpu")).to(rows.device, rows.dtype))
        quantized += 1
    return QuantizedWeights(quantized, left)


@contextmanager
def quantized(model: torch.nn.Module, fmt: QuantFormat) -> Iterator[QuantizedWeights]:
    """`quantize_weights` for the length of a block, the original weights put back after it (the quantized
    logit check runs one loaded model under several formats without reloading it; holds a copy of them)."""
    saved = {name: module.weight.detach().clone() for name, module in model.named_modules() if _eligible(name, module)}
    modules = dict(model.named_modules())
    try:
        yield quantize_weights(model, fmt)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.data.copy_(weight)


def library_version(library: str) -> str | None:
    """The installed version of a format's library (gguf, bitsandbytes), None when its metadata is missing."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


class QuantizedRows:
    """While entered, every model `merge eval` loads is quantized to format `name` right after loading.

    The format is resolved when this is made (None: a no-op), so an unknown or unavailable one fails before
    anything is merged or loaded. What each row's load did is kept for the report (`record`).
    """

    def __init__(self, name: str | None, note: Callable[[str], object] | None = None) -> None:
        self.format = format_of(name) if name is not None else None
        self.note = note or logger.info
        self._original: Any = None
        #: per row (model name): Linear weights quantized, and those left as they were with why
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self) -> dict[str, Any] | None:
        """What the report must say was measured (scores.json's "quantize", a line of report.md): the format,
        its library and version, what was quantized, and per row what its load did. None without a format."""
        if self.format is None:
            return None
        return {"format": self.format.name, "library": self.format.library,
                "version": library_version(self.format.library), "scope": SCOPE,
                "rows": {name: dict(row) for name, row in self.rows.items()}}

    def __enter__(self) -> QuantFormat | None:
        if self.format is None:
            return None
        from ..evaluation import lm_eval_runner

        original = self._original = lm_eval_runner.load_lm
        fmt, note, rows = self.format, self.note, self.rows

        def load_quantized(model: Any, options: Any) -> Any:
            lm = original(model, options)
            done = quantize_weights(lm.model, fmt)
            rows[model.name] = {"quantized": done.quantized,
                                "left": [{"module": name, "why": why} for name, why in done.left]}
            message = f"{model.name}: {done.quantized} Linear weight(s) quantized to {fmt.name} in memory"
            if done.left:
                message += f", {len(done.left)} left as they are ({done.left[0][0]}: {done.left[0][1]})"
            note(message)
            return lm

        lm_eval_runner.load_lm = load_quantized
        return fmt

    def __exit__(self, *exc_info: object) -> None:
        if self._original is not None:
            from ..evaluation import lm_eval_runner

            lm_eval_runner.load_lm = self._original
            self._original = None
