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
from ..formats import peft
from ..formats.integrity import read_layout, read_shard
from ..formats.safetensors import DTYPES, FLOAT_DTYPES, SafetensorsFile, TensorInfo, is_floating
from ..progress import byte_progress
from ..units import format_size

ADAPTER_CONFIG, ADAPTER_WEIGHTS = peft.CONFIG_FILE, peft.WEIGHTS_FILE
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
                      progress: bool = False, checkpoint: str | None = None) -> VerifyReport:
    """Check a merged folder and return one result per check (NotACheckpointError when it is no checkpoint).

    A merged PEFT adapter (`output.format: peft`) is recognised by its adapter_config.json; `checkpoint` then
    names the checkpoint merge of the same config, whose logits base + this adapter must reproduce.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotACheckpointError(f"{folder}: not a folder (give the output folder of `merge run`)")
    if peft.is_adapter_folder(folder):
        return verify_adapter(folder, base=base, checkpoint=checkpoint, atol=atol, chunk_bytes=chunk_bytes,
                              progress=progress)
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


def verify_adapter(folder: Path, *, base: str | None = None, checkpoint: str | None = None,
                   atol: float | None = None, chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> VerifyReport:
    """The checks of a merged PEFT adapter: its one safetensors file, its LoRA config and factor pairs, finite
    factors; with `base` and `checkpoint`, base + adapter (PEFT, unmerged) against the checkpoint merge's logits."""
    checks: list[CheckResult] = []
    layout: dict[str, dict[str, TensorInfo]] = {}

    def run(name: str, check: Callable[[], str]) -> None:
        try:
            checks.append(CheckResult(name, "ok", check()))
        except IntegrityError as error:
            checks.append(CheckResult(name, "FAIL", str(error)))

    def check_layout() -> str:
        path = folder / ADAPTER_WEIGHTS
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (PEFT loads the adapter's factors from it)")
        layout[ADAPTER_WEIGHTS] = read_shard(path)
        tensors = layout[ADAPTER_WEIGHTS]
        size = sum(t.nbytes for t in tensors.values())
        return f"{len(tensors)} tensors, {format_size(size)}; header sane, size matches"

    run("layout", check_layout)
    run(ADAPTER_CONFIG, lambda: check_adapter_config(folder, layout.get(ADAPTER_WEIGHTS, {})))
    if not layout:
        checks.append(CheckResult("finite", "skipped", "the layout is broken"))
    else:
        run("finite", lambda: check_finite(folder, layout, chunk_bytes, progress))
    if base is not None or checkpoint is not None:
        if base is None or checkpoint is None:
            raise InputError("the logit check of an adapter output needs --base and --checkpoint (the checkpoint "
                             "merge of the same config)")
        if not all(check.status == "ok" for check in checks):
            checks.append(CheckResult("logits", "skipped", "an earlier check failed"))
        else:
            from .logit_check import compare_logits

            run("logits", lambda: compare_logits(Path(checkpoint), base, str(folder), atol,
                                                 _lowest_float(layout)).describe())
    return VerifyReport(folder, checks)


def check_adapter_config(folder: Path, tensors: dict[str, TensorInfo]) -> str:
    """adapter_config.json is a LoRA config, and every lora_A has its lora_B with the same rank."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise IntegrityError(f"{path}: not a LoRA adapter config (peft_type {config.get('peft_type')!r})"
                             if isinstance(config, dict) else f"{path}: not a JSON object")
    pairs = 0
    for name, a in tensors.items():
        for a_suffix, b_suffix in ((f".{a_part}", f".{b_part}") for a_part, b_part in peft.FACTOR_PARTS):
            if name.endswith(a_suffix):
                b = tensors.get(name[: -len(a_suffix)] + b_suffix)
                if b is None:
                    raise IntegrityError(f"{folder / ADAPTER_WEIGHTS}: '{name}' has no {b_suffix.lstrip('.')}")
                if a.shape[0] != b.shape[1]:
                    raise IntegrityError(f"{folder / ADAPTER_WEIGHTS}: '{name}' has rank {a.shape[0]} but its "
                                         f"{b_suffix.lstrip('.')} has {b.shape[1]}")
                pairs += 1
    return f"LoRA, r={config.get('r')}, {pairs} factor pair(s), {len(config.get('rank_pattern') or {})} rank pattern(s)"


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
