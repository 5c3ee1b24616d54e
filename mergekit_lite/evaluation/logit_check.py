"""The end-to-end proof of a single-adapter merge: its logits equal base + adapter run unmerged through PEFT.

Both models run in float32 on the CPU on the same seeded batch of token ids, so the only differences left are
the merge's float error and the rounding of the merged weights to the stored dtype; the default tolerance is
set by that dtype, relative to the size of the logits.

With formats (`merge verify --quantize`), a quantized column: the merged model with its Linear weights
quantized, Q(W+ΔW), against the same unmerged reference, beside the base's own drift Q(W) vs W, so a merge whose
ΔW the format rounds away shows as drift well beyond what quantizing the base costs anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, IntegrityError, MergeError, VerifyExtraMissing

if TYPE_CHECKING:
    from ..quantize.formats import QuantFormat

#: max |logit diff| allowed, as a fraction of max |logit|, by the least precise stored dtype
RELATIVE_TOLERANCE = {"F64": 1e-6, "F32": 1e-4, "F16": 1e-2, "BF16": 5e-2, "F8_E4M3": 0.3, "F8_E5M2": 0.3}
SEED = 0
BATCH = 3
SEQUENCE = 16


@dataclass(frozen=True)
class LogitComparison:
    """The figures of one comparison: max |diff|, the logits' scale, and the tolerance applied."""

    max_abs_diff: float
    scale: float
    tolerance: float
    stored_dtype: str
    tokens: int

    @property
    def relative(self) -> float:
        """max |diff| / max |logit| of the reference."""
        return self.max_abs_diff / self.scale if self.scale else math.inf

    @property
    def ok(self) -> bool:
        """Whether the merged model agrees with PEFT within the tolerance."""
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        """One line of figures: max |diff|, scale, relative diff and the tolerance."""
        return (f"merged vs PEFT base+adapter on {self.tokens} tokens: max |diff| {self.max_abs_diff:.3g} "
                f"(logits up to {self.scale:.3g}, relative {self.relative:.3g}; tolerance {self.tolerance:.3g} "
                f"for {self.stored_dtype})")


def compare_logits(merged: Path, base: str, adapter: str, atol: float | None = None,
                   stored_dtype: str = "F32") -> LogitComparison:
    """Run the merged model and PEFT's unmerged base+adapter on one batch; IntegrityError if they disagree."""
    import torch

    model, reference, ids = _load_pair(merged, base, adapter)
    ours, theirs = _logits(model, ids), _logits(reference, ids)
    if ours.shape != theirs.shape:
        raise IntegrityError(f"{merged}: logits of shape {list(ours.shape)}, base+adapter give {list(theirs.shape)}")
    scale = float(theirs.abs().max())
    tolerance = atol if atol is not None else RELATIVE_TOLERANCE.get(stored_dtype, 1e-4) * scale
    diff = float((ours - theirs).abs().max()) if torch.isfinite(ours).all() else math.inf
    result = LogitComparison(diff, scale, tolerance, stored_dtype, ids.numel())
    if not result.ok:
        raise IntegrityError(f"{merged}: the merged model disagrees with base+adapter: {result.describe()}")
    return result


def _load_pair(merged: Path, base: str, adapter: str) -> tuple[Any, Any, Any]:
    """The merged model, base + adapter through PEFT (unmerged), and the seeded batch of token ids."""
    import torch

    transformers, peft = _imports()
    model = _load(transformers, merged, "merged checkpoint", IntegrityError, strict=True)
    base_model = _load(transformers, base, "base model", InputError)
    try:
        reference = peft.PeftModel.from_pretrained(base_model, adapter).eval()
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"cannot load the adapter {adapter} onto {base}: {_short(error)}") from None
    vocab = min(model.get_input_embeddings().num_embeddings, reference.get_input_embeddings().num_embeddings)
    length = min(SEQUENCE, getattr(model.config, "max_position_embeddings", SEQUENCE) or SEQUENCE)
    ids = torch.randint(0, vocab, (BATCH, length), generator=torch.Generator().manual_seed(SEED))
    return model, reference, ids


def _logits(model: Any, ids: Any) -> Any:
    """float32 logits of one batch, no autograd."""
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------ the quantized column
#: a format loses the merge when the quantized merge drifts beyond this multiple of the base's own drift ...
DRIFT_RATIO_LIMIT = 1.5
#: ... by a drift that is more than this share of what the adapter itself moves the logits (mean |Δlogit|)
ADAPTER_SHARE_LIMIT = 0.1


@dataclass(frozen=True)
class Drift:
    """max and mean |logit difference| between two models on the batch."""

    max: float
    mean: float

    @classmethod
    def between(cls, ours: Any, theirs: Any) -> Drift:
        diff = (ours - theirs).abs()
        if not bool(diff.isfinite().all()):
            return cls(math.inf, math.inf)
        return cls(float(diff.max()), float(diff.mean()))

    def cell(self) -> str:
        return f"{self.max:.3g} / {self.mean:.3g}"


@dataclass(frozen=True)
class QuantizedLogits:
    """One format: (a) Q(W+ΔW) vs base+adapter unmerged, (b) Q(W) vs W, (c) Q(W)+adapter vs base+adapter."""

    format: str
    merged: Drift
    base: Drift
    unmerged: Drift
    #: Linear weights quantized in each model, and those left as they were (rows not whole blocks, ...)
    quantized: int
    left: int

    @staticmethod
    def _ratio(drift: Drift, reference: Drift) -> float:
        if reference.mean == 0:
            return 1.0 if drift.mean == 0 else math.inf
        return drift.mean / reference.mean

    @property
    def ratio(self) -> float:
        """mean |Δlogit| of the quantized merge over the base's own mean quantization drift (1: no worse)."""
        return self._ratio(self.merged, self.base)

    @property
    def unmerged_ratio(self) -> float:
        """The same ratio for the adapter served unmerged on the quantized base."""
        return self._ratio(self.unmerged, self.base)


@dataclass(frozen=True)
class QuantizedLogitCheck:
    """The quantized column of the logit check: one row per format, and how far the adapter moves the logits."""

    rows: list[QuantizedLogits]
    adapter: Drift
    tokens: int

    def of_adapter(self, row: QuantizedLogits) -> float:
        """The quantized merge's mean drift as a share of the adapter's own mean effect on the logits."""
        return row.merged.mean / self.adapter.mean if self.adapter.mean else math.inf

    def lost(self, row: QuantizedLogits) -> bool:
        """Drift well beyond the base's own, and large next to what the adapter does (a NaN counts as lost)."""
        return not (row.ratio <= DRIFT_RATIO_LIMIT or self.of_adapter(row) <= ADAPTER_SHARE_LIMIT)

    def lines(self) -> list[str]:
        """The console table and its one-line verdict."""
        head = ("format", "Q(W+ΔW) vs unmerged", "Q(W) vs W (base drift)", "ratio", "of adapter",
                "Q(W)+adapter vs unmerged (ratio)")
        table = [head] + [(r.format, r.merged.cell(), r.base.cell(), f"{r.ratio:.2f}x", f"{self.of_adapter(r):.1%}",
                           f"{r.unmerged.cell()} ({r.unmerged_ratio:.2f}x)") for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [f"quantized logits on {self.tokens} tokens, |Δlogit| max / mean against base+adapter unmerged "
                 f"(float32); ratio: mean over the base's own drift; of adapter: mean over the adapter's own "
                 f"effect on the logits ({self.adapter.cell()}):"]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
        left = [r for r in self.rows if r.left]
        if left:
            lines.append("  " + "; ".join(f"{r.format}: {r.left} Linear weight(s) left unquantized (rows not whole "
                                          f"blocks)" for r in left))
        lines.append(self.verdict())
        return lines

    def verdict(self) -> str:
        """One line: which formats drift the merge further from base+adapter than quantizing costs the base."""
        lost = [r for r in self.rows if self.lost(r)]
        kept = [r for r in self.rows if not self.lost(r)]
        summary = ", ".join(f"{r.format} {r.ratio:.2f}x ({self.of_adapter(r):.1%} of the adapter)" for r in kept)
        if not lost:
            return f"verdict: the quantized merge keeps the adapter's effect: {summary}"
        names = " and ".join(r.format for r in lost)
        return (f"verdict: {names} {'lose' if len(lost) > 1 else 'loses'} part of the merge: "
                + ", ".join(f"{r.format} {r.ratio:.2f}x the base's own drift, {self.of_adapter(r):.1%} of the "
                            f"adapter's effect (unmerged on the quantized base: {r.unmerged_ratio:.2f}x)" for r in lost)
                + "; serve the adapter unmerged on the quantized base"
                + (f", or use {', '.join(r.format for r in kept)}" if kept else ", or a finer format"))


def quantized_logits(merged: Path, base: str, adapter: str, formats: Sequence[QuantFormat]) -> QuantizedLogitCheck:
    """For each format, the merged model with its Linear weights quantized against base + adapter unmerged,
    with the base's own quantization drift as the reference (same weights quantized, same batch)."""
    from ..quantize.model import quantized

    model, reference, ids = _load_pair(merged, base, adapter)
    unmerged = _logits(reference, ids)
    with reference.disable_adapter():
        plain = _logits(reference, ids)
    if _logits(model, ids).shape != unmerged.shape:
        raise IntegrityError(f"{merged}: its logits' shape differs from base+adapter's")
    rows = []
    for fmt in formats:
        with quantized(model, fmt) as done:
            merged_drift = Drift.between(_logits(model, ids), unmerged)
        with quantized(reference, fmt):  # the base's Linear weights; PEFT's LoRA factors stay as they are
            served = Drift.between(_logits(reference, ids), unmerged)
            with reference.disable_adapter():
                base_drift = Drift.between(_logits(reference, ids), plain)
        rows.append(QuantizedLogits(fmt.name, merged_drift, base_drift, served, done.quantized, len(done.left)))
    return QuantizedLogitCheck(rows, Drift.between(unmerged, plain), ids.numel())


def _imports() -> tuple[Any, Any]:
    """transformers and peft, or a clear line saying how to install them."""
    try:
        import peft
        import transformers
    except ImportError as error:
        raise VerifyExtraMissing(f"the logit check needs transformers and peft ({error}); "
                                 "install them with: pip install 'mergekit_lite[verify]'") from None
    return transformers, peft


def _load(transformers: Any, source: str | Path, what: str, error_type: type[MergeError], strict: bool = False) -> Any:
    """A causal LM in float32 on the CPU; with `strict`, every weight must come from the checkpoint."""
    import torch

    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise error_type(f"cannot load the {what} {source} as a causal LM: {_short(error)}") from None
    missing = [k for k in info.get("missing_keys", ()) if k] if strict else []
    if missing:
        raise IntegrityError(f"{source}: transformers found no weights for {missing[0]}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return model.eval()


def recorded_inputs(folder: Path) -> tuple[str, str]:
    """(base, adapter) from the folder's recorded config, when it merged one adapter at full strength."""
    import yaml

    from ..api import CONFIG_COPY
    from ..config import MergeConfig

    path = folder / CONFIG_COPY
    try:
        config = MergeConfig.from_dict(yaml.safe_load(path.read_text()), base_dir=Path.cwd())
    except OSError:
        raise InputError(f"{path}: missing; give --base and --adapter instead of --against-inputs") from None
    except (yaml.YAMLError, MergeError) as error:
        raise InputError(f"{path}: cannot be read as a merge config ({_short(error)})") from None
    if len(config.adapters) != 1:
        raise InputError(f"{path}: merges {len(config.adapters)} adapters; the logit check compares one adapter")
    method = config.merge_method
    coefficients = method.coefficients(config.weights, config.global_params)
    coefficient = coefficients[0] if coefficients else None
    if method.sparsification is not None or coefficient is None or abs(coefficient - 1.0) > 1e-9:
        raise InputError(f"{path}: method {config.method} applies the adapter at "
                         f"{'coefficient ' + format(coefficient, 'g') if coefficient is not None else 'a non-linear rule'}"
                         "; the logit check compares against the adapter at full strength (coefficient 1)")
    return _local_or_id(config.base_model), _local_or_id(config.adapters[0].path)


def _local_or_id(recorded: str) -> str:
    """A recorded path as given when it exists here, else as a Hub id (transformers resolves or refuses it)."""
    path = Path(recorded).expanduser()
    if path.exists():
        return str(path.resolve())
    if path.is_absolute():
        raise InputError(f"the recorded input {recorded} no longer exists; give --base and --adapter")
    return recorded


def _short(error: BaseException) -> str:
    """An error's message on one line, cut to a readable length."""
    return " ".join(str(error).split())[:300]
