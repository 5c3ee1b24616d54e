"""mergekit's YAML → a mergekit_lite config that keeps mergekit's result (docs/SEMANTICS.md §3b).

Where our semantics differ from mergekit 0.1.x and one of our parameters can express mergekit's choice, the
conversion sets it (dare_ties' `normalize: false`, a linear merge whose base counts in Σw, task arithmetic with
`normalize: true`, density 1 where mergekit defaults to it). What no parameter can express is returned as one
line per difference. Features we do not have are refused naming the key: never a silently different merge.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergeConfigError
from ..formats.safetensors import DTYPES
from ..methods.gradients import is_setting
from ..suggest import did_you_mean
from . import slices

logger = logging.getLogger(__name__)

#: mergekit's top-level keys we read; the others are refused by name
KNOWN_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
              "tokenizer_source")
#: mergekit keys for features mergekit_lite does not have, and what each is
UNSUPPORTED_KEYS = {
    "modules": "per-module merges (modules)",
    "tokenizer": "tokenizer merging (tokenizer: union / token settings)",
    "chat_template": "chat template selection",
}
#: mergekit methods and ours of the same definition
METHODS = {"linear": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties",
           "dare_linear": "dare_linear", "slerp": "slerp", "breadcrumbs": "breadcrumbs",
           "breadcrumbs_ties": "breadcrumbs_ties", "della": "della", "della_linear": "della_linear",
           "model_stock": "model_stock"}
#: mergekit's spherical methods, ours of the same name (#29); a base_model is optional for them in mergekit
SPHERICAL = ("nuslerp", "multislerp", "karcher")
METHODS.update({name: name for name in (*SPHERICAL, "sce", "nearswap", "ram", "ramplus_tl")})
#: mergekit methods we do not run, and why (one line each)
NOT_RUN = {
    "core_space": "mergekit's core_space (from its core-space branch; not in mergekit 0.1.5) cuts each full task "
                  "vector to its top min(16, min(m, n)/4) singular directions by SVD and averages them with equal "
                  "weights times parameters.weight; mergekit_lite's `space: core` runs ties, dare_ties, dare_linear or "
                  "magnitude_prune on the core of the exact LoRA factors with per-input weights: other definitions "
                  "(for a plain average of task vectors use task_arithmetic)",
    "arcee_fusion": "Arcee Fusion (a KL-weighted importance mask with a sampled quantile threshold) is not "
                    "implemented in mergekit_lite",
}
#: mergekit parameters that change no value (only how mergekit stores its masks)
IGNORED_PARAMETERS = ("int8_mask",)
#: mergekit's own defaults where ours differ, per method
_SPARSE = ("ties", "dare_ties", "dare_linear")


@dataclass
class Conversion:
    """Our config (a mapping as a config file holds it) and one line per difference we cannot express."""

    config: dict[str, Any]
    differences: list[str] = field(default_factory=list)


def is_mergekit_config(data: Any) -> bool:
    """True when a YAML mapping is in mergekit's schema (it has `merge_method`; ours has `method`)."""
    return isinstance(data, Mapping) and "merge_method" in data and "method" not in data


def _model_path(reference: Any, where: str) -> tuple[str, str | None]:
    """(model, lora) of a mergekit model reference: `org/model`, `org/model+org/lora`, or {model: ..., lora: ...}."""
    if isinstance(reference, Mapping):
        def path_of(value: Any) -> str | None:
            if value is None:
                return None
            if isinstance(value, Mapping):
                return str(value.get("path")) if value.get("path") else None
            return str(value)
        model = path_of(reference.get("model"))
        if model is None:
            raise MergeConfigError(f"{where}: a model reference needs 'model' (a path or Hub id)")
        return model, path_of(reference.get("lora"))
    if not isinstance(reference, str) or not reference:
        raise MergeConfigError(f"{where}: expected a model path or Hub id, got {reference!r}")
    model, _, lora = reference.partition("+")
    return model, lora or None


def convert(data: Mapping[str, Any], output: str = "merged", base_dir: Path | None = None,
            stand_ins: Mapping[str, Path] | None = None) -> Conversion:
    """Translate a mergekit config mapping into ours (output folder `output`); refuse what we cannot run.

    `base_dir` is the config file's folder: `slices:` are checked against the base's layer count found there."""
    if "slices" in data:
        data = slices.as_models(data, base_dir, stand_ins)
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise MergeConfigError(f"mergekit key '{key}': {UNSUPPORTED_KEYS[key]} is not supported by mergekit_lite")
        if key not in KNOWN_KEYS:
            raise MergeConfigError(f"mergekit key '{key}' is not understood" + did_you_mean(str(key), KNOWN_KEYS))
    method = str(data["merge_method"])
    if method == "passthrough":
        raise MergeConfigError("mergekit key 'merge_method': passthrough (layer stacking) is not supported by "
                               "mergekit_lite")
    if method in NOT_RUN and method not in METHODS:
        raise MergeConfigError(f"mergekit key 'merge_method': method '{method}' has no mergekit_lite equivalent: "
                               f"{NOT_RUN[method]}")
    if method not in METHODS:
        raise MergeConfigError(f"mergekit key 'merge_method': method '{method}' has no mergekit_lite equivalent "
                               f"(supported: {', '.join(METHODS)})")
    tokenizer = data.get("tokenizer_source")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergeConfigError("mergekit key 'models': must be a non-empty list of {model: ..., parameters: ...}")
    base_ref = data.get("base_model")
    base, base_lora = _model_path(base_ref, "mergekit key 'base_model'") if base_ref is not None else (None, None)
    if base_lora is not None:
        raise MergeConfigError("mergekit key 'base_model': a base with a LoRA (model+lora) is not supported; merge "
                               "the LoRA into the base first")
    entries = []
    for index, item in enumerate(models):
        where = f"mergekit key 'models[{index}]'"
        if not isinstance(item, Mapping) or "model" not in item:
            raise MergeConfigError(f"{where}: expected {{model: ..., parameters: ...}}")
        unknown = [k for k in item if k not in ("model", "parameters")]
        if unknown:
            raise MergeConfigError(f"{where}: unknown key '{unknown[0]}'")
        model, lora = _model_path(item["model"], where)
        params = slices.mapping(item.get("parameters"), f"models[{index}].parameters")
        entries.append((model, lora, params, where))
    differences: list[str] = []
    had_base = base is not None
    if base is None:
        if method != "linear" and method not in SPHERICAL:
            raise MergeConfigError(f"mergekit key 'base_model': method '{method}' needs a base model")
        base = entries[0][0]
        if entries[0][1] is not None:
            raise MergeConfigError(f"mergekit key 'models[0]': {method} without base_model uses the first model as "
                                   "the base, which cannot carry a LoRA")
    if tokenizer not in (None, "base") and tokenizer != base:
        raise MergeConfigError(f"mergekit key 'tokenizer_source': '{tokenizer}' is not supported; mergekit_lite "
                               "keeps the base's tokenizer (tokenizer_source: base)")
    global_params = slices.mapping(data.get("parameters"), "parameters")
    for name in IGNORED_PARAMETERS:
        global_params.pop(name, None)
    converter = _Converter(method, base, global_params, differences)
    converter.had_base = had_base
    for model, lora, params, where in entries:
        for name in IGNORED_PARAMETERS:
            params.pop(name, None)
        converter.add(model, lora, params, where)
    config = converter.finish()
    dtype = data.get("out_dtype") or data.get("dtype")
    if data.get("dtype") in ("bfloat16", "float16"):
        differences.append(f"mergekit computes in {data['dtype']} (dtype: {data['dtype']}); mergekit_lite computes in "
                           "float32 and rounds once to the output dtype (results differ by up to one step of it)")
    output: dict[str, Any] = {"path": output}
    if dtype is not None:
        names = [d.config_name for d in DTYPES.values() if d.config_name]
        if dtype not in names:
            raise MergeConfigError(f"mergekit key 'out_dtype'/'dtype': '{dtype}' is not an output dtype of mergekit_lite "
                                   f"({', '.join(names)})")
        output["dtype"] = dtype
    config["output"] = output
    return Conversion(config, differences)


class _Converter:
    """Collects the inputs of one mergekit merge and the parameters that keep mergekit's result."""

    def __init__(self, method: str, base: str, global_params: dict[str, Any], differences: list[str]) -> None:
        self.method = method
        self.base = base
        self.params = global_params
        self.differences = differences
        self.adapters: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.base_weight: Any = None
        #: whether the mergekit config named a base_model (else its first model is our base)
        self.had_base = True

    def add(self, model: str, lora: str | None, params: dict[str, Any], where: str) -> None:
        """One mergekit input: the base itself (it has no task vector), a base+LoRA (an adapter) or a full model."""
        if model == self.base and lora is None:
            self.base_weight = params.get("weight", self.params.get("weight"))
            return
        if lora is not None and model != self.base:
            raise MergeConfigError(f"{where}: '{model}+{lora}' puts a LoRA on a model other than the base "
                                   f"('{self.base}'); mergekit_lite merges LoRAs of the base only")
        entry: dict[str, Any] = {"path": lora if lora is not None else model}
        entry.update(params)
        (self.adapters if lora is not None else self.models).append(entry)

    def finish(self) -> dict[str, Any]:
        """Our config mapping (without output)."""
        inputs = [*self.adapters, *self.models]
        if not inputs:
            raise MergeConfigError("mergekit key 'models': every model is the base; there is nothing to merge")
        params = dict(self.params)
        shared_weight = params.pop("weight", None)
        for entry in inputs:
            if "weight" not in entry and shared_weight is not None:
                entry["weight"] = shared_weight
        self._name_alike_folders(inputs)
        method = METHODS[self.method]
        getattr(self, f"_{self.method}")(params, inputs)
        config: dict[str, Any] = {"base_model": self.base, "method": method}
        if params:
            config["parameters"] = params
        if self.adapters:
            config["adapters"] = self.adapters
        if self.models:
            config["models"] = self.models
        return config

    def _name_alike_folders(self, inputs: list[dict[str, Any]]) -> None:
        """Inputs are told apart by their folder's name (config.AdapterSpec.label) and mergekit YAML has no
        `name:` to set: two paths ending in one folder name (runs/a/model, runs/b/model; two orgs' same repo)
        get `name: <parent>-<folder>`, or `<folder>-<position>` when the parents do not tell them apart."""
        labels = [Path(str(entry["path"]).rstrip("/")).name or str(entry["path"]) for entry in inputs]
        for label in {label for label in labels if labels.count(label) > 1}:
            alike = [i for i, other in enumerate(labels) if other == label]
            parents = [Path(str(inputs[i]["path"]).rstrip("/")).parent.name for i in alike]
            names = [f"{parent}-{label}" for parent in parents]
            if "" in parents or len(set(names)) < len(names) or set(names) & set(labels):
                names = [f"{label}-{n}" for n in range(1, len(alike) + 1)]
            for i, name in zip(alike, names):
                inputs[i]["name"] = name
            self.differences.append(f"{len(alike)} inputs end in the folder name '{label}': named "
                                    f"{', '.join(repr(n) for n in names)} (mergekit_lite tells inputs apart by name)")

    # -- per method: mergekit's result in our parameters -------------------------------------------------
    def _linear(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit averages the models themselves: Σ wᵢWᵢ / Σ wᵢ, the base counting when listed."""
        for entry in inputs:
            if "weight" not in entry:
                raise MergeConfigError(f"mergekit linear: model '{entry['path']}' has no weight (mergekit needs one)")
        normalize = params.pop("normalize", True)
        weights = [entry["weight"] for entry in inputs]
        base_weight = self.base_weight if self.base_weight is not None else 0.0
        scalar = not any(is_setting(w) for w in [*weights, base_weight])
        total = sum(weights) + base_weight if scalar else None
        if normalize and self.base_weight is None:
            params["normalize"] = True  # Σ wᵢ(W + τᵢ) / Σ wᵢ = W + Σ wᵢτᵢ / Σ wᵢ: ours exactly
            return
        if not scalar:
            raise MergeConfigError("mergekit linear: per-layer weights together with the base's own weight (or with "
                                   "normalize: false) have no mergekit_lite equivalent")
        if normalize:
            for entry in inputs:
                entry["weight"] = entry["weight"] / total
            params["normalize"] = False
            return
        if abs(total - 1.0) > 1e-12:
            raise MergeConfigError(f"mergekit linear with normalize: false and weights summing to {total:g} scales the "
                                   "base weights themselves; mergekit_lite adds task vectors to the base and cannot "
                                   "express it")
        params["normalize"] = False

    def _task_arithmetic(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._require_weights(inputs)
        if params.pop("normalize", False):
            weights = [entry["weight"] for entry in inputs]
            if any(is_setting(w) for w in weights) or is_setting(params.get("lambda", 1.0)):
                raise MergeConfigError("mergekit task_arithmetic with normalize: true and per-layer weights has no "
                                       "mergekit_lite equivalent")
            params["lambda"] = params.get("lambda", 1.0) / (sum(weights) or 1.0)
        self._drop(params, "rescale", "density")  # mergekit's task arithmetic reads neither
        for entry in inputs:
            self._drop(entry, "rescale", "density")

    def _ties(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        if params.pop("rescale", False):
            self.differences.append("ties with rescale: true: mergekit matches each trimmed task vector's L1 norm to "
                                    "the original's; mergekit_lite's TIES keeps the trimmed values as they are")
        self._sparse(params, inputs, normalize_default=True)

    def _dare_ties(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._sparse(params, inputs, normalize_default=False)
        self._dare_notes(params)

    def _dare_linear(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._require_weights(inputs)
        normalize = params.pop("normalize", False)
        if normalize:
            raise MergeConfigError("mergekit dare_linear with normalize: true has no mergekit_lite equivalent; use "
                                   "dare_ties or drop normalize")
        if "density" not in params and any("density" not in e for e in inputs):
            params["density"] = 1.0  # mergekit's default: keep everything
        self._dare_notes(params)

    def _slerp(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        if len(inputs) != 1:
            raise MergeConfigError("mergekit slerp: needs the base model and exactly one other model")
        inputs[0].pop("weight", None)  # mergekit's slerp has no weights
        if "t" not in params:
            raise MergeConfigError("mergekit slerp: parameters need 't'")

    # Breadcrumbs, DELLA, Model Stock (issue #25): mergekit 0.1.5's defaults, and what differs (SEMANTICS §3b)
    def _breadcrumbs(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._require_weights(inputs)
        self._norm_rescale_note(params, "Breadcrumbs")
        self._linear_sum(params, inputs)

    def _breadcrumbs_ties(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._norm_rescale_note(params, "Breadcrumbs")
        self._sparse(params, inputs, normalize_default=False)

    def _della(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._sparse(params, inputs, normalize_default=True)
        self._della_notes(params)

    def _della_linear(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        self._require_weights(inputs)
        self._linear_sum(params, inputs)
        self._della_notes(params)

    def _linear_sum(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit's sparse methods without a sign election: density 1 by default; normalize: true divides by Σ wᵢ,
        which is our λ / Σ wᵢ."""
        if "density" not in params and any("density" not in e for e in inputs):
            params["density"] = 1.0  # mergekit's default: keep everything
        if params.pop("normalize", False):
            weights = [entry["weight"] for entry in inputs]
            if any(is_setting(w) for w in weights) or is_setting(params.get("lambda", 1.0)):
                raise MergeConfigError(f"mergekit {self.method} with normalize: true and per-layer weights has no "
                                       "mergekit_lite equivalent")
            params["lambda"] = params.get("lambda", 1.0) / (sum(weights) or 1.0)

    def _model_stock(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        if params.pop("filter_wise", False):
            raise MergeConfigError("mergekit model_stock with filter_wise: true (a ratio per row) has no mergekit_lite "
                                   "equivalent; mergekit_lite computes one ratio per tensor")
        for entry in inputs:
            entry.pop("weight", None)  # mergekit's model_stock has no weights
        self.differences.append("Model Stock: mergekit counts an input without the tensor as a zero task vector (in "
                                "the average and the cosines) and lets t go negative; mergekit_lite leaves it out and "
                                "clamps the mean cosine to [0, 1]")

    def _norm_rescale_note(self, params: dict[str, Any], name: str) -> None:
        if params.pop("rescale", False):
            self.differences.append(f"{name} with rescale: true: mergekit matches each cut task vector's L1 norm to "
                                    "the original's; mergekit_lite keeps the kept values as they are")

    def _della_notes(self, params: dict[str, Any]) -> None:
        if params.get("rescale", True):
            self.differences.append("DELLA rescale: mergekit matches each pruned task vector's L1 norm to the "
                                    "original's, mergekit_lite divides each kept entry by its keep probability (the "
                                    "paper's rule)")
        self.differences.append("DELLA draws: mergekit uses torch's global RNG and breaks magnitude ties at random, "
                                "mergekit_lite a counter-based stream of (seed, input, tensor, index) and lower index "
                                "first; same law, other samples")

    # nuslerp, multislerp, karcher (#29): mergekit's definitions, ours of the same name (SEMANTICS §3b)
    def _nuslerp(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: two non-base models, t = w₂/(w₁+w₂); without a base_model the first model is an endpoint."""
        self._spherical_points(params, inputs, need=(2, 2))

    def _multislerp(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: one or more non-base models (two or more without a base_model), barycentric weights."""
        self._spherical_points(params, inputs, need=(1, None))

    def _karcher(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: the mean of every model of the tensor group, the base included, with equal weights; weights
        given are not read by mergekit and are dropped."""
        params.pop("weight", None)
        for entry in inputs:
            entry.pop("weight", None)

    def _sce(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: the non-base models' task vectors, no weights (the given ones are not read and are dropped)."""
        self._karcher(params, inputs)

    def _nearswap(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: the base and exactly one other model, no weights."""
        if len(inputs) != 1:
            raise MergeConfigError(f"mergekit nearswap: needs the base model and exactly one other model, got "
                                   f"{len(inputs)} others")
        self._karcher(params, inputs)

    def _ram(self, params: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
        """mergekit: the non-base models' task vectors, no weights."""
        self._karcher(params, inputs)

    _ramplus_tl = _ram

    def _spherical_points(self, params: dict[str, Any], inputs: list[dict[str, Any]],
                          need: tuple[int, int | None]) -> None:
        self._require_weights(inputs)
        if self.had_base:
            count, base_note = len(inputs), "besides the base_model"
        else:
            if self.base_weight is None:
                raise MergeConfigError(f"mergekit {self.method}: model '{self.base}' has no weight (mergekit needs one)")
            params["base_weight"] = self.base_weight
            count, base_note = len(inputs) + 1, "(no base_model)"
        low, high = need
        if count < low or (high is not None and count > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise MergeConfigError(f"mergekit {self.method}: needs {wanted} models {base_note}, got {count}")

    # -- helpers ----------------------------------------------------------------------------------------
    def _require_weights(self, inputs: list[dict[str, Any]]) -> None:
        for entry in inputs:
            if "weight" not in entry:
                raise MergeConfigError(f"mergekit {self.method}: model '{entry['path']}' has no weight (mergekit needs "
                                       "one)")

    def _sparse(self, params: dict[str, Any], inputs: list[dict[str, Any]], normalize_default: bool) -> None:
        self._require_weights(inputs)
        params["normalize"] = params.get("normalize", normalize_default)
        if "density" not in params and any("density" not in e for e in inputs):
            params["density"] = 1.0  # mergekit's default: keep everything
        if params["normalize"] and any(not is_setting(e["weight"]) and e["weight"] < 0 for e in inputs):
            self.differences.append("TIES divisor: mergekit divides by Σ Mᵢwᵢ (signed), mergekit_lite by Σ Mᵢ|wᵢ|; "
                                    "with negative weights the results differ where a negative-weight input agrees")

    def _dare_notes(self, params: dict[str, Any]) -> None:
        rescale = params.get("rescale", True)
        if rescale:
            self.differences.append("DARE rescale: mergekit matches each pruned task vector's L1 norm to the "
                                    "original's, mergekit_lite divides kept entries by the density (equal in "
                                    "expectation)")
        self.differences.append("DARE keep-masks: mergekit draws them from torch's global RNG, mergekit_lite from a "
                                "counter-based stream of (seed, input, tensor, index); same law, other samples")

    @staticmethod
    def _drop(params: dict[str, Any], *names: str) -> None:
        for name in names:
            params.pop(name, None)


def from_mergekit(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A mergekit config file's mapping as ours, for `merge run` (output: `<stem>-merged` beside the file); each
    difference we cannot express is logged as a warning, one line each."""
    conversion = convert(data, output=f"{path.stem}-merged", base_dir=path.resolve().parent)
    for line in conversion.differences:
        logger.warning("mergekit difference: %s", line)
    return conversion.config
