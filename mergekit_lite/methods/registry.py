"""The one registry of merge methods: each row carries what the CLI, the config checks and the model card need.

A method is a pure description plus pure tensor functions; it never touches files, devices or progress. How
the engine runs it is the method's *phase*, declared, never inferred:

- `LinearPhase`: constants cᵢ, the merged delta is Σ cᵢ τᵢ. The engine streams W + Σ cᵢ PᵢQᵢ in one pass
  over the concatenated factors.
- `ElementwisePhase`: each τᵢ thinned by the phase's `sparsifier` (a strategy, `sparsifiers.py`: the exact
  top-k sets it needs, how it cuts a chunk, how it scales kept entries), then a pure per-chunk `combine` of the
  weighted uᵢ. `kernel` names the fused C kernel that reproduces `combine` bit for bit, when there is one.
- `FactoredPhase`: given every adapter's low-rank factors of one tensor, return factors (L, R) of the merged
  delta; the engine then streams W + L·R in row chunks through the same path as the linear methods. This is
  where methods computed in the low-rank core of the stacked factors attach.
- `InterpolationPhase`: a statistics pass over the chunks first, then the chunks written from them (SLERP).

Each phase declares what the engine, the dry run and the writers need to know (`PhaseNeeds`: a statistics pass,
factors from the inputs, chunk combines, its sparsifier and kernel, the Σ cᵢτᵢ coefficients, the exact rank of its
factors, its memory multiplier, whether a PEFT output is possible); they ask those declarations, never its type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..errors import MergeConfigError
from ..suggest import did_you_mean
from .sparsifiers import Sparsifier

#: Core Space merging (Panariello et al., NeurIPS 2025): what `space: core` runs
CORE_SPACE_PAPER = "https://arxiv.org/abs/2509.17786"


#: the largest magnitude a number in a merge config may have: float32's largest (the merge computes in float32 or
#: wider and writes float32 at most for float32 bases; a larger scale is inf on its first product)
MAX_MAGNITUDE = 3.4028234663852886e38


def finite_scale(value: int | float, where: str) -> float:
    """`value` as a float, or a MergeConfigError (prefixed by `where`) when it is NaN, ±inf or beyond MAX_MAGNITUDE."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64's range
        number = float("inf") if value > 0 else float("-inf")
        value = number
    if number != number:
        raise MergeConfigError(f"{where}must be a finite number, got {value!r}")
    if abs(number) > MAX_MAGNITUDE:
        raise MergeConfigError(f"{where}must be a finite number of magnitude at most {MAX_MAGNITUDE:.3g} (beyond it "
                               f"the merge overflows to inf), got {value!r}")
    return number


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, its type, and whether an adapter entry may override it."""

    name: str
    default: Any
    kind: type
    help: str
    per_adapter: bool = False
    choices: tuple[str, ...] | None = None
    #: for numbers: the open-closed interval (low, high] the value must lie in ([low, high] when `closed`)
    interval: tuple[float, float] | None = None
    required: bool = False
    closed: bool = False

    def check(self, value: Any, where: str) -> Any:
        """Return `value` converted to this parameter's type, or raise naming `where`."""
        value = self._typed(value, where)
        if self.interval is not None and self.closed and not self.interval[0] <= value <= self.interval[1]:
            low, high = self.interval
            raise MergeConfigError(f"{where}: '{self.name}' must be in [{low:g}, {high:g}] ({self.help}), got {value!r}")
        if self.interval is not None and not self.closed and not self.interval[0] < value <= self.interval[1]:
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
            return finite_scale(value, f"{where}: '{self.name}' ")
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                choices = f" (one of: {', '.join(self.choices)})" if self.choices else ""
                raise MergeConfigError(f"{where}: '{self.name}' must be a string{choices}, got {value!r}")
            return value
        return value


@dataclass(frozen=True)
class LowRankFactors:
    """One adapter's low-rank change of one tensor, in the tensor's layout: τᵢ = scale · left @ right.

    `left` is m×r and `right` r×n (for Conv1D and embeddings already transposed); the scale is kept apart so
    a method can fold its own coefficient into it with one rounding, as the linear path does.
    """

    left: Any
    right: Any
    scale: float


#: extra float32 buffers of an elementwise method on the torch path, per element: the sign vote, the sum, the divisor
SPARSE_BUFFERS = 3
#: float32-sized buffers of an interpolating method's statistics pass besides its τᵢ: one new endpoint, the two
#: endpoints in float64 (four float32's worth) and one float64 product (two)
INTERPOLATION_BUFFERS = 7


class PhaseNeeds:
    """What a phase declares to the engine, the dry run and the writers, so that none of them tests its type.

    Each phase class overrides what differs; the defaults describe a phase that streams its delta as factors
    (W + L·R in row chunks) with nothing to prepare."""

    #: the delta is Σ cᵢ τᵢ with constants cᵢ (`linear_coefficients` gives them): fusable, one pass
    sums_coefficients: ClassVar[bool] = False
    #: each chunk is combined from the materialized τᵢ of the chunk (thinned by `sparsifier`, then `kernel` or
    #: torch): the merged delta is full rank, held whole only to write it as factors (a randomized SVD)
    combines_chunks: ClassVar[bool] = False
    #: the delta's factors are computed per tensor from every input's low-rank factors (the engine runs that one
    #: tensor ahead; inputs must be low-rank products, 1-D bias shifts only when `takes_bias_shifts`)
    factors_from_inputs: ClassVar[bool] = False
    #: a first pass over the chunks gathers whole-tensor statistics before any chunk is written
    statistics_pass: ClassVar[bool] = False
    #: the output may be a PEFT adapter (False: checkpoints only)
    peft_output: ClassVar[bool] = True
    #: the selection strategy thinning each τᵢ first (sparsifiers.py), None: none
    sparsifier: Sparsifier | None = None
    #: the fused C kernel reproducing the chunk combine bit for bit ("sum", "ties"), None: torch only
    kernel: str | None = None

    def linear_coefficients(self, weights: Sequence[float], params: Mapping[str, Any]) -> list[float] | None:
        """The cᵢ of a delta Σ cᵢ τᵢ, None for a phase whose delta is not one."""
        return None

    def exact_rank(self, ranks: Sequence[int]) -> int | None:
        """The width of the delta's factors from the inputs' ranks rᵢ alone (a PEFT output's exact rank), None
        when only computing the factors tells."""
        return None

    @property
    def rank_declared(self) -> bool:
        """True when `exact_rank` is the method's own promise, checked against the factors it returns."""
        return False

    @property
    def takes_bias_shifts(self) -> bool:
        """True when 1-D bias shifts are merged too (a phase working on factors must say how)."""
        return True

    def buffers(self, inputs: int, fused: bool) -> int:
        """float32 buffers per element of a chunk held besides the working ones, for chunk sizing: `inputs` τᵢ
        merged, `fused` when a C kernel combines the materialized τᵢ of a chunk."""
        return inputs if fused else 0  # the τᵢ of a chunk, in each merge thread's buffers


@dataclass(frozen=True)
class LinearPhase(PhaseNeeds):
    """The merged delta is Σ cᵢ τᵢ with constants cᵢ = coefficients(weights, params)."""

    coefficients: Callable[[Sequence[float], Mapping[str, Any]], list[float]]

    sums_coefficients: ClassVar[bool] = True

    def linear_coefficients(self, weights: Sequence[float], params: Mapping[str, Any]) -> list[float] | None:
        """cᵢ = coefficients(weights, params)."""
        return self.coefficients(weights, params)

    def exact_rank(self, ranks: Sequence[int]) -> int | None:
        """Σ rᵢ: the concatenated factors."""
        return sum(ranks)


@dataclass(frozen=True)
class ElementwisePhase(PhaseNeeds):
    """Per-tensor preparation, then a pure per-chunk combine of uᵢ = wᵢ tᵢ (tᵢ: τᵢ thinned as declared)."""

    #: (uᵢ of the adapters touching a tensor, their wᵢ, params) -> the merged delta of the chunk
    combine: Callable[[Sequence[Any], Sequence[float], Mapping[str, Any]], Any]
    #: how each τᵢ is thinned first (sparsifiers.MAGNITUDE, DARE, BREADCRUMBS, MAGPRUNE), or None: as it is
    sparsifier: Sparsifier | None = None
    #: the fused C kernel that computes `combine` bit for bit ("sum" or "ties"); None: torch only
    kernel: str | None = None

    combines_chunks: ClassVar[bool] = True

    def buffers(self, inputs: int, fused: bool) -> int:
        """Each τᵢ of a chunk, plus the torch path's own (SPARSE_BUFFERS)."""
        return inputs + (0 if fused else SPARSE_BUFFERS)


@dataclass(frozen=True)
class FactoredContext:
    """What a factored method may know about the tensor besides the factors (for rank caps and DARE keys)."""

    #: the base tensor's name
    tensor: str
    #: (m, n): the tensor's shape as a matrix (rows, columns)
    shape: tuple[int, int]
    #: the merge's seed
    seed: int
    #: config indices of the adapters whose factors are given, in order
    adapters: tuple[int, ...]
    #: their per-adapter parameters (density, rescale, …), in the same order
    adapter_params: tuple[Mapping[str, Any], ...]
    #: every adapter's weight wᵢ in config order, touching this tensor or not (a linear method's Σ wᵢ counts all)
    all_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class FactoredPhase(PhaseNeeds):
    """The merged delta of a tensor as factors (L, R) computed from every adapter's low-rank factors."""

    #: ([LowRankFactors of the adapters touching the tensor], their wᵢ, params, context) -> (L m×k, R k×n),
    #: the merged delta being L @ R
    factors: Callable[[Sequence[LowRankFactors], Sequence[float], Mapping[str, Any], FactoredContext],
                      tuple[Any, Any]]
    #: for 1-D changes (lora_bias shifts), which have no factors: ([τᵢ], [wᵢ], params, context) -> merged delta
    #: (the method applies the weights itself, as `factors` does); None refuses them
    vectors: Callable[[Sequence[Any], Sequence[float], Mapping[str, Any], FactoredContext], Any] | None = None
    #: the width of L from the adapters' ranks rᵢ alone, when the method knows it without computing the factors
    #: (RegMean: Σ rᵢ); an output's layout (a PEFT adapter's ranks) is then planned before any factor exists, as
    #: a data-aware method's must be (its factors need the calibration). None: the factors are computed for it
    rank: Callable[[Sequence[int]], int] | None = None

    factors_from_inputs: ClassVar[bool] = True

    def exact_rank(self, ranks: Sequence[int]) -> int | None:
        """`rank(ranks)` when declared."""
        return None if self.rank is None else self.rank(ranks)

    @property
    def rank_declared(self) -> bool:
        """True when the method declares `rank`."""
        return self.rank is not None

    @property
    def takes_bias_shifts(self) -> bool:
        """True when the method says how (`vectors`)."""
        return self.vectors is not None


@dataclass(frozen=True)
class InterpolationPhase(PhaseNeeds):
    """Methods that need whole-tensor statistics of the inputs before any chunk can be written (SLERP's angle):
    a first pass over the chunks gathers per-row statistics, then a second pass writes W' = combine(...).

    The inputs are given in config order as uᵢ = wᵢτᵢ rows, None for an input that does not touch the tensor.
    """

    #: (W rows, [uᵢ rows or None], params) -> per-row statistics (rows × k, float64), summed over rows in order
    statistics: Callable[[Any, Sequence[Any], Mapping[str, Any]], Any]
    #: (the k summed statistics, params) -> the tensor's state (e.g. SLERP's two coefficients)
    finish: Callable[[Any, Mapping[str, Any]], Any]
    #: (W rows, [uᵢ rows or None], state, params) -> the merged rows W' in the compute dtype
    combine: Callable[[Any, Sequence[Any], Any, Mapping[str, Any]], Any]
    #: True when the weights are not a scale of τᵢ but the method's own (NuSLERP's t = w₂/(w₁+w₂), Multi-SLERP's
    #: barycentric weights): the rows given are then τᵢ themselves and each tensor's wᵢ is params["weight.i"]
    weights_apart: bool = False
    #: optional selection before the statistics (SCE's select): (params) -> the share s of the entries with a
    #: nonzero score to keep, or None for no selection; the engine keeps the k = ⌊s · #nonzero⌋ entries of largest
    #: score (exact, lower flat index first on ties) and zeroes the others in every uᵢ given to both passes
    select_share: Callable[[Mapping[str, Any]], float | None] | None = None
    #: ([uᵢ rows or None], params) -> the per-entry score (flat, float32, ≥ 0, a pure function of each entry)
    score: Callable[[Sequence[Any], Mapping[str, Any]], Any] | None = None

    statistics_pass: ClassVar[bool] = True
    peft_output: ClassVar[bool] = False

    def buffers(self, inputs: int, fused: bool) -> int:
        """Per element of a chunk, besides W: each τᵢ and its weighted copy, and INTERPOLATION_BUFFERS."""
        return 2 * inputs + INTERPOLATION_BUFFERS


def weights_apart(weights: Sequence[Any], params: Mapping[str, Any]) -> tuple[list[float], dict[str, Any]]:
    """The engine's (weights, params) for a method that reads the weights itself: every τᵢ at weight 1, each wᵢ
    (scalar or per-layer setting, evaluated per tensor like any parameter) as params["weight.i"]."""
    return [1.0] * len(weights), {**params, **{f"weight.{i}": w for i, w in enumerate(weights)}}


Phase = LinearPhase | ElementwisePhase | FactoredPhase | InterpolationPhase


@dataclass(frozen=True)
class CalibrationRun:
    """What a calibrated phase may know about the run besides the prepared merge."""

    #: the torch device the merge runs on (the calibration runs there too)
    device: Any
    #: show a progress bar (with the loss, for trained coefficients)
    progress: bool = False
    #: where teacher targets are cached (None: `calibration.teachers.resolve_cache_dir`'s default)
    cache_dir: Any = None


@dataclass(frozen=True)
class Calibrated:
    """What a calibrated phase hands the engine once its forward passes are done: per-input weights (numbers,
    gradients or filter lists, as a config may give them), optionally the phase to stream instead of the method's
    own (a factored phase closed over gathered statistics), and what to write beside the output."""

    weights: tuple[Any, ...]
    #: the phase the engine streams; None: the method's own `phase`
    phase: Phase | None = None
    #: the streamed phase's global parameters (None: the config's)
    params: Mapping[str, Any] | None = None
    #: file name -> bytes, written into the output folder (coefficients.json, pictures)
    side_files: Mapping[str, bytes] = field(default_factory=dict)
    #: a markdown section for the model card ("" for none)
    card_section: str = ""
    #: one line for the end of `merge run`
    summary: str = ""

    def streamed(self, method: MergeMethod, params: Mapping[str, Any],
                 adapter_params: Sequence[Mapping[str, Any]]) -> tuple[MergeMethod, list[Any], dict[str, Any],
                                                                      list[dict[str, Any]]]:
        """(method, weights, params, per-input params) the engine runs: the calibration's, no config-time checks."""
        own = {} if self.params is None else dict(self.params)
        phase = self.phase or method.phase
        return (replace(method, phase=phase, validate=None, calibrated=None), list(self.weights),
                own if self.params is not None else dict(params), [{} for _ in adapter_params])


@dataclass(frozen=True)
class CalibratedPhase:
    """Methods that need the model's forward passes on calibration prompts before the streamed write (`learned`,
    `regmean`): `calibrate(prepared merge, CalibrationRun) -> Calibrated` runs once, after the inputs are opened
    and checked and before anything is written; the engine then streams what it returns through the method's
    `phase` (or the phase it gives). The engine never trains; `mergekit_lite.calibration` is the one home of
    prompts, batches, branches and teachers."""

    calibrate: Callable[[Any, CalibrationRun], Calibrated]
    #: the dry run's lines for what `calibrate` will do (prompts, passes, training or statistics), read from the
    #: prepared merge without loading a model; they replace the factored methods' QR/SVD lines
    describe: Callable[[Any], list[str]] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A registry row: name, parameters with defaults, display name and paper link, and the phase that runs it."""

    name: str
    display_name: str
    paper_url: str | None
    summary: str
    phase: Phase
    params: tuple[Param, ...] = ()
    #: per-adapter parameter checks that need the whole list (e.g. Σ w ≠ 0), run at config time
    validate: Callable[[Sequence[float], Mapping[str, Any], Sequence[Mapping[str, Any]]], None] | None = None
    #: the same steps run in the core of the stacked factors (`space: core`), when the method offers it
    core_phase: FactoredPhase | None = None
    #: (fewest, most) inputs the method merges, when it is defined only for some counts (SLERP: 1 or 2)
    input_count: tuple[int, int] | None = None
    #: data-aware methods: forward passes on calibration prompts first (then `phase` streams what they return)
    calibrated: CalibratedPhase | None = None
    #: what an input's weight does in this method, for the card ("Weight is …"): most scale the task vector
    weight_meaning: str = "the signed wᵢ of each task vector"

    def resolved(self, params: Mapping[str, Any]) -> MergeMethod:
        """The method as `params` run it: with `space: core`, the core-space variant (another method than the
        one of the same name in full space, and named so on the card)."""
        if self.core_phase is not None and params.get("space") == "core":
            return replace(self, phase=self.core_phase, display_name=f"{self.display_name} in core space",
                           core_phase=None, paper_url=CORE_SPACE_PAPER,
                           summary=f"{self.summary}, on the core matrices of the stacked LoRA factors (Core Space)")
        return self

    @property
    def is_linear(self) -> bool:
        """True when the merged delta is Σ cᵢ τᵢ with constants cᵢ (fusable, single pass)."""
        return self.phase.sums_coefficients

    @property
    def is_elementwise(self) -> bool:
        """True when the method combines τᵢ entry by entry, chunk by chunk."""
        return self.phase.combines_chunks

    @property
    def is_interpolation(self) -> bool:
        """True when the method gathers whole-tensor statistics first, then writes W' chunk by chunk."""
        return self.phase.statistics_pass

    @property
    def is_factored(self) -> bool:
        """True when the method returns factors of the merged delta from the adapters' factors."""
        return self.phase.factors_from_inputs

    @property
    def sparsification(self) -> str | None:
        """The name of how an elementwise method thins each τᵢ ("magnitude", "dare", …), else None (for display:
        the engine asks the phase's sparsifier itself)."""
        sparsifier = self.phase.sparsifier
        return None if sparsifier is None else sparsifier.name

    def coefficients(self, weights: Sequence[float], params: Mapping[str, Any]) -> list[float] | None:
        """The cᵢ of a linear method, None for the other phases."""
        return self.phase.linear_coefficients(weights, params)

    def param(self, name: str) -> Param:
        """Return the parameter called `name`."""
        return next(p for p in self.params if p.name == name)

    def resolve_params(
        self,
        global_params: Mapping[str, Any],
        adapter_params: Sequence[Mapping[str, Any]],
        weights: Sequence[Any],
        where: Sequence[str] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Check every parameter and fill defaults; per adapter wins over global. Raise with a 'did you mean'.

        A value may be a per-layer gradient or a filter list (`gradients`): each of its scalars is checked; the
        method's whole-list checks (`validate`) then run per tensor, when the engine resolves them. `where` names
        each input entry in messages (default `adapters[i]`).
        """
        from .gradients import any_setting, check_setting

        known = {p.name: p for p in self.params}
        resolved = {p.name: p.default for p in self.params}
        for key, value in global_params.items():
            if key not in known:
                raise MergeConfigError(
                    f"parameters: method '{self.name}' takes no parameter '{key}'"
                    + did_you_mean(key, known)
                )
            resolved[key] = (check_setting(value, lambda v, p=known[key]: p.check(v, "parameters"), f"parameters.{key}")
                             if value is not None else None)
        per_adapter: list[dict[str, Any]] = []
        where_of = list(where) if where is not None else [f"adapters[{i}]" for i in range(len(adapter_params))]
        for index, overrides in enumerate(adapter_params):
            own = {p.name: resolved[p.name] for p in self.params if p.per_adapter}
            for key, value in overrides.items():
                where = where_of[index]
                if key not in known:
                    raise MergeConfigError(
                        f"{where}: unknown key '{key}' for method '{self.name}'"
                        + did_you_mean(key, [*known, "path", "weight", "name"])
                    )
                if not known[key].per_adapter:
                    raise MergeConfigError(
                        f"{where}: '{key}' is a global parameter of '{self.name}'; set it under 'parameters:'"
                    )
                own[key] = check_setting(value, lambda v, p=known[key], w=where: p.check(v, w), f"{where}.{key}")
            per_adapter.append(own)
        for p in self.params:
            if p.required and (resolved[p.name] is None if not p.per_adapter else any(o[p.name] is None for o in per_adapter)):
                where = "parameters (or every adapter entry)" if p.per_adapter else "parameters"
                raise MergeConfigError(f"method '{self.name}' needs '{p.name}': set it under {where}; {p.help}")
        if self.validate is not None and not any_setting(weights, resolved, per_adapter):
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
