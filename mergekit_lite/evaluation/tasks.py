"""Which lm-eval tasks a `merge eval` runs: suite names, lm-eval's built-in benchmarks, users' task files.

`--tasks` takes, comma-separated or repeated:

* a name from the offline suite (capitals, add, …): found in milliseconds, in the suite's own small index;
* any other name (arc_easy, hellaswag, the mmlu group, a tag): lm-eval's full built-in index is built only
  then (about ten seconds; one line says so), and an unknown name gets a "did you mean" over both indexes;
* a task YAML file, or a folder of them: handed to lm-eval's own loader (``!function``, ``include:``
  templates, groups, ``dataset_path: json``), a folder meaning every task and group defined in it.

Tasks are built (their datasets loaded) once, before any model is loaded or any file written, with the user's
Hugging Face settings (``HF_DATASETS_OFFLINE``, ``HF_HOME``): a dataset that is neither cached nor reachable is
one error naming the task and the dataset. The built tasks are then reused for every model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalError
from ..suggest import did_you_mean

logger = logging.getLogger(__name__)

#: The offline suite, package data: tasks/ (lm-eval YAMLs), data/<task>/, base/, adapters/<task>/, scores.json.
SUITE_DIR = Path(__file__).resolve().parent / "suite"
#: The suite's lm-eval task YAMLs (overridable with MERGEKIT_LITE_EVAL_TASKS).
SUITE_TASKS_DIR = SUITE_DIR / "tasks"
#: Suffix of a task's companion that scores the log-likelihood of the correct answer.
LL_SUFFIX = "_ll"
#: The offline suite's tasks, in table order.
SUITE_TASKS: tuple[str, ...] = ("capitals", "add", "reverse", "sentiment")


@dataclass
class TaskSelection:
    """The tasks of one evaluation, resolved and built once, reused for every model (and every sweep point)."""

    manager: Any
    table_tasks: list[str]
    run_tasks: list[str]
    built: list[Any] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    builtin_index: bool = False

    def describe(self) -> list[str]:
        """One line per task file or folder given: which tasks it defined (a folder runs all of them)."""
        by_origin: dict[str, list[str]] = {}
        for name, origin in self.origins.items():
            by_origin.setdefault(origin, []).append(name)
        return [f"{origin}: {', '.join(names)}" for origin, names in by_origin.items()]


def _lm_eval_tasks() -> Any:
    from .harness import import_lm_eval

    return import_lm_eval().tasks


def _task_index() -> Any:
    _lm_eval_tasks()
    from lm_eval.tasks._index import Kind, TaskIndex

    return TaskIndex, Kind


# ------------------------------------------------------------------------------------------- parsing


def split_task_args(tasks: Sequence[str] | None) -> tuple[list[str], list[Path]]:
    """Separate task names from task YAML files/folders in `--tasks` items (comma-separated or repeated)."""
    names: list[str] = []
    paths: list[Path] = []
    for item in (part.strip() for entry in tasks or () for part in entry.split(",")):
        if not item:
            continue
        candidate = Path(item).expanduser()
        if candidate.suffix in (".yaml", ".yml") or candidate.is_dir() or "/" in item:
            if not candidate.exists():
                raise EvalError(f"--tasks: {candidate} does not exist (a task YAML file or a folder of them)")
            paths.append(candidate.resolve())
            continue
        names.append(item)
    return names, paths


def tasks_defined_in(path: Path) -> list[str]:
    """The tasks a YAML file or folder defines, as lm-eval indexes them: a folder's groups, and its tasks
    that none of those groups runs (so nothing runs twice); a file's one task or group."""
    TaskIndex, Kind = _task_index()
    if path.is_file():
        entry = _task_entry(TaskIndex, path)
        if entry is None or not entry.name:
            raise EvalError(f"--tasks: {path} is not an lm-eval task YAML (no 'task' or 'group' key)")
        return [str(entry.name)]
    for candidate in TaskIndex._iter_yaml_files(path):  # lm-eval's index skips a file it cannot parse: a typo
        _task_entry(TaskIndex, candidate, syntax_only=True)  # would silently drop its task, so name the file
    index = TaskIndex.build([path])
    groups = [name for name, e in index.items() if e.kind == Kind.GROUP]
    members = {_member_name(m) for g in groups for m in _as_list((index[g].cfg or {}).get("task"))}
    tasks = [name for name, e in index.items() if e.kind in (Kind.TASK, Kind.PY_TASK) and name not in members]
    found = sorted(groups) + sorted(tasks)
    if not found:
        raise EvalError(f"--tasks: {path} defines no lm-eval task (no YAML with a 'task' or 'group' key)")
    return found


def _task_entry(task_index: Any, path: Path, syntax_only: bool = False) -> Any:
    """lm-eval's index entry for one task YAML, or one EvalError line naming the file and the problem
    (with `syntax_only`, only for invalid YAML: a folder may also hold YAML that is no task, which lm-eval skips)."""
    import yaml

    from ..config import yaml_problem

    try:
        return task_index.entry_from_path(path)
    except Exception as error:  # lm-eval's YAML loader: any parse problem
        if syntax_only and not isinstance(error, yaml.YAMLError):
            return None
        problem = yaml_problem(error) if isinstance(error, yaml.YAMLError) else " ".join(str(error).split())
        raise EvalError(f"--tasks: {path} is not a readable lm-eval task YAML ({problem})") from None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _member_name(member: Any) -> str:
    if isinstance(member, dict):
        return str(member.get("task") or member.get("group") or "")
    return str(member)


# ------------------------------------------------------------------------------------------- indexes


_BUILTIN_MANAGERS: dict[tuple[str, ...], Any] = {}


def _manager(paths: Sequence[Path], *, with_builtin: bool) -> Any:
    """A TaskManager over `paths` (the suite first), and lm-eval's built-in tasks only when asked (seconds)."""
    from .harness import quiet_lm_eval

    tasks_module = _lm_eval_tasks()
    key = tuple(str(p) for p in paths)
    if with_builtin and key in _BUILTIN_MANAGERS:
        return _BUILTIN_MANAGERS[key]
    with quiet_lm_eval():
        manager = tasks_module.TaskManager(include_path=[str(p) for p in paths], include_defaults=with_builtin)
    if with_builtin:
        _BUILTIN_MANAGERS[key] = manager
    return manager


def suite_tasks_dir() -> Path:
    """The folder of the offline suite's task YAMLs (env MERGEKIT_LITE_EVAL_TASKS overrides the package's)."""
    override = os.environ.get("MERGEKIT_LITE_EVAL_TASKS")
    return Path(override).expanduser().resolve() if override else SUITE_TASKS_DIR


def select_suite_or_tasks(tasks: Sequence[str] | None, *, build: bool = True,
                          note: Callable[[str], None] | None = None) -> TaskSelection:
    """The tasks to run: the offline suite by default, else `--tasks` names, files and folders."""
    return select_tasks(tasks, suite_tasks_dir(), build=build, note=note)


def select_tasks(tasks: Sequence[str] | None, suite_dir: Path, *, build: bool = True,
                 note: Callable[[str], None] | None = None) -> TaskSelection:
    """Resolve `--tasks` items to lm-eval tasks and build them once (datasets loaded, errors named)."""
    names, paths = split_task_args(tasks)
    origins: dict[str, str] = {}
    for path in paths:
        for name in tasks_defined_in(path):
            origins.setdefault(name, str(path))
    folders = list(dict.fromkeys(p if p.is_dir() else p.parent for p in paths))
    index_paths = [p for p in (suite_dir, *folders) if p.is_dir()]
    if not index_paths:
        raise EvalError(f"no lm-eval task folder found (looked for {suite_dir}): reinstall mergekit_lite (the suite "
                        "ships with it), set MERGEKIT_LITE_EVAL_TASKS, or pass --tasks with a YAML file or folder")
    requested = list(dict.fromkeys([*names, *origins])) or list(SUITE_TASKS)
    manager = _manager(index_paths, with_builtin=False)
    builtin = False
    if any(name not in manager.task_index for name in requested):
        started = time.monotonic()
        if note is not None:
            note("indexing lm-eval's built-in tasks (about 10 s)…")
        manager = _manager(index_paths, with_builtin=True)
        builtin = True
        logger.info("lm-eval's task index built in %.1f s", time.monotonic() - started)
    known = manager.task_index
    for name in requested:
        if name not in known:
            raise EvalError(f"unknown lm-eval task '{name}'" + did_you_mean(
                name, known, matches=3,
                otherwise="see `lm-eval ls tasks` for lm-eval's tasks; the offline suite: " + ", ".join(SUITE_TASKS)))
    run: list[str] = []
    for name in requested:
        run.append(name)
        if not name.endswith(LL_SUFFIX) and name + LL_SUFFIX in known:
            run.append(name + LL_SUFFIX)
    selection = TaskSelection(manager=manager, table_tasks=requested, run_tasks=list(dict.fromkeys(run)),
                              origins=origins, builtin_index=builtin)
    if build:
        selection.built = build_tasks(selection)
    return selection


# -------------------------------------------------------------------------------------------- building


def build_tasks(selection: TaskSelection) -> list[Any]:
    """Build every task (downloading or reading its dataset as the user's HF settings allow), one at a time so
    that a failure names the task and the dataset it needs."""
    from .harness import quiet_lm_eval

    built: list[Any] = []
    for name in selection.run_tasks:
        try:
            with quiet_lm_eval():
                loaded = selection.manager.load([name])
        except Exception as error:  # datasets' and lm-eval's errors: connection, missing file, bad config
            raise EvalError(_build_problem(name, selection.manager, error)) from None
        built.extend(_top_level(loaded, name))
    return built


def _top_level(loaded: dict[str, Any], name: str) -> list[Any]:
    """The object lm-eval built for `name`: its group (which holds its members), else its task(s) (a tag)."""
    groups = loaded.get("groups") or {}
    if name in groups:
        return [groups[name]]
    tasks = loaded.get("tasks") or {}
    return [tasks[name]] if name in tasks else list(tasks.values())


def dataset_of(name: str, manager: Any) -> str | None:
    """The dataset a task (or a group's first member) reads, as `path (name)`, from its indexed config."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg if entry is not None else None) or {}
    if "dataset_path" in cfg:
        return cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    for member in _as_list(cfg.get("task")) + sorted(getattr(entry, "tags", ()) or ()):
        found = dataset_of(_member_name(member), manager) if _member_name(member) != name else None
        if found:
            return found
    return None


def _build_problem(name: str, manager: Any, error: BaseException) -> str:
    import os

    dataset = dataset_of(name, manager)
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true")]
    network = any(word in text for word in ("Couldn't reach", "OfflineModeIsEnabled", "ConnectionError", "offline",
                                            "Max retries", "NameResolution", "timed out"))
    if dataset and network:
        hint = (f"unset {' and '.join(offline)} or " if offline else "") + \
            f"fetch it once online (python -c \"import datasets; datasets.load_dataset('{dataset.split(' ')[0]}'" + \
            (f", '{dataset.split('(')[1].rstrip(')')}'" if "(" in dataset else "") + ")\")"
        return (f"lm-eval task '{name}' needs the dataset {dataset}, which is not in the Hugging Face cache and "
                f"cannot be downloaded here ({text}): {hint}")
    return f"lm-eval task '{name}' could not be built" + (f" (dataset {dataset})" if dataset else "") + f": {text}"

