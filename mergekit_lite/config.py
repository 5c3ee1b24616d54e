"""YAML → a typed, strict merge config. Unknown keys are errors with a 'did you mean'."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import MergeConfigError
from .methods import MergeMethod, get_method
from .methods.registry import finite_scale
from .suggest import did_you_mean
from .units import parse_size

OutputDtype = Literal["float32", "float16", "bfloat16"]
DEFAULT_SHARD_SIZE = 5 * 10**9
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 100_000

_TOP_KEYS = ("base_model", "method", "parameters", "adapters", "models", "output", "seed", "eval")
#: set by from_dict around its construction: the fields come from `_checked_fields` already (not checked twice)
_FIELDS_CHECKED: ContextVar[bool] = ContextVar("fields_checked", default=False)
_OUTPUT_KEYS = ("path", "format", "rank", "dtype", "shard_size", "push_to_hub", "private")
_EVAL_KEYS = ("tasks", "limit", "batch_size", "num_fewshot", "seed", "apply_chat_template", "gen_kwargs", "log_samples")
_ADAPTER_KEYS = ("path", "weight", "name")


class AdapterSpec(BaseModel):
    """One input entry (a PEFT adapter, or under `models:` a full fine-tuned checkpoint): where it is, its signed
    weight (a number, or a per-layer gradient / filter list), and per-input method parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    weight: float | list[Any] = 1.0
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    _path_names_something = field_validator("path")(lambda value: _a_path(value))

    @field_validator("weight", mode="before")
    @classmethod
    def _check_weight(cls, value: Any) -> Any:
        """A number, or a gradient / filter list of numbers (SEMANTICS §3d)."""
        from .methods.gradients import check_setting

        def number(item: Any) -> float:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise MergeConfigError(f"must be a number, got {item!r}")
            return finite_scale(item, "")
        try:
            return check_setting(value, number, "weight")
        except MergeConfigError as error:
            raise ValueError(str(error)) from None

    @property
    def label(self) -> str:
        """A short name for messages and the model card."""
        return self.name or Path(self.path.rstrip("/")).name or self.path


class OutputSpec(BaseModel):
    """Where and how the merged checkpoint is written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    #: checkpoint: a full Hugging Face checkpoint; peft: one merged LoRA adapter (SEMANTICS §6)
    format: Literal["checkpoint", "peft"] = "checkpoint"
    #: peft only: compress every merged delta to this rank (Eckart–Young, or a randomized SVD for full-rank ones)
    rank: int | None = Field(default=None, ge=1)
    dtype: OutputDtype | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    push_to_hub: str | None = None
    private: bool = False

    _rank_is_a_number = field_validator("rank", mode="before")(lambda value: _a_number(value))
    _path_names_something = field_validator("path")(lambda value: _a_path(value))

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_shard_size(cls, value: Any) -> int:
        try:
            return parse_size(value)
        except OverflowError:  # .inf, or '1e400GB'
            raise ValueError(f"not a finite size: got {value!r}") from None

    @model_validator(mode="after")
    def _rank_needs_an_adapter(self) -> OutputSpec:
        if self.rank is not None and self.format != "peft":
            raise ValueError("'rank' compresses an adapter output: set format: peft, or drop rank")
        return self


class EvalSpec(BaseModel):
    """Evaluate after merging (`merge run`, `merge sweep`): which lm-eval tasks, and lm-eval's own options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: list[str] | None = None
    #: a count (≥ 1) or a fraction of each task (0 < limit < 1), as lm-eval takes
    limit: int | float | None = None
    batch_size: int | str = 8  # or "auto" / "auto:N"
    num_fewshot: int | None = Field(default=None, ge=0)
    seed: int | None = None
    apply_chat_template: bool = False
    gen_kwargs: str | None = None  # "temperature=0,max_gen_toks=64", for generate_until tasks
    log_samples: bool = False

    _counts_are_numbers = field_validator("limit", "num_fewshot", "seed", mode="before")(lambda value: _a_number(value))
    _batch_size_is_no_flag = field_validator("batch_size", mode="before")(lambda value: _a_number(value, text=True))

    @field_validator("tasks")
    @classmethod
    def _tasks_not_empty(cls, value: list[str] | None) -> list[str] | None:
        """`tasks: []` would run the whole suite: the user meant some tasks, or no `tasks:` key."""
        if value is not None and not value:
            raise ValueError("an empty list would run the whole suite: list the tasks, or drop 'tasks' for the suite")
        return value

    @field_validator("limit")
    @classmethod
    def _limit_is_count_or_fraction(cls, value: int | float | None) -> int | float | None:
        from .evaluation.options import parse_limit

        return None if value is None else parse_limit(value)

    @field_validator("batch_size")
    @classmethod
    def _batch_size_is_count_or_auto(cls, value: int | str) -> int | str:
        from .evaluation.options import parse_batch_size

        return parse_batch_size(value)


class MergeConfig(BaseModel):
    """A whole merge: base, method and its parameters, adapters, output, seed.

    Built directly (`MergeConfig(base_model=..., method=..., adapters=[...], output=...)`) or from a mapping
    (`from_dict`, `load_config`), it is checked the same way: unknown keys, an unknown method and parameters the
    method does not take are MergeConfigErrors with a 'did you mean', and defaults are filled in. Adapter entries
    built directly carry method parameters under `parameters` (`{"path": ..., "parameters": {"density": 0.5}}`);
    relative paths resolve against the current folder (from_dict: its `base_dir`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    adapters: list[AdapterSpec] = Field(default_factory=list)
    #: full fine-tuned checkpoints of the base's architecture: τᵢ = Wᵢ − W for every tensor (SEMANTICS §1)
    models: list[AdapterSpec] = Field(default_factory=list)
    output: OutputSpec
    seed: int = Field(default=0, strict=True)
    eval: EvalSpec | None = None

    _config_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _config_file: Path | None = PrivateAttr(default=None)
    _seed_is_a_number = field_validator("seed", mode="before")(lambda value: _a_number(value))
    _base_names_something = field_validator("base_model")(lambda value: _a_path(value))
    _resolved: tuple[dict[str, Any], list[dict[str, Any]]] = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        """Check and type the fields; every problem is a MergeConfigError (one line per pydantic problem)."""
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise MergeConfigError(_describe(error)) from None

    @model_validator(mode="before")
    @classmethod
    def _as_in_a_config_file(cls, data: Any) -> Any:
        """Check a mapping of fields as from_dict checks a config file, with the same messages, and take its shapes.

        Unknown keys are refused with a 'did you mean' (never dropped); `output` may be a path; an adapter may be
        a path, and its method parameters may sit beside `path` as in YAML (`{"path": ..., "density": 0.5}`) or
        under `parameters`. Model instances (OutputSpec, AdapterSpec, EvalSpec) are taken as they are.
        """
        if _FIELDS_CHECKED.get():  # from_dict's fields, checked already (once: not a nested construction's)
            _FIELDS_CHECKED.set(False)
            return data
        if not isinstance(data, Mapping):
            return data
        return _checked_fields(data, _adapter_entry)

    @model_validator(mode="after")
    def _resolve_method(self) -> MergeConfig:
        """The method must exist; its parameters are checked and defaults filled (global and per adapter)."""
        if not self.adapters and not self.models:
            raise MergeConfigError("config: nothing to merge; list adapters under 'adapters:' or full models under "
                                   "'models:'")
        method = get_method(self.method)
        if method.input_count is not None and not method.input_count[0] <= len(self.inputs) <= method.input_count[1]:
            low, high = method.input_count
            raise MergeConfigError(f"method '{self.method}' merges {low} to {high} inputs (adapters and models), "
                                   f"got {len(self.inputs)}")
        if not method.phase.peft_output and self.output.format == "peft":
            raise MergeConfigError(f"method '{self.method}' writes full checkpoints only; drop output.format: peft")
        self._check_distinct_labels()
        self._resolved = method.resolve_params(
            self.parameters, [a.parameters for a in self.inputs], [a.weight for a in self.inputs], self.input_where
        )
        return self

    def _check_distinct_labels(self) -> None:
        """Every input needs its own label: reference rows, the card and a sweep's `weights: {label: ...}` key on
        it, so two inputs named alike would be mixed up (the same folder twice, two folders of one name)."""
        first: dict[str, str] = {}
        for where, spec in zip(self.input_where, self.inputs):
            if spec.label not in first:
                first[spec.label] = where
                continue
            source = f"name '{spec.label}'" if spec.name else f"label '{spec.label}' (its folder's name)"
            raise MergeConfigError(
                f"{where}: {source} is also {first[spec.label]}'s; inputs are told apart by label "
                f"(scores, the card, sweep weights), so give each a distinct 'name:' (or list the folder once)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> MergeConfig:
        """Check and type a config mapping; relative paths will resolve against `base_dir` (default: cwd)."""
        if not isinstance(data, Mapping):
            raise MergeConfigError("the config must be a mapping of keys (base_model, method, adapters, output, ...)")
        # A file's adapter entries keep every key but path/weight/name as a method parameter (`parameters` too);
        # the model then checks the fields, the method and its parameters like any direct construction, without
        # running the config-file checks a second time on what they returned (_FIELDS_CHECKED).
        fields = _checked_fields(data, _split_adapter)
        token = _FIELDS_CHECKED.set(True)
        try:
            config = cls(**fields)
        finally:
            _FIELDS_CHECKED.reset(token)
        config._config_dir = resolved_path(Path(base_dir)) if base_dir is not None else Path.cwd()
        return config

    @property
    def merge_method(self) -> MergeMethod:
        """The registry row of `method`, as its parameters run it (`space: core` picks the core-space variant)."""
        return get_method(self.method).resolved(self.global_params)

    @property
    def config_file(self) -> Path | None:
        """The YAML file this config was read from (None when built in Python)."""
        return self._config_file

    def _apart_from_file(self, file: Path | None) -> MergeConfig:
        """Remember the config file, and refuse an output folder that is or holds it: a merge replaces its output
        whole (`output: .` with --overwrite would delete the config and everything beside it)."""
        self._config_file = file
        if file is not None:
            out = resolved_path(self.output_path)
            if file == out or file.is_relative_to(out):
                raise MergeConfigError(f"output {out} holds the config file {file}; a merge replaces its output "
                                       "folder whole: pick a folder of its own, like out/merged")
        return self

    @property
    def config_dir(self) -> Path:
        """The folder relative paths resolve against (the config file's folder)."""
        return self._config_dir

    @property
    def global_params(self) -> dict[str, Any]:
        """Method parameters with defaults filled in."""
        return dict(self._resolved[0])

    @property
    def adapter_params(self) -> list[dict[str, Any]]:
        """Per-adapter parameters (global value unless the adapter overrides it)."""
        return [dict(p) for p in self._resolved[1]]

    @property
    def weights(self) -> list[Any]:
        """The signed input weights wᵢ in input order (a list where a weight is a per-layer gradient or filters)."""
        return [a.weight for a in self.inputs]

    @property
    def inputs(self) -> list[AdapterSpec]:
        """Every input in merge order: the adapters, then the full models (wᵢ, parameters and DARE keys follow it)."""
        return [*self.adapters, *self.models]

    @property
    def input_where(self) -> list[str]:
        """Each input's place in the config file, for messages (`adapters[0]`, `models[1]`)."""
        return [f"adapters[{i}]" for i in range(len(self.adapters))] + [f"models[{i}]" for i in range(len(self.models))]

    def is_full_model(self, index: int) -> bool:
        """True when input `index` (merge order) is a full checkpoint, not an adapter."""
        return index >= len(self.adapters)

    def resolve_path(self, path: str) -> Path:
        """Return `path` as an absolute local path, relative ones taken from the config's folder."""
        try:
            candidate = Path(path).expanduser()
        except RuntimeError:  # ~user of no such user
            raise MergeConfigError(f"path {path!r}: its '~' names no home folder here; write the full path") from None
        resolved = resolved_path(candidate if candidate.is_absolute() else self._config_dir / candidate)
        return candidate if candidate.is_absolute() else resolved

    @property
    def output_path(self) -> Path:
        """The absolute output folder."""
        return self.resolve_path(self.output.path)

    def with_output_path(self, path: str | Path) -> MergeConfig:
        """Return a copy writing to `path` (the CLI's --out)."""
        data = self.to_dict()
        data["output"]["path"] = str(resolved_path(Path(path)))
        return MergeConfig.from_dict(data, self._config_dir)._apart_from_file(self._config_file)

    def to_dict(self) -> dict[str, Any]:
        """The config as a user would write it, with defaults filled in (for the card and the output)."""
        def entry_of(spec: AdapterSpec) -> dict[str, Any]:
            entry: dict[str, Any] = {"path": spec.path, "weight": spec.weight}
            if spec.name:
                entry["name"] = spec.name
            entry.update(spec.parameters)
            return entry

        adapters = [entry_of(spec) for spec in self.adapters]
        output: dict[str, Any] = {"path": self.output.path, "shard_size": self.output.shard_size}
        if self.output.format != "checkpoint":
            output["format"] = self.output.format
        if self.output.rank is not None:
            output["rank"] = self.output.rank
        if self.output.dtype:
            output["dtype"] = self.output.dtype
        if self.output.push_to_hub:
            output["push_to_hub"] = self.output.push_to_hub
            output["private"] = self.output.private
        data = {
            "base_model": self.base_model,
            "method": self.method,
            "parameters": self.global_params,
            "adapters": adapters,
            **({"models": [entry_of(spec) for spec in self.models]} if self.models else {}),
            "output": output,
            "seed": self.seed,
        }
        if self.eval is not None:
            data["eval"] = self.eval.model_dump()
        return data

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def resolved_path(path: Path) -> Path:
    """`path.resolve()`, or one MergeConfigError line when a symlink on the way loops back (Python raises
    RuntimeError for that before 3.13, OSError after): every config path resolves through here."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:
        why = getattr(error, "strerror", None) or "a symlink loop"
        raise MergeConfigError(f"path {path}: cannot be resolved ({why}); give the real folder instead") from None


def _a_path(value: str) -> str:
    """A path must name something: an empty one would be the config's own folder."""
    if not value.strip():
        raise ValueError("must name a folder, got an empty string")
    return value


def _a_number(value: Any, text: bool = False) -> Any:
    """Refuse true/false (and, unless `text`, a quoted string) where a number belongs: pydantic would read
    `rank: true` as 1 and `rank: "4"` as 4, and the user meant something else."""
    if isinstance(value, bool) or (isinstance(value, str) and not text):
        kind = "true/false" if isinstance(value, bool) else "a string"
        raise ValueError(f"must be a number, not {kind}: got {value!r}")
    return value


def load_config(path: str | Path) -> MergeConfig:
    """Read a YAML merge config (ours, or mergekit's: run as mergekit would, SEMANTICS §3b); relative paths in it
    are relative to the file's folder."""
    data, path = read_config_data(path)
    try:
        from .compat.mergekit import from_mergekit, is_mergekit_config

        if is_mergekit_config(data):  # mergekit's schema: converted, each difference logged as one line
            data = from_mergekit(data, path)
        file = resolved_path(path)
        return MergeConfig.from_dict(data, file.parent)._apart_from_file(file)
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None


def read_config_data(path: str | Path) -> tuple[Any, Path]:
    """A config file's YAML data, checked for size, encoding, syntax and alias bombs, and its path."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MergeConfigError(f"{path}: {path.stat().st_size} bytes is too large for a merge config "
                                   f"(limit {MAX_CONFIG_BYTES // 1024} KiB); is this the right file?")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MergeConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise MergeConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        if getattr(error, "context", None) == "expected a single document in the stream":  # a mergekit-mega file
            raise MergeConfigError(f"{path}: holds several YAML documents (a mergekit-mega file): `merge run` and "
                                   "`merge convert` read those; here give one merge config") from None
        raise MergeConfigError(f"{path}: not valid YAML: {yaml_problem(error)}") from None
    _check_expanded_size(data, path)
    return data, path


def yaml_problem(error: BaseException) -> str:
    """A YAML error as one line: the problem and where it is (PyYAML's own text spans several lines)."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _check_expanded_size(data: Any, path: Path) -> None:
    """Refuse YAML whose aliases expand to a huge structure ("billion laughs"): walking it would never end."""
    budget = MAX_CONFIG_NODES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise MergeConfigError(f"{path}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases?); "
                                   "a merge config is a few dozen keys")
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise MergeConfigError(f"{where}: unknown key '{key}'" + did_you_mean(str(key), allowed))


def _checked_fields(data: Mapping[str, Any], adapter_entry: Callable[[Any, int, str], Any]) -> dict[str, Any]:
    """The config-file checks, in one order and with one set of messages for from_dict and direct construction:
    keys, required keys, the method's name, output, eval, adapters (each shaped by `adapter_entry`), parameters.

    Run again on fields it returned, it would return them unchanged; from_dict's result is not run again
    (`_FIELDS_CHECKED`).
    """
    _check_keys(data, _TOP_KEYS, "config")
    for key in ("base_model", "method", "output"):
        if key not in data:
            raise MergeConfigError(f"config: missing required key '{key}'")
    if "adapters" not in data and "models" not in data:
        raise MergeConfigError("config: missing required key 'adapters' (or 'models' for full fine-tuned checkpoints)")
    get_method(str(data["method"]))
    output = data["output"]
    if isinstance(output, str):
        output = {"path": output}
    if not isinstance(output, (Mapping, OutputSpec)):
        raise MergeConfigError("output: must be a mapping like {path: out/merged}")
    if isinstance(output, Mapping):
        _check_keys(output, _OUTPUT_KEYS, "output")
    if data.get("eval") is not None and not isinstance(data["eval"], EvalSpec):
        if not isinstance(data["eval"], Mapping):
            raise MergeConfigError("eval: must be a mapping like {tasks: [capitals], limit: 50}")
        _check_keys(data["eval"], _EVAL_KEYS, "eval")
    entries: dict[str, list[Any]] = {}
    for section in ("adapters", "models"):
        if section not in data:
            continue
        listed = data[section]
        if not isinstance(listed, list) or (not listed and not data.get("models" if section == "adapters" else "adapters")):
            raise MergeConfigError(f"{section}: must be a non-empty list of {{path: ..., weight: ...}}")
        entries[section] = [adapter_entry(entry, index, section) for index, entry in enumerate(listed)]
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise MergeConfigError("parameters: must be a mapping of method parameters")
    return {**data, "output": output, **entries, "parameters": dict(parameters)}


def _adapter_mapping(entry: Any, index: int, section: str = "adapters") -> Mapping[str, Any]:
    """An adapter (or model) entry as a mapping with a path (a bare string is its path), else the config-file error."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, Mapping):
        raise MergeConfigError(f"{section}[{index}]: must be a mapping like {{path: ..., weight: 1.0}}")
    if "path" not in entry:
        raise MergeConfigError(f"{section}[{index}]: missing required key 'path'")
    return entry


def _split_adapter(entry: Any, index: int, section: str = "adapters") -> dict[str, Any]:
    """A config file's adapter entry: its own keys, and every other key as a method parameter it overrides."""
    entry = _adapter_mapping(entry, index, section)
    own = {k: v for k, v in entry.items() if k in _ADAPTER_KEYS}
    overrides = {k: v for k, v in entry.items() if k not in _ADAPTER_KEYS}
    return {**own, "parameters": overrides}


def _adapter_entry(entry: Any, index: int, section: str = "adapters") -> Any:
    """An adapter given to the constructor: an AdapterSpec as it is, else as in a config file, except that
    method parameters may also come under `parameters` (how from_dict hands over the entries it split)."""
    if isinstance(entry, AdapterSpec):
        return entry
    entry = _adapter_mapping(entry, index, section)
    given = entry.get("parameters")
    if given is not None and not isinstance(given, Mapping):
        return entry  # pydantic names the problem: adapters[i].parameters must be a dictionary
    own = {k: v for k, v in entry.items() if k in _ADAPTER_KEYS}
    overrides = {k: v for k, v in entry.items() if k not in (*_ADAPTER_KEYS, "parameters")}
    return {**own, "parameters": {**(given or {}), **overrides}}


def _describe(error: ValidationError) -> str:
    """One line per pydantic problem, with the config location as a dotted path."""
    parts = []
    for item in error.errors():
        location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
        location = location.lstrip(".") or "config"
        message = item["msg"].removeprefix("Value error, ")
        given = repr(item.get("input"))
        parts.append(f"{location}: {message}" + ("" if "got " in message or given in message else f" (got {given})"))
    return "; ".join(parts)
