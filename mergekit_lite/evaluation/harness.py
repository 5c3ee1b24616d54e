"""lm-eval itself, as every evaluation here runs it: offline, quiet, one loaded model evaluated on built tasks.

Models never download: they load offline (the Hub switches set, and patched where a library read them
already) from absolute paths. lm_eval is imported lazily, so ``import mergekit_lite`` stays light. The rows
(`rows.ModelSpec`), the tasks (`tasks.TaskSelection`) and what is done with the results live elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import EvalError
from .options import EvalOptions

if TYPE_CHECKING:
    from .rows import ModelSpec
    from .tasks import TaskSelection

#: Bootstrap draws for the stderr of perplexity (lm-eval's default, 100 000, takes seconds per task).
BOOTSTRAP_ITERS = 1000
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Keep every Hugging Face client offline inside the block, restoring the previous state afterwards.

    The switches are environment variables read at import; huggingface_hub (and datasets) may have been
    imported already (mergekit_lite imports huggingface_hub), so their module constants are patched too.
    """
    saved_env = {var: os.environ.get(var) for var in _OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    for module_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        module = sys.modules.get(module_name)
        for attr in attrs if module is not None else ():
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def import_lm_eval() -> Any:
    """Import lm_eval lazily (datasets then reads the user's HF settings); a missing install is one readable error."""
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError as error:
        raise EvalError(
            f"lm-eval is not installed ({error}): pip install 'mergekit_lite[eval]' "
            "(or: pip install torch==2.13.0 'lm-eval[hf]' matplotlib)"
        ) from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Hide lm-eval's chatter while it runs: its logs, prints, per-request bars and `git` calls' stderr.

    Output is silenced at the file-descriptor level (subprocesses write there); our own progress bar writes to
    a duplicate of the original stderr, made before. lm-eval's bootstrap of perplexity errors runs in-process
    (DISABLE_MULTIPROC) instead of forking a pool per task.
    """
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    saved_multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    devnull_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull_fd, 1)
        os.dup2(devnull_fd, 2)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            yield
    finally:
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in (*saved_fds, devnull_fd):
            os.close(fd)
        if saved_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved_multiproc
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def keep_global_rngs() -> Iterator[None]:
    """lm-eval's simple_evaluate reseeds random, numpy and torch; give the caller its RNG states back."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def load_lm(model: ModelSpec, options: EvalOptions) -> Any:
    """lm-eval's `hf` model for a row: loaded offline from absolute local paths (never a Hub download)."""
    import_lm_eval()
    from lm_eval.api.registry import get_model

    for folder in (model.path, model.adapter):
        if folder is not None and not folder.is_dir():
            raise EvalError(f"{model.name}: {folder} is not a folder")
    with offline(), quiet_lm_eval():
        return get_model("hf").create_from_arg_obj(
            {**model.model_args(options.device), "batch_size": options.batch_size})


def evaluate_lm(lm: Any, selection: TaskSelection, options: EvalOptions, *, name: str = "model",
                model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `lm_eval.simple_evaluate` of a loaded model (a row, or a sweep's patched model) on the built tasks.

    The caller's RNG states survive (lm-eval reseeds the global RNGs); nothing is downloaded (the tasks were
    built before, the model is in memory).
    """
    lm_eval = import_lm_eval()
    with offline(), keep_global_rngs(), quiet_lm_eval():
        results = lm_eval.evaluator.simple_evaluate(
            model=lm,
            tasks=list(selection.built) or list(selection.run_tasks),
            task_manager=selection.manager,
            bootstrap_iters=BOOTSTRAP_ITERS,
            **options.simple_evaluate_kwargs(),
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise EvalError(f"{name}: lm-eval returned no results")
    results.setdefault("config", {}).update({"model": "hf", "model_args": model_args or {}})
    return results

