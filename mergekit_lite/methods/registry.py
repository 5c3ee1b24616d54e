"""The one registry of merge methods: each row carries what the CLI, the config checks and the model card need.

A method is a pure description plus pure tensor functions; it never touches files, devices or progress.
Linear methods (the merged delta is a fixed combination Σ cᵢ τᵢ) give `coefficients`, which lets the engine
fuse all adapters of a tensor into one GEMM. Other methods give `combine`, which sees every adapter's τᵢ for
one row chunk, and may declare a selection pass (`needs_threshold`) so the engine can stream them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MergeConfigError
from ..suggest import did_you_mean


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, its type, and whether an adapter entry may override it."""

    name: str
    default: Any
    kind: type
    help: str
    per_adapter: bool = False
    choices: tuple[str, ...] | None = None
    #: for numbers: the open-closed interval (low, high] the value must lie in
    interval: tuple[float, float] | None = None
    required: bool = False

    def check(self, value: Any, where: str) -> Any:
        """Return `value` converted to this parameter's type, or raise naming `where`."""
        value = self._typed(value, where)
        if self.interval is not None and not self.interval[0] < value <= self.interval[1]:
            low, high = self.interval
            raise MergeConfigError(f"{where}: '{self.name}' must be in ({low:g}, {high:g}], got {value!r}")
        return value

    def _typed(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergeConfigError(f"{where}: '{self.name}' must be a number, got {value!r}")
            return float(value)
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                choices = f" (one of: {', '.join(self.choices)})" if self.choices else ""
                raise MergeConfigError(f"{where}: '{self.name}' must be a string{choices}, got {value!r}")
            return value
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registry row: name, parameters with defaults, display name and paper link, and the math."""

    name: str
    display_name: str
    paper_url: str | None
    summary: str
    params: tuple[Param, ...] = ()
    #: linear methods: weights, global params -> cᵢ with τ = Σ cᵢ τᵢ
    coefficients: Callable[[Sequence[float], Mapping[str, Any]], list[float]] | None = None
    #: per-adapter parameter checks that need the whole list (e.g. Σ w ≠ 0), run at config time
    validate: Callable[[Sequence[float], Mapping[str, Any], Sequence[Mapping[str, Any]]], None] | None = None
    #: how each τᵢ is thinned before combining: "magnitude" (TIES trim), "dare" (random drop), or None
    sparsification: str | None = None
    #: non-linear methods: (uᵢ = wᵢ tᵢ of the adapters touching a tensor, their wᵢ, params) -> merged delta
    consensus: Callable[[Sequence[Any], Sequence[float], Mapping[str, Any]], Any] | None = None

    @property
    def is_linear(self) -> bool:
        """True when the merged delta is Σ cᵢ τᵢ with constants cᵢ (fusable, single pass)."""
        return self.coefficients is not None

    def param(self, name: str) -> Param:
        """Return the parameter called `name`."""
        return next(p for p in self.params if p.name == name)

    def resolve_params(
        self,
        global_params: Mapping[str, Any],
        adapter_params: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Check every parameter and fill defaults; per adapter wins over global. Raise with a 'did you mean'."""
        known = {p.name: p for p in self.params}
        resolved = {p.name: p.default for p in self.params}
        for key, value in global_params.items():
            if key not in known:
                raise MergeConfigError(
                    f"parameters: method '{self.name}' takes no parameter '{key}'"
                    + did_you_mean(key, known)
                )
            resolved[key] = known[key].check(value, "parameters") if value is not None else None
        per_adapter: list[dict[str, Any]] = []
        for index, overrides in enumerate(adapter_params):
            own = {p.name: resolved[p.name] for p in self.params if p.per_adapter}
            for key, value in overrides.items():
                where = f"adapters[{index}]"
                if key not in known:
                    raise MergeConfigError(
                        f"{where}: unknown key '{key}' for method '{self.name}'"
                        + did_you_mean(key, [*known, "path", "weight", "name"])
                    )
                if not known[key].per_adapter:
                    raise MergeConfigError(
                        f"{where}: '{key}' is a global parameter of '{self.name}'; set it under 'parameters:'"
                    )
                own[key] = known[key].check(value, where)
            per_adapter.append(own)
        for p in self.params:
            if p.required and (resolved[p.name] is None if not p.per_adapter else any(o[p.name] is None for o in per_adapter)):
                where = "parameters (or every adapter entry)" if p.per_adapter else "parameters"
                raise MergeConfigError(f"method '{self.name}' needs '{p.name}': set it under {where}; {p.help}")
        if self.validate is not None:
            self.validate(weights, resolved, per_adapter)
        return resolved, per_adapter


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (each method module calls this once at import)."""
    if method.name in REGISTRY:
        raise ValueError(f"merge method '{method.name}' registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Return the registry row for `name`, or a config error with the closest method name."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeConfigError(f"method: unknown merge method '{name}'" + did_you_mean(name, REGISTRY)) from None
