"""The same tasks on another split: `merge sweep` selects on each task's validation split and reports on its test split.

lm-eval evaluates a task's `test_split` when it has one. A sweep needs the validation documents of the very same
tasks (same prompts, metrics and companions), so each task is rebuilt from its own YAML with `test_split` set to
its `validation_split`. A task without a validation split distinct from its test split cannot be tuned honestly
and is refused by name, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..errors import EvalError
from .tasks import TaskSelection


def validation_selection(selection: TaskSelection) -> TaskSelection:
    """`selection`'s tasks rebuilt to evaluate their validation split (datasets loaded once, here)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from .harness import quiet_lm_eval

    index = selection.manager.task_index
    built: list[Any] = []
    for name in selection.run_tasks:
        entry = index.get(name)
        path = getattr(entry, "yaml_path", None)
        if entry is None or path is None or "task" not in (entry.cfg or {"task": None}):
            raise EvalError(f"sweep: task '{name}' is not a single task defined by a YAML file (a group or a Python "
                            "task); list its tasks one by one so each can be evaluated on its validation split")
        config = load_yaml(path, resolve_func=True)
        split = config.get("validation_split")
        if not split or split == config.get("test_split"):
            raise EvalError(f"sweep: task '{name}' ({path}) has no validation split apart from its test split "
                            f"(validation_split: {split!r}); a sweep picks on validation and reports on test, so it "
                            "needs both")
        config = {**config, "task": name, "test_split": split}
        config.pop("tag", None)
        try:
            with quiet_lm_eval():
                loaded = selection.manager.load([config])
        except Exception as error:  # datasets' and lm-eval's errors: a missing validation file, a bad split name
            raise EvalError(f"sweep: task '{name}' could not be built on its validation split '{split}': "
                            f"{type(error).__name__}: {error}".splitlines()[0][:300]) from None
        built.extend(loaded["tasks"].values())
    return replace(selection, built=built)

