"""`run_sweep`: score every point on the validation split, pick the best there, report it on the test split.

Order of work: every check that can fail does so before a model loads (the sweep section, the number of points
against the cap, each grid or random point's merge config, the output folders, each method's densities and
factors against the inputs' tensors, the tasks and their validation splits, the metric); then the base and
each adapter alone are scored on validation (retention's references), then the points; the best point by the
selection metric (ties: the earlier point) is scored on the test split beside the base, each adapter alone and
each method's default merge. Only test-split numbers are results; validation numbers only choose.

Outputs (writers.ownership): `--out` must be new, empty, or a sweep report of ours (its marker), apart from every
input and from the config's `output:`; the results cache is written into it as points finish, and the report
set is staged beside it and swapped in whole at the end, the cache carried over. `output:` is replaced only with
--overwrite, and only when it is a merge output (or empty).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import MergeConfig
from ..errors import MergeConfigError, OutputPathError
from ..evaluation.options import EvalOptions
from ..hub.resolve import hub_reference
from .cache import ResultCache, digest, fingerprint
from .points import OptunaSearch, Point, fixed_points, point_count
from .result import CACHE_DIR, Row, SweepResult, point_config
from .spec import SweepConfig, check_metric, method_defaults
from .worker import ADAPTER, BASE, MERGE, Job, WorkerSpec

logger = logging.getLogger(__name__)

VALIDATION, TEST = "validation", "test"
#: points a sweep tries unless --max-points says more (at a few seconds a point, about a day of work)
MAX_POINTS = 10_000


class SweepError(MergeConfigError):
    """A sweep cannot run as asked (an earlier sweep's results in --out without --resume, no point evaluated)."""


def absolute_config(config: MergeConfig) -> dict[str, Any]:
    """A point's merge config as data with absolute input paths (Hub ids kept), its output a placeholder, no eval:
    what a worker anywhere needs, and what keys the cache."""
    data = config.to_dict()
    if hub_reference(config, config.base_model) is None:
        data["base_model"] = str(config.resolve_path(config.base_model))
    for section in ("adapters", "models"):
        for entry in data.get(section, []):
            if hub_reference(config, entry["path"]) is None:
                entry["path"] = str(config.resolve_path(entry["path"]))
    data["output"] = {**data["output"], "path": "in-memory"}
    data.pop("eval", None)
    return data


def summarise(scores: dict[str, dict[str, float]], base: dict[str, dict[str, float]] | None,
              adapters: dict[str, dict[str, dict[str, float]]], tasks: list[str]) -> dict[str, Any]:
    """Means over tasks of acc / answer_ll / exact and of their retentions; per-task values as `<task>:<metric>`."""
    from ..evaluation.scores import RetentionRef, compute_retention, mean

    out: dict[str, Any] = {}
    metrics = ("acc", "answer_ll", "exact")
    for metric in metrics:
        values = [scores.get(t, {}).get(metric) for t in tasks]
        for task, value in zip(tasks, values):
            out[f"{task}:{metric}"] = value
        out[metric] = mean(values, finite=True)
    if base is not None:
        table = {"merge": scores, "base": base, **adapters}
        kept = compute_retention(table, tasks, list(metrics), {"merge": RetentionRef("base", tuple(adapters))})
        for metric in metrics:
            values = [kept.get("merge", {}).get(metric, {}).get(t) for t in tasks]
            for task, value in zip(tasks, values):
                out[f"{task}:{metric}_retention"] = value
            out[f"{metric}_retention"] = mean(values, finite=True)
    return out


def run_sweep(sweep: SweepConfig, out: str | Path, *, backend: str = "local", address: str | None = None,
              workers: int | None = None, resume: bool = False, progress: bool = True, device: str = "auto",
              overwrite: bool = False, note: Callable[[str], None] | None = None,
              max_points: int = MAX_POINTS) -> SweepResult:
    """Run the sweep `sweep` describes, writing the results cache and then every output into `out`."""
    from ..engine.device import resolve_device
    from ..evaluation.rows import local_model_dir
    from ..evaluation.splits import validation_selection
    from ..evaluation.tasks import select_tasks, suite_tasks_dir
    from .report import write_outputs

    from ..writers.ownership import claim, release
    from ..writers.preflight import resolve_output

    out = resolve_output(Path(out), "--out")  # a symlink loop is one line
    spec = sweep.spec
    template = sweep.template()
    count = point_count(spec)
    if count > max_points:
        raise SweepError(f"{sweep.path or 'config'}: the sweep has {count} points, more than the cap of {max_points}; "
                         "narrow its lists or trials, or pass --max-points N to allow more")
    if note is not None:
        note(f"sweep: {count} point(s) by {spec.search} search over {', '.join(spec.methods)}, selected by "
             f"{spec.metric} on validation")
    fixed = fixed_points(spec)
    if spec.search == "optuna":
        OptunaSearch(spec)  # the extra is installed: fail now, not after the references
    for point in fixed or []:  # every point's config is checked before any work
        point_config(sweep, point)
    check_outputs(sweep, out, overwrite)
    check_methods(sweep)
    cache = ResultCache(out / CACHE_DIR)
    if cache.entries() and not resume:
        raise SweepError(f"{out} holds the results of an earlier sweep ({len(cache.entries())} cached): pass --resume "
                         "to continue it (finished points are reused), or choose another --out")
    tasks = list(template.eval.tasks) if template.eval and template.eval.tasks else None
    selection = select_tasks(tasks, suite_tasks_dir(), note=note)
    try:
        check_metric(spec.metric, selection.table_tasks)
    except MergeConfigError as error:
        raise MergeConfigError(f"{sweep.path or 'config'}: {error}") from None
    selections = {TEST: selection, VALIDATION: validation_selection(selection)}
    options = EvalOptions.from_spec(template.eval, device=str(resolve_device(device)))
    base_dir = local_model_dir(template, template.base_model, "base")
    worker_spec = WorkerSpec(str(base_dir), template.output.dtype, tasks, options)
    settings = {"options": {**options.to_dict(), "device": options.device}, "run_tasks": selection.run_tasks,
                "table_tasks": selection.table_tasks}
    adapters = [(spec_.label, local_model_dir(template, spec_.path, "adapter")) for spec_ in template.adapters]
    fingerprints = {str(base_dir): fingerprint(base_dir), **{str(p): fingerprint(p) for _, p in adapters}}

    claimed = claim(out, "sweep", [CACHE_DIR])  # the cache is written into --out as points finish
    try:
        result = _run(sweep, out, fixed, cache, adapters, selection, options, worker_spec, selections, settings,
                      fingerprints, backend, workers, address, progress)
    except BaseException:
        release(out, claimed)  # nothing evaluated: leave --out as it was
        raise
    write_outputs(result, out, overwrite=overwrite)
    return result


def _run(sweep: SweepConfig, out: Path, fixed: list[Point] | None, cache: ResultCache,
         adapters: list[tuple[str, Path]], selection: Any, options: EvalOptions, worker_spec: WorkerSpec,
         selections: dict[str, Any], settings: dict[str, Any], fingerprints: dict[str, Any], backend: str,
         workers: int | None, address: str | None, progress: bool) -> SweepResult:
    """The evaluations: references, points, then the best and each method's default on the test split."""
    spec = sweep.spec
    runner = _make_backend(backend, worker_spec, selections, workers, address)
    state = _State(cache, settings, fingerprints)
    try:
        references = {VALIDATION: state.run(runner, _reference_jobs(VALIDATION, adapters))}
        base_val = references[VALIDATION]["base"].result.get("scores")
        adapter_val = {name: references[VALIDATION][name].result.get("scores") or {} for name, _ in adapters}
        tasks_list = list(base_val) if base_val else list(selection.table_tasks)

        def summary_of(row: Row, base: Any, adapter_scores: Any) -> None:
            if row.error is None:
                row.summary = summarise(row.result["scores"], base, adapter_scores, tasks_list)

        rows: list[Row] = []
        bar = _bar(len(fixed) if fixed is not None else spec.trials or 0, progress)
        leader: list[Row] = []

        def consider(row: Row) -> None:
            """Summarise a finished point and show the best so far on the bar."""
            summary_of(row, base_val, adapter_val)
            value = row.summary.get(spec.metric)
            if value is not None and (not leader or value > leader[0].summary[spec.metric]):
                leader[:] = [row]
            bar.update(1)
            if leader:
                bar.set_postfix_str(f"best {leader[0].name} ({spec.metric} {leader[0].summary[spec.metric]:.3f})")

        try:
            if fixed is not None:
                jobs = [_merge_job(sweep, point, VALIDATION) for point in fixed]
                finished = dict(state.stream(runner, jobs, list(fixed), consider))
                rows = [finished[index] for index in range(len(jobs))]
            else:
                search = OptunaSearch(spec)
                remaining = spec.trials or 0
                while remaining:
                    batch = [search.ask() for _ in range(min(runner.workers, remaining))]
                    remaining -= len(batch)
                    jobs = [_merge_job(sweep, point, VALIDATION) for _, point in batch]
                    finished = dict(state.stream(runner, jobs, [point for _, point in batch], consider))
                    for index, (number, _) in enumerate(batch):
                        rows.append(finished[index])
                        search.tell(number, finished[index].summary.get(spec.metric))
        finally:
            bar.close()
        best = None
        for row in rows:  # the highest score; on a tie the earlier point (the order does not depend on the backend)
            value = row.summary.get(spec.metric)
            if value is not None and (best is None or value > best.summary[spec.metric]):
                best = row
        if best is None:
            raise SweepError("no point could be evaluated: " + "; ".join(
                f"{row.name}: {row.error}" for row in rows[:3] if row.error))
        test_jobs = _reference_jobs(TEST, adapters)
        assert best.point is not None
        chosen = _merge_job(sweep, best.point, TEST, name=f"chosen: {best.name}")
        test_jobs.append(chosen)
        for method in spec.methods:
            default = Point(method, {}, {})
            job = _merge_job(sweep, default, TEST, name=f"default: {method}")
            if job.config != chosen.config:
                test_jobs.append(job)
        test_rows = list(state.run(runner, test_jobs).values())
    finally:
        runner.close()
    base_test = next(r for r in test_rows if r.kind == BASE).result.get("scores")
    adapter_test = {r.name: r.result.get("scores") or {} for r in test_rows if r.kind == ADAPTER}
    for row in test_rows:
        summary_of(row, base_test, adapter_test)
    return SweepResult(sweep, tasks_list, options, rows, references, best, test_rows, state.evaluated,
                       state.reused, len(cache.rejected), backend, runner.workers)


def check_outputs(sweep: SweepConfig, out: Path, overwrite: bool) -> bool:
    """Before any work: `out` and `output:` apart from each other and from every input, writable, and each
    either new, empty or ours (`output:` replaced only with `overwrite`); True when `out` holds an earlier sweep."""
    from ..writers.ownership import check_output_folder, local_inputs
    from ..writers.preflight import preflight_output

    template = sweep.template()
    inputs = local_inputs(template)
    if sweep.writes_output:
        target = template.output_path.resolve()
        if out == target or target in out.parents or out in target.parents:
            raise OutputPathError(f"--out {out} and the config's output: {target} overlap (the same folder, or one "
                                  "inside the other): the best merge and the report would replace each other; "
                                  "give them separate folders")
        preflight_output(target, overwrite, inputs)  # also: replaced only when empty or a merge output; writable
    return check_output_folder(out, "sweep", inputs)


def check_methods(sweep: SweepConfig) -> None:
    """Each method at its smallest swept density against the inputs' tensors (their headers and factors, no model
    loaded): a density that keeps no entry of some tensor, or a factored method over saved full tensors, fails
    here with the tensor's name instead of in every point."""
    from ..api import prepare
    from ..engine.elementwise import check_densities
    from ..engine.schedule import check_phase
    from .spec import Range

    spec = sweep.spec
    template = sweep.template()
    with prepare(template, method_checks=False) as prepared:
        labels = [adapter.label for adapter in prepared.adapters]
        for method in spec.methods:
            parameters = method_defaults(method)
            if "density" in spec.takes(method):
                values = spec.parameters["density"]
                numbers = [values.low] if isinstance(values, Range) else [
                    v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if numbers:
                    parameters["density"] = min(numbers)
            config = sweep.config_for(method, parameters, {})
            try:
                check_densities(prepared.plan, config.merge_method, config.adapter_params)
                check_phase(prepared.plan.tensors, config.merge_method, labels)
            except MergeConfigError as error:
                raise MergeConfigError(f"{sweep.path or 'config'}: sweep method {method}"
                                       + (f" at density {parameters['density']}" if "density" in parameters else "")
                                       + f": {error}") from None


class _State:
    """The cache and the counts of one sweep, around a backend."""

    def __init__(self, cache: ResultCache, settings: dict[str, Any], fingerprints: dict[str, Any]) -> None:
        self.cache, self.settings, self.fingerprints = cache, settings, fingerprints
        self.evaluated = self.reused = 0

    def key(self, job: Job) -> tuple[str, dict[str, Any]]:
        """The cache key of `job` and the identity it hashes: input folders stand as their files' fingerprints."""
        data = job.to_dict()
        config = dict(data["config"])
        if config:
            config["base_model"] = self._input(config["base_model"])
            for section in ("adapters", "models"):
                if section in config:
                    config[section] = [{**entry, "path": self._input(entry["path"])} for entry in config[section]]
        identity = {"job": {**data, "config": config, "adapter": self._input(data["adapter"])},
                    "settings": self.settings}
        if job.kind != MERGE:
            identity["base"] = self._input(next(iter(self.fingerprints)))
        return digest(identity), identity

    def _input(self, path: str | None) -> Any:
        """A folder's fingerprint (computed once per sweep), or the reference itself (a Hub id, None)."""
        if path is None:
            return None
        if path not in self.fingerprints:
            self.fingerprints[path] = fingerprint(path) if Path(path).is_dir() else path
        return {"files": self.fingerprints[path]}

    def stream(self, runner: Any, jobs: list[Job], points: list[Point] | None = None,
               each: Callable[[Row], None] | None = None) -> Iterator[tuple[int, Row]]:
        """(index, row) of every job: cached ones first, the rest as the backend finishes them, each stored at once."""
        missing: list[tuple[int, Job]] = []
        for index, job in enumerate(jobs):
            key, _ = self.key(job)
            stored = self.cache.get(key)
            if stored is None:
                missing.append((index, job))
                continue
            self.reused += 1
            row = Row(job.name, job.kind, points[index] if points else None, stored, True)
            if each is not None:
                each(row)
            yield index, row
        indices = {id(job): index for index, job in missing}
        for job, result in runner.run([job for _, job in missing]):
            if "error" not in result:
                key, identity = self.key(job)
                self.cache.put(key, identity, result)
            self.evaluated += 1
            index = indices[id(job)]
            row = Row(job.name, job.kind, points[index] if points else None, result, False)
            if each is not None:
                each(row)
            yield index, row

    def run(self, runner: Any, jobs: list[Job]) -> dict[str, Row]:
        """Every job's row, by name, in job order."""
        rows = dict(self.stream(runner, jobs))
        for index, job in enumerate(jobs):
            if rows[index].error and job.kind != MERGE:
                raise SweepError(f"{job.name}: {rows[index].error}")
        return {job.name: rows[index] for index, job in enumerate(jobs)}


def _reference_jobs(split: str, adapters: list[tuple[str, Path]]) -> list[Job]:
    return [Job(BASE, "base", split), *(Job(ADAPTER, name, split, adapter=str(path)) for name, path in adapters)]


def _merge_job(sweep: SweepConfig, point: Point, split: str, name: str | None = None) -> Job:
    return Job(MERGE, name or point.label, split, absolute_config(point_config(sweep, point)))


def _make_backend(name: str, spec: WorkerSpec, selections: dict[str, Any], workers: int | None,
                  address: str | None) -> Any:
    from .backends import LocalBackend, RayBackend

    if name == "ray":
        return RayBackend(spec, workers, address)
    if name != "local":
        raise SweepError(f"--backend: unknown backend '{name}' (local or ray)")
    return LocalBackend(spec, selections)


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="point", disable=not enabled, dynamic_ncols=True)

