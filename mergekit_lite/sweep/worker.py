"""One evaluation of a sweep: the base, an adapter alone, or a merge patched into the base loaded once.

A `Worker` loads the base model and builds the tasks (test and validation splits) once; each `Job` is then
scored through lm-eval's Python API on that model object. A merge's touched tensors are merged in memory,
patched in, evaluated, and the base's values are put back, whatever happens. Jobs are plain data (strings and
dicts), so the same Worker runs in-process or inside a Ray actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..evaluation.options import EvalOptions
from ..evaluation.tasks import TaskSelection

#: job kinds
BASE, ADAPTER, MERGE = "base", "adapter", "merge"


@dataclass(frozen=True)
class Job:
    """What to evaluate, on which split: `config` is a merge config's to_dict() (absolute paths) for a merge."""

    kind: str
    name: str
    split: str
    config: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the cache key's identity of the job."""
        return {"kind": self.kind, "name": self.name, "split": self.split, "config": self.config,
                "adapter": self.adapter}


@dataclass(frozen=True)
class WorkerSpec:
    """How every worker of a sweep is set up (the same everywhere, so every backend gives the same scores)."""

    base_dir: str
    dtype: str | None
    tasks: list[str] | None
    options: EvalOptions


class Worker:
    """Holds the base model, its lm-eval wrapper and the built tasks; evaluates jobs one at a time."""

    def __init__(self, spec: WorkerSpec, selections: dict[str, TaskSelection] | None = None) -> None:
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..engine.device import resolve_device
        from ..evaluation.harness import offline, quiet_lm_eval
        from ..evaluation.splits import validation_selection
        from ..evaluation.tasks import select_tasks, suite_tasks_dir
        from .memory import ModelPatcher

        self.spec = spec
        if selections is None:
            selection = select_tasks(spec.tasks, suite_tasks_dir())
            selections = {"test": selection, "validation": validation_selection(selection)}
        self.selections = selections
        self.device = resolve_device(spec.options.device)
        self.options = replace(spec.options, device=str(self.device))
        dtype = getattr(torch, spec.dtype) if spec.dtype else "auto"
        with offline(), quiet_lm_eval():
            self.model = AutoModelForCausalLM.from_pretrained(spec.base_dir, dtype=dtype).eval().to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(spec.base_dir)
            self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=self.options.batch_size,
                           device=str(self.device))
        self.patcher = ModelPatcher(self.model)

    def evaluate(self, job: Job) -> dict[str, Any]:
        """Scores per task ({task: {acc, answer_ll, exact}}) and the seconds spent merging and evaluating."""
        from ..evaluation.harness import evaluate_lm, load_lm
        from ..evaluation.rows import ModelSpec
        from ..evaluation.scores import extract_scores, table_columns

        selection = self.selections[job.split]
        merge_s = 0.0
        started = time.perf_counter()
        if job.kind == ADAPTER:
            assert job.adapter is not None
            lm = load_lm(ModelSpec(job.name, "adapter", Path(self.spec.base_dir), Path(job.adapter)), self.options)
            try:
                results = evaluate_lm(lm, selection, self.options, name=job.name)
            finally:
                del lm
        elif job.kind == MERGE:
            tensors = self.merge(job)
            merge_s = time.perf_counter() - started
            self.patcher.apply(tensors)
            try:
                results = evaluate_lm(self.lm, selection, self.options, name=job.name)
            finally:
                self.patcher.restore()
        else:
            results = evaluate_lm(self.lm, selection, self.options, name=job.name)
        scores = extract_scores(results, table_columns(results, selection.table_tasks))
        return {"scores": scores, "merge_s": round(merge_s, 4),
                "eval_s": round(time.perf_counter() - started - merge_s, 4)}

    def merge(self, job: Job) -> dict[str, Any]:
        """The job's merge, touched tensors only, in memory."""
        from ..api import prepare
        from ..config import MergeConfig
        from .memory import merged_tensors

        config = MergeConfig.from_dict(job.config)
        with prepare(config) as prepared:
            return merged_tensors(prepared, self.device)
