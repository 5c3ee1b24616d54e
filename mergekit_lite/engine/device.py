"""Choosing the compute device and measuring peak memory on it."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import MergeConfigError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda[:N]' must exist."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MergeConfigError(f"--device: unknown device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeConfigError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MergeConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise MergeConfigError(f"--device {spec}: only cpu and cuda are supported")
    return device


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes(device: torch.device) -> int:
    """Peak memory allocated by torch on a CUDA device (0 on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops on one thread: for the many small tensors of a merge's set-up (adapter factors, cores) the
    thread pool only adds hand-offs, and on a busy machine its waiting threads made each op ~100x slower
    (measured: 16 ms instead of 0.1 ms for a 5632×16 multiply or NaN check)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
