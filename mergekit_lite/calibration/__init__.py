"""One home for data-aware merging: calibration prompts → token batches → each adapter's teacher pass (cached).

Data-aware methods (`learned`, `regmean`) need the model's forward passes on a few dozen unlabeled prompts per
adapter before the streamed write. They get them here, and nowhere else; the engine never trains. A method's
registry row declares a `CalibratedPhase` (methods/registry.py): its `calibrate(prepared, run)` runs once, after
the inputs are opened and checked and before any output is written, and returns a `Calibrated`, which says what
the engine streams instead (a linear phase with per-tensor coefficients, or a factored phase) and what to write
beside the output (side files, a card section).

Interface (stable; other data-aware methods build on it):

    from mergekit_lite.calibration import CALIBRATION_PARAMS, Calibration, load_calibration

    # 1. the method declares the per-adapter calibration keys among its parameters:
    params = (*CALIBRATION_PARAMS, Param("alpha", 0.9, float, ...))
    # (`calibration`: FILE.jsonl | FILE.txt | lm-eval task name or YAML; `calibration_size`: 64;
    #  `calibration_template`: "Q: {{question}}\\nA:" to build prompts from a JSONL's fields)
    # and checks them at config time with `check_calibration(adapter_params)` from its `validate`.

    # 2. in its CalibratedPhase.calibrate(prepared, run):
    calibration = load_calibration(prepared, device=run.device, seed=prepared.config.seed, progress=run.progress)
    model = calibration.model            # BranchedModel: the base loaded once (transformers), every adapter a
                                         # frozen low-rank branch; model.tensors: changed base tensors (checkpoint
                                         # names, in order); model.coefficients: adapters × tensors, read at each
                                         # forward (settable, differentiable); model.teacher(i): adapter i alone;
                                         # model.module(tensor): the nn.Module to hook for that tensor's input;
                                         # model.logits(batch) -> b×T×V float32
    calibration.prompts[i]               # adapter i's prompts as token ids (list[list[int]]), seeded draw
    calibration.sources[i]               # CalibrationSource: where they came from (for the card)
    for batch in calibration.batches(i, batch_size=16):   # TokenBatch: input_ids, attention_mask (1 = token),
        with model.teacher(i): model.logits(batch)         # right-padded; mask padding out of any statistic
    teachers = calibration.teachers(max_new_tokens=16, log_probs=False)   # list[TeacherSet], cached on disk
    ...
    calibration.close()

    # 3. `merge sweep` calls `refuse_scored_calibration(point_config)` for data-aware points (no calibration on
    #    what the sweep scores), and its in-memory merge runs `calibrate` before streaming a point.

Modules: prompts.py (sources, the seeded draw), batches.py (tokenize, cut, pad), model.py (BranchedModel),
teachers.py (greedy targets, the disk cache), fit.py (`learned`'s coefficient fit).

Everything that can be refused is refused before any output is written: an adapter without calibration data, an
unreadable or empty file, rows without a usable field, a task with only a test split, full fine-tunes, DoRA and
saved whole tensors (`model.BranchedModel` says why, naming adapter and tensor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeConfigError
from ..methods.registry import Param
from .batches import TokenBatch, chunks, encode, pad
from .prompts import DEFAULT_SIZE, CalibrationSource, check_apart, load_prompts, source_of

__all__ = ["CALIBRATION_PARAMS", "Calibration", "CalibrationSource", "TokenBatch", "calibration_sources",
           "check_apart", "check_calibration", "load_calibration"]

#: the per-adapter keys every data-aware method takes (an adapter entry's own value wins over `parameters:`)
CALIBRATION_PARAMS: tuple[Param, ...] = (
    Param("calibration", None, str, "this adapter's unlabeled prompts: a .jsonl (`prompt` or `text` field), a .txt "
          "(one a line), or an lm-eval task name / YAML (its training split, else validation; never test)",
          per_adapter=True),
    Param("calibration_size", DEFAULT_SIZE, int, "how many prompts to draw (shuffled by the seed)", per_adapter=True),
    Param("calibration_template", None, str, "build each prompt from a JSONL row's fields, e.g. "
          "\"Q: {{question}}\\nA:\" (lm-eval's doc_to_text syntax)", per_adapter=True),
)


def check_calibration(adapter_params: Sequence[Mapping[str, Any]], where: Sequence[str] | None = None) -> None:
    """Config-time check of every adapter's calibration keys (no file is opened): one line naming the entry."""
    for index, own in enumerate(adapter_params):
        name = where[index] if where is not None else f"adapters[{index}]"
        source_of(own.get("calibration"), own.get("calibration_size", DEFAULT_SIZE), own.get("calibration_template"),
                  Path.cwd(), name)


def calibration_sources(config: Any, specs: Sequence[Mapping[str, Any]] | None = None,
                        size: int | None = None) -> list[CalibrationSource]:
    """Every input's calibration source, paths resolved against the config's folder: from `specs` (default: the
    method's per-adapter parameters), `size` overriding calibration_size."""
    sources = []
    for own, name in zip(config.adapter_params if specs is None else specs, config.input_where):
        count = size if size is not None else own.get("calibration_size", DEFAULT_SIZE)
        sources.append(source_of(own.get("calibration"), count, own.get("calibration_template"), config.config_dir,
                                 name))
    return sources


@dataclass
class Calibration:
    """The loaded model with its branches, each adapter's prompts as token ids, and (on demand) its teachers."""

    model: Any
    sources: list[CalibrationSource]
    prompts: list[list[list[int]]]
    adapter_folders: list[Path]
    base_folder: Path
    cache_dir: Path | None = None
    _teachers: dict[tuple[int, bool], list[Any]] = field(default_factory=dict)

    def batches(self, index: int, batch_size: int = 16) -> Iterator[TokenBatch]:
        """Adapter `index`'s prompts as right-padded token batches (the attention mask marks real tokens)."""
        prompts = self.prompts[index]
        for rows in chunks(len(prompts), batch_size):
            yield pad([prompts[i] for i in rows], self.model.pad_id, "right")

    def teachers(self, max_new_tokens: int = 16, log_probs: bool = False, batch_size: int = 16) -> list[Any]:
        """Every adapter's greedy continuations of its prompts (and log-probs for KL), computed once, cached."""
        from .teachers import teacher_sets

        key = (max_new_tokens, log_probs)
        if key not in self._teachers:
            self._teachers[key] = teacher_sets(
                self.model, self.prompts, sources=[s.describe() for s in self.sources], max_new_tokens=max_new_tokens,
                log_probs=log_probs, batch_size=batch_size, cache_dir=self.cache_dir,
                adapter_folders=self.adapter_folders, base_folder=self.base_folder)
        return self._teachers[key]

    def close(self) -> None:
        """Detach the branches."""
        self.model.close()


def load_calibration(prepared: Any, *, device: torch.device | str = "cpu", seed: int = 0, room: int = 16,
                     dtype: torch.dtype | None = None, cache_dir: Path | None = None,
                     progress: bool = False, sources: Sequence[CalibrationSource] | None = None,
                     texts: Sequence[Sequence[str]] | None = None) -> Calibration:
    """Read every adapter's prompts (checked before the model loads), load the base once with the branches, and
    tokenize the prompts, leaving `room` tokens of the context for generated continuations. The loader's own
    progress bar shows only with `progress` (a command's `--no-progress` keeps stderr to our lines). `sources`
    (default: the config's) and `texts` (their prompts, already read) let `merge inspect` pass its own."""
    from .model import BranchedModel

    sources = list(sources) if sources is not None else calibration_sources(prepared.config)
    if texts is None:
        texts = [load_prompts(source, seed) for source in sources]
    model = BranchedModel(prepared, device=device, dtype=dtype, progress=progress)
    try:
        prompts = [encode(model.tokenizer, t, model.context_length, s.where, room) for t, s in zip(texts, sources)]
    except BaseException:
        model.close()
        raise
    return Calibration(model, sources, prompts, [a.folder for a in prepared.adapters], prepared.base.folder,
                       cache_dir)


def refuse_scored_calibration(config: Any) -> None:
    """For `merge sweep`: refuse calibration that reads what the sweep scores (the validation split it selects on,
    the test split it reports): an eval task named as a calibration task (whose validation documents it would
    read), or one of the offline suite's validation/test files of those tasks."""
    from ..evaluation.tasks import LL_SUFFIX, SUITE_TASKS

    scored = list(config.eval.tasks) if config.eval is not None and config.eval.tasks else list(SUITE_TASKS)
    names = {t.removesuffix(LL_SUFFIX) for t in scored}
    sources = calibration_sources(config)
    for source in sources:
        if source.kind == "task" and source.reference.removesuffix(LL_SUFFIX) in names:
            raise MergeConfigError(f"{source.where}: calibration task '{source.reference}' is one the sweep scores: "
                                   "its documents would be calibrated on and selected on; give training prompts "
                                   "(a .jsonl of the task's train split)")
    from ..evaluation.lm_eval_runner import SUITE_DIR

    files = [SUITE_DIR / "data" / name / f"{split}.jsonl" for name in names for split in ("validation", "test")]
    check_apart(sources, files, "data the sweep scores (a validation or test split)")


def refuse_full_models(config: Any, method: str) -> None:
    """Data-aware methods merge LoRA adapters (their branches); a full fine-tune is refused at config time."""
    if getattr(config, "models", None):
        raise MergeConfigError(f"models[0]: method '{method}' calibrates LoRA adapters' low-rank branches; full "
                               "fine-tunes are not supported (use a data-free method)")


__all__ += ["encode", "pad", "refuse_full_models"]
