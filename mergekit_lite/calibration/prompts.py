"""Calibration prompts per adapter entry: a JSONL or text file, or an lm-eval task's documents (never its test split).

`calibration:` on an adapter entry (or under `parameters:` for all of them) names where that adapter's prompts
come from; `calibration_size` (default 64) how many, drawn after a shuffle by the merge's seed:

- `FILE.jsonl`: one JSON object a line; its `prompt` field, else its `text` field, is the prompt, used exactly
  as written. With `calibration_template: "Q: {{question}}\\nA:"` the template is filled from the object's
  fields instead (the `{{field}}` syntax of an lm-eval `doc_to_text`), for data files that hold fields, not
  prompts (the suite's train files).
- `FILE.txt`: one prompt a line (blank lines skipped; `\\n` inside a line stays two characters).
- an lm-eval task name (the offline suite's or lm-eval's own) or a task YAML file: the task's documents
  rendered with its own `doc_to_text`, from its training split, else its validation split. The test split is
  never used: a task that has only a test split is refused by name.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, MergeConfigError

logger = logging.getLogger(__name__)

#: prompts drawn per adapter unless `calibration_size` says otherwise
DEFAULT_SIZE = 64
#: the JSONL fields read as a prompt, in order of preference
PROMPT_FIELDS = ("prompt", "text")
_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
#: largest calibration file read (prompts are short; a bigger file is most likely the wrong one)
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CalibrationSource:
    """Where one adapter's prompts come from, as its entry says (resolved against the config's folder)."""

    #: "jsonl", "txt" or "task"
    kind: str
    #: the file (jsonl, txt, task YAML) or the task name
    reference: str
    #: the config key that named it, for messages (`adapters[1].calibration`)
    where: str
    size: int = DEFAULT_SIZE
    template: str | None = None

    def describe(self) -> str:
        """`capitals (lm-eval task)`, `train.jsonl`: how the card and the log name the source."""
        return f"{self.reference} (lm-eval task)" if self.kind == "task" else self.reference


def source_of(spec: Any, size: Any, template: Any, base_dir: Path, where: str) -> CalibrationSource:
    """An adapter entry's `calibration` / `calibration_size` / `calibration_template`, checked."""
    if spec is None:
        raise MergeConfigError(f"{where}: no calibration data; set 'calibration: prompts.jsonl' (a few dozen "
                               "unlabeled prompts of this adapter's task, `prompt` or `text` field), a .txt file, or "
                               "an lm-eval task name")
    if not isinstance(spec, str) or not spec.strip():
        raise MergeConfigError(f"{where}: 'calibration' must be a file path or an lm-eval task name, got {spec!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MergeConfigError(f"{where}: 'calibration_size' must be a positive whole number, got {size!r}")
    if template is not None and (not isinstance(template, str) or not _FIELD.search(template)):
        raise MergeConfigError(f"{where}: 'calibration_template' must be text with {{{{field}}}} placeholders, "
                               f"like \"Q: {{{{question}}}}\\nA:\", got {template!r}")
    path = Path(spec).expanduser()
    resolved = path if path.is_absolute() else (base_dir / path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return CalibrationSource("jsonl", str(resolved.resolve()), where, size, template)
    if suffix == ".txt":
        if template is not None:
            raise MergeConfigError(f"{where}: 'calibration_template' fills JSONL fields; a .txt file holds the "
                                   "prompts themselves (drop the template)")
        return CalibrationSource("txt", str(resolved.resolve()), where, size)
    if suffix in (".yaml", ".yml"):
        return CalibrationSource("task", str(resolved.resolve()), where, size, template)
    if "/" in spec or suffix:
        raise MergeConfigError(f"{where}: calibration file {spec!r} must end in .jsonl, .txt or .yaml "
                               "(or be an lm-eval task name)")
    return CalibrationSource("task", spec, where, size, template)


def load_prompts(source: CalibrationSource, seed: int) -> list[str]:
    """`source.size` prompts (all when there are fewer), shuffled by `seed`: the same seed gives the same draw."""
    if source.kind == "task":
        prompts = _task_prompts(source)
    else:
        prompts = _file_prompts(source)
    if not prompts:
        raise InputError(f"{source.where}: {source.reference} holds no prompts; give a few dozen unlabeled "
                         "prompts of this adapter's task")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[: source.size]]


def _read_text(source: CalibrationSource) -> str:
    path = Path(source.reference)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"{source.where}: {path} is {path.stat().st_size} bytes; calibration needs a few dozen "
                             "prompts (is this the right file?)")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{source.where}: calibration file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{source.where}: calibration file {path} is a folder, not a .jsonl or .txt file") from None
    except OSError as error:
        raise InputError(f"{source.where}: cannot read calibration file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{source.where}: calibration file {path} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from None


def _file_prompts(source: CalibrationSource) -> list[str]:
    text = _read_text(source)
    if source.kind == "txt":
        return [line for line in text.splitlines() if line.strip()]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{source.where}: {source.reference} line {number} is not JSON ({error.msg})") from None
        prompts.append(_prompt_of(row, source, f"{source.reference} line {number}"))
    return prompts


def _prompt_of(row: Any, source: CalibrationSource, where: str) -> str:
    """The prompt of one JSONL object: the template filled from its fields, else `prompt`, else `text`."""
    if not isinstance(row, dict):
        raise InputError(f"{source.where}: {where} is not a JSON object")
    if source.template is not None:
        return render_template(source.template, row, f"{source.where}: {where}")
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value:
            return value
    fields = ", ".join(sorted(map(str, row))) or "none"
    raise InputError(f"{source.where}: {where} has no 'prompt' or 'text' field (fields: {fields}); add one, or "
                     "set calibration_template: \"...{{field}}...\" to build prompts from these fields")


def render_template(template: str, row: dict[str, Any], where: str) -> str:
    """`template` with each `{{field}}` replaced by the row's value (a missing field is an error naming it)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in row:
            raise InputError(f"{where}: calibration_template uses '{{{{{name}}}}}' but the row has no field "
                             f"'{name}' (fields: {', '.join(sorted(map(str, row)))})")
        return str(row[name])
    return _FIELD.sub(value, template)


def _task_prompts(source: CalibrationSource) -> list[str]:
    """A task's training documents (else validation) rendered by its own doc_to_text; never its test split."""
    from ..errors import EvalError
    from ..evaluation.tasks import SUITE_TASKS_DIR
    from ..evaluation.tasks import select_tasks

    try:
        selection = select_tasks([source.reference], SUITE_TASKS_DIR)
    except EvalError as error:
        raise MergeConfigError(f"{source.where}: {error}") from None
    task = _only_task(selection, source)
    if task.has_training_docs():
        docs, split = list(task.training_docs()), "training"
    elif task.has_validation_docs():
        docs, split = list(task.validation_docs()), "validation"
    else:
        raise MergeConfigError(f"{source.where}: lm-eval task '{_name(task, source)}' has only a test split; "
                               "calibrating on test documents would leak them into the scores. Give a JSONL of "
                               "prompts, or a task with a training or validation split")
    logger.info("calibration %s: %d documents from the %s split of '%s'", source.where, len(docs), split,
                _name(task, source))
    if source.template is not None:
        return [render_template(source.template, dict(doc), f"{source.where}: task document") for doc in docs]
    prompts = []
    for doc in docs:
        text = task.doc_to_text(doc)
        if not isinstance(text, str):  # a few tasks render an index into their choices
            raise MergeConfigError(f"{source.where}: task '{_name(task, source)}' renders its documents as "
                                   f"{type(text).__name__}, not text; give a JSONL of prompts instead")
        prompts.append(text)
    return prompts


def _only_task(selection: Any, source: CalibrationSource) -> Any:
    """The one task a calibration source names (a group is refused: its members' formats differ)."""
    wanted = selection.table_tasks[0] if selection.table_tasks else source.reference
    for built in selection.built:
        if getattr(built, "config", None) is not None and getattr(built.config, "task", None) == wanted:
            return built
    tasks = [b for b in selection.built if hasattr(b, "doc_to_text")]
    if not tasks:
        raise MergeConfigError(f"{source.where}: '{source.reference}' is a group of lm-eval tasks; name one task")
    return tasks[0]


def _name(task: Any, source: CalibrationSource) -> str:
    return str(getattr(getattr(task, "config", None), "task", None) or source.reference)


def check_apart(sources: Sequence[CalibrationSource], forbidden: Sequence[Path], what: str) -> None:
    """Refuse calibration that reads a file also used for `what` (a sweep's validation or test data)."""
    taken = {Path(p).resolve() for p in forbidden}
    for source in sources:
        if source.kind != "task" and Path(source.reference).resolve() in taken:
            raise MergeConfigError(f"{source.where}: calibration file {source.reference} is also the {what}; "
                                   "calibrate on training prompts so the scores stay honest")
