"""`merge verify`: re-check a finished checkpoint, one result per check, so a bad folder is caught before use.

Checks: config.json parses; index and shards agree and every file is complete (`integrity.read_layout`);
every floating tensor is finite (streamed a row chunk at a time, never a whole model); optionally the
merged model's logits equal base + adapter run unmerged through PEFT (`logit_check`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, IntegrityError, NotACheckpointError
from ..formats.integrity import read_layout
from ..formats.safetensors import DTYPES, FLOAT_DTYPES, SafetensorsFile, TensorInfo, is_floating
from ..progress import byte_progress
from ..units import format_size

#: bytes of one tensor read at a time by the finiteness scan
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ok, failed (with what is wrong) or skipped (an earlier check failed)."""

    name: str
    status: str  # "ok", "FAIL" or "skipped"
    detail: str

    def line(self) -> str:
        """One report line, e.g. `finite      ok: 21 floating tensors (349.2 kB) hold no NaN or Inf`."""
        return f"{self.name:11s} {self.status}: {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    """All check results for one folder; `raise_for_faults` turns a failure into IntegrityError (exit 1)."""

    folder: Path
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(check.status != "FAIL" for check in self.checks)

    def lines(self) -> list[str]:
        """The human report, one line per check."""
        return [check.line() for check in self.checks]

    def raise_for_faults(self) -> None:
        """Raise IntegrityError naming the first failed check, if any."""
        failed = [check for check in self.checks if check.status == "FAIL"]
        if failed:
            raise IntegrityError(f"{self.folder}: {len(failed)} check(s) failed: "
                                 f"{', '.join(check.name for check in failed)}")


def verify_checkpoint(folder: str | Path, *, base: str | None = None, adapter: str | None = None,
                      atol: float | None = None, chunk_bytes: int = CHUNK_BYTES,
                      progress: bool = False) -> VerifyReport:
    """Check a merged folder and return one result per check (NotACheckpointError when it is no checkpoint)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotACheckpointError(f"{folder}: not a folder (give the output folder of `merge run`)")
    checks: list[CheckResult] = []
    layout: dict[str, dict[str, TensorInfo]] | None = None

    def run(name: str, check: Callable[[], str]) -> None:
        try:
            checks.append(CheckResult(name, "ok", check()))
        except NotACheckpointError:
            raise
        except IntegrityError as error:
            checks.append(CheckResult(name, "FAIL", str(error)))

    def check_layout() -> str:
        nonlocal layout
        layout = read_layout(folder)
        count = sum(len(tensors) for tensors in layout.values())
        size = sum(t.nbytes for tensors in layout.values() for t in tensors.values())
        index = "index matches the shards, " if len(layout) > 1 else ""
        return f"{count} tensors, {format_size(size)} in {len(layout)} shard(s); {index}headers sane, sizes match"

    run("layout", check_layout)
    run("config.json", lambda: check_config(folder))
    if layout is None:
        checks.append(CheckResult("finite", "skipped", "the layout is broken"))
    else:
        run("finite", lambda: check_finite(folder, layout or {}, chunk_bytes, progress))
    if base is not None or adapter is not None:
        if base is None or adapter is None:
            raise InputError("the logit check needs both --base and --adapter")
        if not all(check.status == "ok" for check in checks):
            checks.append(CheckResult("logits", "skipped", "an earlier check failed"))
        else:
            from .logit_check import compare_logits

            run("logits", lambda: compare_logits(folder, base, adapter, atol, _lowest_float(layout or {})).describe())
    return VerifyReport(folder, checks)


def check_config(folder: Path) -> str:
    """config.json is present and is a JSON object (transformers cannot load the folder otherwise)."""
    path = folder / "config.json"
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (transformers cannot load the checkpoint without it)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{path}: holds a JSON {type(config).__name__}, not an object")
    return f"parses (model_type {config.get('model_type', 'not set')})"


def check_finite(folder: Path, layout: dict[str, dict[str, TensorInfo]], chunk_bytes: int = CHUNK_BYTES,
                 progress: bool = False) -> str:
    """Every floating tensor holds no NaN or Inf, read a row chunk at a time (memory stays at one chunk)."""
    floats = [(shard, t) for shard, tensors in layout.items() for t in tensors.values() if is_floating(t.dtype)]
    total = sum(t.nbytes for _, t in floats)
    bar = byte_progress(total, progress, "verifying")
    first: tuple[str, str, int, int] | None = None
    bad = 0
    try:
        for shard in layout:
            reader = SafetensorsFile(folder / shard)
            try:
                for tensor in sorted((t for s, t in floats if s == shard), key=lambda t: t.offset):
                    nan, inf = _count_nonfinite(reader, tensor, chunk_bytes)
                    bar.update(tensor.nbytes)
                    if nan or inf:
                        bad += 1
                        first = first or (shard, tensor.name, nan, inf)
            finally:
                reader.close()
    finally:
        bar.close()
    if first is not None:
        shard, name, nan, inf = first
        others = f" ({bad - 1} more tensor(s) too)" if bad > 1 else ""
        raise IntegrityError(f"{folder / shard}: tensor '{name}' holds {nan} NaN and {inf} Inf value(s){others}")
    return f"{len(floats)} floating tensors ({format_size(total)}) hold no NaN or Inf"


def _count_nonfinite(reader: SafetensorsFile, tensor: TensorInfo, chunk_bytes: int) -> tuple[int, int]:
    """(NaN count, Inf count) of one tensor, streamed in row chunks of at most ~chunk_bytes."""
    step = max(1, chunk_bytes // max(tensor.row_bytes, 1))
    nan = inf = 0
    for start in range(0, tensor.rows, step):
        try:
            chunk = reader.tensor(tensor.name, start, min(start + step, tensor.rows))
        except ValueError as error:
            raise IntegrityError(f"{reader.path}: tensor '{tensor.name}' cannot be read ({error})") from None
        if tensor.dtype not in FLOAT_DTYPES:  # 8-bit floats are widened first: torch supports them only in part
            chunk = chunk.float()
        nan += int(torch.isnan(chunk).sum())
        inf += int(torch.isinf(chunk).sum())
    return nan, inf


def _lowest_float(layout: dict[str, dict[str, TensorInfo]]) -> str:
    """The least precise floating dtype stored (fewest significand bits), which sets how closely the logits agree."""
    stored = {t.dtype for tensors in layout.values() for t in tensors.values() if is_floating(t.dtype)}
    return min(stored, key=lambda code: DTYPES[code].significand or 0, default="F32")
