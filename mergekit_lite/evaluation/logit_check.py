"""The end-to-end proof of a single-adapter merge: its logits equal base + adapter run unmerged through PEFT.

Both models run in float32 on the CPU on the same seeded batch of token ids, so the only differences left are
the merge's float error and the rounding of the merged weights to the stored dtype; the default tolerance is
set by that dtype, relative to the size of the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, IntegrityError, MergeError, VerifyExtraMissing

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
    with torch.inference_mode():
        ours = model(input_ids=ids).logits.float()
        theirs = reference(input_ids=ids).logits.float()
    if ours.shape != theirs.shape:
        raise IntegrityError(f"{merged}: logits of shape {list(ours.shape)}, base+adapter give {list(theirs.shape)}")
    scale = float(theirs.abs().max())
    tolerance = atol if atol is not None else RELATIVE_TOLERANCE.get(stored_dtype, 1e-4) * scale
    diff = float((ours - theirs).abs().max()) if torch.isfinite(ours).all() else math.inf
    result = LogitComparison(diff, scale, tolerance, stored_dtype, ids.numel())
    if not result.ok:
        raise IntegrityError(f"{merged}: the merged model disagrees with base+adapter: {result.describe()}")
    return result


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
