"""What a sweep found (SweepResult, its rows) and the merge config of a point: what run.py fills in and
report.py writes out, so that neither imports the other's module for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import MergeConfig
from ..evaluation.options import EvalOptions
from .points import Point
from .spec import SweepConfig

#: where the results cache lives inside --out
CACHE_DIR = "cache"


@dataclass
class Row:
    """One evaluated point (or reference model) on one split."""

    name: str
    kind: str
    point: Point | None
    result: dict[str, Any]
    cached: bool
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """The one-line reason the point could not be evaluated, else None."""
        return self.result.get("error")


@dataclass
class SweepResult:
    """Everything the outputs are made of."""

    config: SweepConfig
    tasks: list[str]
    options: EvalOptions
    rows: list[Row]
    references: dict[str, dict[str, Row]]
    best: Row | None
    test_rows: list[Row]
    evaluated: int = 0
    reused: int = 0
    rejected: int = 0
    backend: str = "local"
    workers: int = 1

    @property
    def metric(self) -> str:
        """The selection metric."""
        return self.config.spec.metric


def point_config(sweep: SweepConfig, point: Point) -> MergeConfig:
    """The merge config of `point` (checked like any config)."""
    return sweep.config_for(point.method, point.merge_parameters(), point.weights)
