"""A sweep config: a merge config whose `sweep:` section lists methods, parameter values or ranges, per-adapter
weights, the search and the selection metric. Strict like config.py: unknown keys, parameters no chosen method
takes, empty lists and unknown metrics are one-line errors with a 'did you mean', before any work starts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import MergeConfig, read_config_data
from ..errors import MergeConfigError
from ..evaluation.options import check_eval_section
from ..methods import REGISTRY, get_method
from ..suggest import did_you_mean

_SWEEP_KEYS = ("method", "parameters", "weights", "search", "trials", "seed", "select")
_SELECT_KEYS = ("metric",)
SEARCHES = ("grid", "random", "optuna")
#: mean over tasks of each task's score (`acc`: the task's headline metric; `answer_ll`: the suite's `_ll` companion)
SCORE_METRICS = ("acc", "answer_ll", "exact")
METRICS = (*SCORE_METRICS, *(f"{m}_retention" for m in SCORE_METRICS))
DEFAULT_METRIC = "answer_ll_retention"
#: a sweep over full fine-tunes (`models:`) scores no input alone, so no retention: its default metric is this
MODELS_DEFAULT_METRIC = "answer_ll"
#: what "a method's defaults" means where the registry has no default (a required density, SLERP's t):
#: the values the README's suite table uses
FILLED_DEFAULTS = {"density": 0.5, "t": 0.5}
#: placeholder output of a sweep config without `output:` (points are never written)
_NO_OUTPUT = "sweep_best"


@dataclass(frozen=True)
class Range:
    """A continuous range {low, high} (random and optuna searches draw from it)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        """As written in the config."""
        return {"low": self.low, "high": self.high}


Values = tuple[Any, ...] | Range


@dataclass(frozen=True)
class SweepSpec:
    """The `sweep:` section, checked: what to try, how to search, what to maximise."""

    methods: tuple[str, ...]
    parameters: dict[str, Values]
    weights: dict[str, Values]
    search: str = "grid"
    trials: int | None = None
    seed: int = 0
    metric: str = DEFAULT_METRIC

    def takes(self, method: str) -> list[str]:
        """The swept parameters `method` declares (a method takes what it declares, ignores the rest)."""
        declared = {p.name for p in get_method(method).params}
        return [name for name in self.parameters if name in declared]

    def foreign_entry_keys(self, method: str) -> set[str]:
        """Adapter-entry keys that another chosen method takes and `method` does not (learned's `calibration:` at
        a ties point): the same rule as `takes`, so they are left out of `method`'s points. A key no chosen method
        takes is not in the set: it stays, and the merge config refuses it by name."""
        return {name for other in self.methods for name in _entry_keys(other)} - _entry_keys(method)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the leaderboard's header and the cache key."""
        def plain(values: Values) -> Any:
            return values.to_dict() if isinstance(values, Range) else list(values)
        return {"method": list(self.methods), "parameters": {k: plain(v) for k, v in self.parameters.items()},
                "weights": {k: plain(v) for k, v in self.weights.items()}, "search": self.search,
                "trials": self.trials, "seed": self.seed, "select": {"metric": self.metric}}


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: the merge config every point starts from (`base`, as a mapping) and the checked `sweep:` section."""

    spec: SweepSpec
    base: dict[str, Any]
    config_dir: Path
    #: True when the file had an `output:` section: the best merge is then written like `merge run`
    writes_output: bool
    path: Path | None = None

    @property
    def adapter_names(self) -> list[str]:
        """Each input's label (its `name`, else its folder's name), in config order."""
        return [entry.label for entry in self.template().inputs]

    def template(self) -> MergeConfig:
        """The base config with the first method at its defaults (checks base, adapters, output, eval)."""
        return self.config_for(self.spec.methods[0], method_defaults(self.spec.methods[0]), {})

    def config_for(self, method: str, parameters: Mapping[str, Any], weights: Mapping[str, float]) -> MergeConfig:
        """The merge config of one point: the base config with this method, parameters and adapter weights."""
        data = dict(self.base)
        data["method"] = method
        data["parameters"] = dict(parameters)
        foreign = self.spec.foreign_entry_keys(method)
        for section in ("adapters", "models"):
            if isinstance(data.get(section), list):
                data[section] = [_point_entry(entry, foreign, weights) for entry in data[section]]
        return MergeConfig.from_dict(data, self.config_dir)


def _point_entry(entry: Any, foreign: set[str], weights: Mapping[str, float]) -> Any:
    """An adapter or model entry at one point: without the keys only other methods take, with its swept weight.
    An entry that is not a mapping with a path is left for the merge config's own message."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, Mapping) or "path" not in entry:
        return entry
    entry = {key: value for key, value in entry.items() if key not in foreign}
    label = entry.get("name") or Path(str(entry["path"]).rstrip("/")).name
    if label in weights:
        entry["weight"] = weights[label]
    return entry


def _entry_keys(method: str) -> set[str]:
    """The parameters an adapter entry may set for `method` (its per-adapter ones)."""
    return {p.name for p in get_method(method).params if p.per_adapter}


def method_defaults(method: str) -> dict[str, Any]:
    """The parameters of a method's default merge: the registry's defaults, and FILLED_DEFAULTS where it has none."""
    return {p.name: FILLED_DEFAULTS[p.name] for p in get_method(method).params
            if p.default is None and p.name in FILLED_DEFAULTS}


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read a YAML sweep config (a merge config with a `sweep:` section); relative paths are the file's."""
    data, path = read_config_data(path)  # the size, encoding, YAML and alias-bomb checks of a merge config
    try:
        config = sweep_config_from_dict(data, path.resolve().parent)
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None
    return SweepConfig(config.spec, config.base, config.config_dir, config.writes_output, path.resolve())


def sweep_config_from_dict(data: Any, base_dir: str | Path) -> SweepConfig:
    """Check a sweep config mapping: the `sweep:` section, then every method's point configs' shape."""
    if not isinstance(data, Mapping):
        raise MergeConfigError("the config must be a mapping with base_model, adapters and a sweep: section")
    if "sweep" not in data:
        raise MergeConfigError("config: missing required key 'sweep' (methods and parameters to try); "
                               "a config without one is for `merge run`")
    for key in ("method", "parameters"):
        if key in data:
            raise MergeConfigError(f"config: '{key}' goes under 'sweep:' in a sweep config "
                                   f"(sweep: {{{key}: ...}})")
    base = {k: v for k, v in data.items() if k != "sweep"}
    writes_output = base.get("output") is not None
    if not writes_output:
        base["output"] = {"path": _NO_OUTPUT}
    spec = _metric_for_inputs(parse_spec(data["sweep"]), data["sweep"], base)
    config = SweepConfig(spec, base, Path(base_dir).resolve(), writes_output)
    labels = config.adapter_names  # checks the base config itself (base, adapters, output, eval)
    check_eval_section(config.template().eval)  # an empty task list would sweep over the whole suite
    for name in spec.weights:
        if name not in labels:
            raise MergeConfigError(f"sweep.weights: no adapter named '{name}'" + did_you_mean(name, labels))
    for method in spec.methods:  # every method accepts its defaults with these inputs
        point = config.config_for(method, method_defaults(method), {})
        if point.merge_method.calibrated is not None:  # data-aware: never calibrate on what the sweep scores
            from ..calibration import refuse_scored_calibration

            refuse_scored_calibration(point)
    return config


def _metric_for_inputs(spec: SweepSpec, raw: Mapping[str, Any], base: Mapping[str, Any]) -> SweepSpec:
    """Retention compares a merge with each input scored alone; a sweep scores adapters alone, never the full
    fine-tunes of `models:`. So a `models:` sweep selects by MODELS_DEFAULT_METRIC unless told otherwise, and a
    retention metric named for it is refused (it could never be computed)."""
    if not base.get("models") or not spec.metric.split(":", 1)[-1].endswith("_retention"):
        return spec
    select = raw.get("select") if isinstance(raw.get("select"), Mapping) else {}
    if "metric" not in select:
        return replace(spec, metric=MODELS_DEFAULT_METRIC)
    score = spec.metric.removesuffix("_retention")
    raise MergeConfigError(f"sweep.select.metric: '{spec.metric}' compares each input scored alone, which a sweep "
                           f"does not do for the full fine-tunes in 'models:'; select by a score such as '{score}' "
                           f"(the default for models: is {MODELS_DEFAULT_METRIC})")


def parse_spec(raw: Any) -> SweepSpec:
    """The `sweep:` section as a SweepSpec, or a MergeConfigError naming the key."""
    if not isinstance(raw, Mapping):
        raise MergeConfigError("sweep: must be a mapping like {method: [ties], parameters: {lambda: [0.5, 1.0]}}")
    for key in raw:
        if key not in _SWEEP_KEYS:
            raise MergeConfigError(f"sweep: unknown key '{key}'" + did_you_mean(str(key), _SWEEP_KEYS))
    if "method" not in raw:
        raise MergeConfigError("sweep: missing required key 'method' (one method or a list)")
    methods = raw["method"] if isinstance(raw["method"], list) else [raw["method"]]
    if not methods:
        raise MergeConfigError("sweep.method: an empty list; name at least one method")
    for method in methods:
        if not isinstance(method, str) or method not in REGISTRY:
            raise MergeConfigError(f"sweep.method: unknown merge method {method!r}" + did_you_mean(str(method), REGISTRY))
    if len(set(methods)) != len(methods):
        raise MergeConfigError(f"sweep.method: a method is listed twice ({methods})")
    search = raw.get("search", "grid")
    if search not in SEARCHES:
        raise MergeConfigError(f"sweep.search: unknown search {search!r}" + did_you_mean(str(search), SEARCHES))
    trials = raw.get("trials")
    if search == "grid":
        if trials is not None:
            raise MergeConfigError("sweep.trials: a grid tries every point; 'trials' is for search: random or optuna")
    elif isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise MergeConfigError(f"sweep.trials: search: {search} needs a number of trials ≥ 1, got {trials!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeConfigError(f"sweep.seed: must be an integer, got {seed!r}")
    parameters = _value_map(raw.get("parameters") or {}, "sweep.parameters", search)
    declared = {p.name: p for m in methods for p in get_method(m).params}
    for name, values in parameters.items():
        takers = [m for m in methods if name in {p.name for p in get_method(m).params}]
        if not takers:
            raise MergeConfigError(f"sweep.parameters: no chosen method ({', '.join(methods)}) takes '{name}'"
                                   + did_you_mean(name, declared))
        for method in takers:
            param = get_method(method).param(name)
            for value in values.to_dict().values() if isinstance(values, Range) else values:
                param.check(value, f"sweep.parameters.{name}")
    weights = _value_map(raw.get("weights") or {}, "sweep.weights", search)
    for name, values in weights.items():
        for value in values.to_dict().values() if isinstance(values, Range) else values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeConfigError(f"sweep.weights.{name}: weights are numbers, got {value!r}")
    select = raw.get("select") or {}
    if not isinstance(select, Mapping):
        raise MergeConfigError("sweep.select: must be a mapping like {metric: answer_ll_retention}")
    for key in select:
        if key not in _SELECT_KEYS:
            raise MergeConfigError(f"sweep.select: unknown key '{key}'" + did_you_mean(str(key), _SELECT_KEYS))
    metric = select.get("metric", DEFAULT_METRIC)
    check_metric(metric, None)
    return SweepSpec(tuple(methods), parameters, weights, search, trials, seed, metric)


def check_metric(metric: Any, tasks: list[str] | None) -> None:
    """A metric is one of METRICS (mean over tasks), or `<task>:<metric>` for one task (checked once tasks are known)."""
    if not isinstance(metric, str):
        raise MergeConfigError(f"sweep.select.metric: must be a string, got {metric!r}")
    name = metric.split(":", 1)[1] if ":" in metric else metric
    if name not in METRICS:
        raise MergeConfigError(f"sweep.select.metric: unknown metric '{metric}'" + did_you_mean(name, METRICS))
    if ":" in metric and tasks is not None:
        task = metric.split(":", 1)[0]
        if task not in tasks:
            raise MergeConfigError(f"sweep.select.metric: '{metric}' names task '{task}', which the sweep does not "
                                   "evaluate" + did_you_mean(task, tasks))


def _value_map(raw: Any, where: str, search: str) -> dict[str, Values]:
    """{name: [values...] | {low, high}}; a range needs a random or optuna search; lists must not be empty."""
    if not isinstance(raw, Mapping):
        raise MergeConfigError(f"{where}: must be a mapping of names to value lists or {{low, high}} ranges")
    out: dict[str, Values] = {}
    for name, values in raw.items():
        if isinstance(values, Mapping):
            keys = set(values)
            if keys != {"low", "high"}:
                extra = sorted(keys - {"low", "high"})
                raise MergeConfigError(f"{where}.{name}: a range is {{low: ..., high: ...}}" +
                                       (f"; unknown key '{extra[0]}'" + did_you_mean(str(extra[0]), ("low", "high"))
                                        if extra else ""))
            low, high = values["low"], values["high"]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) or not low < high:
                raise MergeConfigError(f"{where}.{name}: a range needs numbers low < high, got {dict(values)}")
            if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(float(high) - float(low))):
                raise MergeConfigError(f"{where}.{name}: a range needs finite bounds whose difference is finite too "
                                       f"(draws would be inf or nan), got {dict(values)}")
            if search == "grid":
                raise MergeConfigError(f"{where}.{name}: a range {{low, high}} needs search: random or optuna; "
                                       "a grid takes a list of values")
            out[str(name)] = Range(float(low), float(high))
            continue
        listed = values if isinstance(values, list) else [values]
        if not listed:
            raise MergeConfigError(f"{where}.{name}: an empty list; give at least one value")
        if len({repr(v) for v in listed}) != len(listed):
            raise MergeConfigError(f"{where}.{name}: a value is listed twice ({listed})")
        for value in listed:
            if isinstance(value, float) and not math.isfinite(value):
                raise MergeConfigError(f"{where}.{name}: {value} is not a finite number; give finite values")
        out[str(name)] = tuple(listed)
    return out
