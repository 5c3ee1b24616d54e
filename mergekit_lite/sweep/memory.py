"""A merge's touched tensors in memory, and a loaded model patched with them and restored afterwards.

`merged_tensors` is an output kind that writes nothing: the engine merges each tensor an adapter changes exactly as
`merge run` would (the same schedule, kernels and rounding: the bytes a written checkpoint would hold for it) and
hands back the rows instead of writing them; untouched tensors are skipped (the model holds the base already).
`ModelPatcher` copies those tensors into a loaded Hugging Face model and puts the base's own values back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import PreparedMerge, engine_for
from ..engine.device import single_threaded_torch
from ..engine.schedule import MERGE
from ..engine.sink import TensorSink
from ..errors import MergeError
from ..formats.safetensors import TORCH_DTYPES, TensorInfo
from ..progress import byte_progress


class _Collector(TensorSink):
    """The sink the engine streams one tensor's chunks into (engine.sink.TensorSink): the chunks' bytes, in order."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def begin(self, name: str) -> None:
        """Nothing to do: one collector per tensor."""

    def write(self, data: memoryview) -> None:
        """Keep a copy of the chunk's bytes (the engine may reuse its buffers)."""
        self.parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))


@dataclass
class MemoryOutput:
    """The in-memory output kind: every merged tensor as (name -> tensor in the output dtype, base shape)."""

    name: str = "memory"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def layout(self, engine: Any) -> list[TensorInfo]:
        """Only the tensors an adapter changes, in read order (the rest stay the base's in the model)."""
        return [TensorInfo(s.name, s.plan.out_dtype, s.plan.info.shape, s.plan.out_nbytes)
                for s in engine.schedules if s.action == MERGE]

    def produce(self, engine: Any) -> dict[str, torch.Tensor]:
        """Merge every touched tensor through the engine's own per-tensor path, into memory."""
        started = time.perf_counter()
        silent = byte_progress(0, False)
        for schedule in engine.schedules:
            if schedule.action != MERGE:
                continue
            collector = _Collector()
            engine.merge_into(schedule, collector, silent)
            flat = torch.cat(collector.parts) if len(collector.parts) > 1 else collector.parts[0]
            dtype = TORCH_DTYPES[schedule.plan.out_dtype]
            self.tensors[schedule.name] = flat.view(dtype).reshape(schedule.plan.info.shape)
        self.seconds = time.perf_counter() - started
        return self.tensors


def merged_tensors(prepared: PreparedMerge, device: torch.device) -> dict[str, torch.Tensor]:
    """The touched tensors of `prepared`'s merge, merged in memory (same bytes as `merge run` writes for them)."""
    from ..methods.registry import CalibrationRun

    prepared.calibrate(CalibrationRun(device))  # learned / regmean: their forward passes first, once
    engine = engine_for(prepared, device, None, None, 1)
    with single_threaded_torch():
        return MemoryOutput().produce(engine)


class ModelPatcher:
    """Swap merged tensors into a loaded model by checkpoint name, and restore the base's values exactly.

    The base's value of a tensor is copied aside the first time the tensor is patched (once per sweep, not per
    point); `restore` copies it back, so the model's bytes after a restore are the loaded base's.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._targets = model.state_dict(keep_vars=True)
        self._saved: dict[str, torch.Tensor] = {}
        self._patched: list[str] = []

    def _target(self, name: str) -> tuple[str, torch.Tensor]:
        for candidate in (name, name.removeprefix("model."), f"model.{name}", name.removeprefix("transformer.")):
            if candidate in self._targets:
                return candidate, self._targets[candidate]
        raise MergeError(f"sweep: the loaded model has no tensor for checkpoint tensor '{name}'")

    def apply(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write each merged tensor into the model (restoring any earlier patch first)."""
        self.restore()
        with torch.no_grad():
            for name, value in tensors.items():
                key, target = self._target(name)
                if tuple(target.shape) != tuple(value.shape):
                    raise MergeError(f"sweep: tensor '{name}' is {tuple(value.shape)} in the merge but "
                                     f"{tuple(target.shape)} in the loaded model")
                if key not in self._saved:
                    self._saved[key] = target.detach().to("cpu", copy=True)
                self._patched.append(key)
                target.data.copy_(value.to(device=target.device, dtype=target.dtype))

    def restore(self) -> None:
        """Put back the base values of every patched tensor."""
        with torch.no_grad():
            for key in self._patched:
                self._targets[key].data.copy_(self._saved[key])
        self._patched = []
