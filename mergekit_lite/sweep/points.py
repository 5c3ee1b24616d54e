"""The points a sweep tries: a grid, seeded random draws, or optuna's TPE asking one point after another.

A point is a method, its swept parameters and the adapters' weights; everything else comes from the config.
Drawn values are rounded to 4 decimals, so that a point reads well in the leaderboard and keys the cache the
same way every time; the same seed gives the same points.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeConfigError
from .spec import Range, SweepSpec, Values, method_defaults

DIGITS = 4


@dataclass(frozen=True)
class Point:
    """One merge to try: method, the parameters the sweep sets (the method's defaults fill the rest), weights."""

    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`ties lambda=1 density=0.5 w[add]=1.5`: one line for the leaderboard and the progress bar."""
        parts = [self.method, *(f"{k}={_fmt(v)}" for k, v in self.parameters.items()),
                 *(f"w[{k}]={_fmt(v)}" for k, v in self.weights.items())]
        return " ".join(parts)

    def merge_parameters(self) -> dict[str, Any]:
        """The `parameters:` of this point's merge config: the method's defaults, then the swept values."""
        return {**method_defaults(self.method), **self.parameters}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"method": self.method, "parameters": dict(self.parameters), "weights": dict(self.weights)}

    def key(self) -> str:
        """A canonical string of the point (sorted keys), for de-duplication."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _draw(rng: random.Random, values: Values) -> Any:
    if isinstance(values, Range):
        return _inside(round(rng.uniform(values.low, values.high), DIGITS), values)
    return values[rng.randrange(len(values))]


def _inside(value: float, values: Range) -> float:
    """A rounded draw kept inside its range (a bound with more than DIGITS decimals could round past it)."""
    return min(max(value, values.low), values.high)


def point_count(spec: SweepSpec) -> int:
    """How many points the sweep tries, counted without building them: a grid's size, else its trials."""
    if spec.search != "grid":
        return spec.trials or 0
    weights = math.prod(len(values) for values in spec.weights.values())  # type: ignore[arg-type]
    return sum(math.prod(len(spec.parameters[name]) for name in spec.takes(method))  # type: ignore[arg-type]
               for method in spec.methods) * weights


def grid_points(spec: SweepSpec) -> list[Point]:
    """Every combination: per method, the product of the swept parameters it takes, times the weight lists."""
    points: list[Point] = []
    weight_names = list(spec.weights)
    weight_lists = [list(spec.weights[name]) for name in weight_names]  # grids hold lists only (spec checks)
    for method in spec.methods:
        names = spec.takes(method)
        for values in itertools.product(*(list(spec.parameters[name]) for name in names)):  # type: ignore[arg-type]
            for weights in itertools.product(*weight_lists):
                points.append(Point(method, dict(zip(names, values)), dict(zip(weight_names, weights))))
    return _unique(points)


def random_points(spec: SweepSpec) -> list[Point]:
    """`trials` seeded draws: a method uniformly, then each parameter it takes and each weight from its list or range."""
    rng = random.Random(spec.seed)
    points = []
    for _ in range(spec.trials or 0):
        method = spec.methods[rng.randrange(len(spec.methods))]
        parameters = {name: _draw(rng, spec.parameters[name]) for name in spec.takes(method)}
        weights = {name: _draw(rng, values) for name, values in spec.weights.items()}
        points.append(Point(method, parameters, weights))
    return points


class OptunaSearch:
    """optuna's TPE sampler (seeded), asked for one point at a time and told each point's validation score.

    Asks and tells happen in the driver, in trial order, so a given seed and the same scores give the same points
    whatever the backend; with several workers a batch of points is asked before their scores are told.
    """

    def __init__(self, spec: SweepSpec) -> None:
        try:
            import optuna
        except ImportError:
            raise MergeConfigError("sweep.search: optuna needs the optuna package: "
                                   "pip install 'mergekit_lite[sweep]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.spec = spec
        sampler = optuna.samplers.TPESampler(seed=spec.seed)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self._trials: dict[int, Any] = {}

    def ask(self) -> tuple[int, Point]:
        """The next point, and its trial number for `tell`."""
        trial = self.study.ask()
        method = trial.suggest_categorical("method", list(self.spec.methods))
        parameters = {name: self._suggest(trial, name, self.spec.parameters[name]) for name in self.spec.takes(method)}
        weights = {name: self._suggest(trial, f"weight:{name}", values) for name, values in self.spec.weights.items()}
        self._trials[trial.number] = trial
        return trial.number, Point(method, parameters, weights)

    def tell(self, number: int, value: float | None) -> None:
        """The trial's validation score (None: failed, the sampler learns nothing from it)."""
        state = self._optuna.trial.TrialState.COMPLETE if value is not None else self._optuna.trial.TrialState.FAIL
        self.study.tell(self._trials.pop(number), value if value is not None else None, state=state)

    @staticmethod
    def _suggest(trial: Any, name: str, values: Values) -> Any:
        if isinstance(values, Range):
            return _inside(round(trial.suggest_float(name, values.low, values.high), DIGITS), values)
        index = trial.suggest_categorical(name, list(range(len(values))))
        return values[index]


def fixed_points(spec: SweepSpec) -> list[Point] | None:
    """The whole list for grid and random searches (known before any evaluation); None for optuna (adaptive)."""
    if spec.search == "grid":
        return grid_points(spec)
    if spec.search == "random":
        return random_points(spec)
    return None


def point_stream(spec: SweepSpec, score_of: Callable[[Point], float | None]) -> Iterator[Point]:
    """Points one by one: a fixed list, or optuna's asks each told its score by `score_of` once evaluated."""
    fixed = fixed_points(spec)
    if fixed is not None:
        yield from fixed
        return
    search = OptunaSearch(spec)
    for _ in range(spec.trials or 0):
        number, point = search.ask()
        yield point
        search.tell(number, score_of(point))


def _unique(points: list[Point]) -> list[Point]:
    seen: set[str] = set()
    out = []
    for point in points:
        if point.key() not in seen:
            seen.add(point.key())
            out.append(point)
    return out
