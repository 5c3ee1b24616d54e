"""mergekit `slices:` that are one plain merge over every layer, rewritten in mergekit's `models:` form.

mergekit's canonical SLERP example (`gradient-slerp.yml`) lists both models over the same full `layer_range` in
one slice; configs also split the layers into slices to give each its own parameters. Such a config is a merge
of whole models, not layer stacking, when every slice lists the same models over the same range and the slices
tile the layers 0..N of the base in order. mergekit then reads each parameter (plan.py, 0.1.5):

- inside slice k (layers a..b), at t = offset / (b − a − 1) (t = 1 for a one-layer slice): a source's own
  `parameters`, else the slice's `parameters`, else the config's; a gradient runs over the slice, not the model;
- for the tensors before the first layer (embeddings): slice 0's values at t = 0;
- for the tensors after the last layer (final norm, lm_head): the last slice's values at t = 0.

The rewrite gives each parameter one per-layer value list (per filter, the same filters in every slice) that
takes these values at every layer, and a filter naming each tensor after the layers whose value differs from the
first layer's. Anything else under `slices:` is layer stacking, refused naming the slice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import MergeConfigError
from ..methods.gradients import LAYER_INDEX, evaluate

_SLICE_KEYS = ("sources", "parameters", "base_model")
_SOURCE_KEYS = ("model", "layer_range", "parameters")
#: config.json keys holding a model's layer count, by architecture family
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: substrings of the tensors mergekit counts before the layers (its architectures' pre_weights)
_PRE_LAYER = ("embed", "wte", "wpe")
_RULE = ("a plain merge lists the same models over the same layers in every slice, the slices covering every "
         "layer of the base in order")


def stacking(where: str, reason: str) -> MergeConfigError:
    """The one-line refusal of a slice that is layer stacking."""
    return MergeConfigError(f"mergekit key '{where}': {reason}: that is layer stacking, which mergekit_lite does not "
                            f"support ({_RULE})")


def mapping(value: Any, where: str) -> dict[str, Any]:
    """A `parameters:` block as a dict (absent: empty), or a one-line error naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergeConfigError(f"mergekit key '{where}': must be a mapping of parameter names to values "
                               f"(like {{weight: 0.5}}), got {value!r}")
    return _checked(dict(value), where)


def _checked(params: dict[str, Any], where: str) -> dict[str, Any]:
    """`params` if every value is a scalar, a gradient (list of scalars) or a list of {filter, value}; a weight
    must be a number there. Anything else is one line naming the key (mergekit's own schema refuses it too)."""
    def scalar(value: Any, numeric: bool) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number if numeric else (number or isinstance(value, (bool, str)))

    for key, value in params.items():
        numeric = key == "weight"
        items = value if isinstance(value, list) else [value]
        good = bool(items) and (
            all(scalar(v, numeric) for v in items)
            or all(isinstance(v, Mapping) and "value" in v and set(v) <= {"filter", "value"}
                   and (scalar(v["value"], numeric) or (isinstance(v["value"], list) and v["value"]
                                                        and all(scalar(x, numeric) for x in v["value"])))
                   for v in items))
        if not good:
            kind = "a number" if numeric else "a number, true/false or a string"
            raise MergeConfigError(f"mergekit key '{where}.{key}': expected {kind}, a list of them (a gradient) or a "
                                   f"list of {{filter: ..., value: ...}}, got {value!r}")
    return params


def model_key(reference: Any) -> str:
    """A model reference as one comparable string (`org/model`, `org/model+lora`)."""
    if isinstance(reference, Mapping):
        def path(value: Any) -> str:
            return str(value.get("path")) if isinstance(value, Mapping) else str(value)
        lora = reference.get("lora")
        return path(reference.get("model")) + (f"+{path(lora)}" if lora else "")
    return str(reference)


def as_models(data: Mapping[str, Any], base_dir: Path | None,
              stand_ins: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """`data` with its `slices:` rewritten as `models:` and per-layer parameters; refuse layer stacking.

    `stand_ins` maps a model not written yet (an earlier output of a mega file) to a folder of the same layers and
    tensor names (that merge's base), read in its place."""
    stand_ins = stand_ins or {}
    slices = data["slices"]
    if str(data.get("merge_method")) == "passthrough":
        raise stacking("slices", "merge_method passthrough copies layers from the sources as they are")
    if not isinstance(slices, list) or not slices:
        raise MergeConfigError("mergekit key 'slices': must be a non-empty list of {sources: [...]}")
    if "models" in data:
        raise MergeConfigError("mergekit keys 'models' and 'slices': give one of them (mergekit takes exactly one)")
    spans, sources, params = _read_slices(slices, data.get("base_model"))
    base = data.get("base_model") if data.get("base_model") is not None else sources[0][0]["model"]
    _check_tiling(spans, base, base_dir, stand_ins)
    lengths = [stop - start for start, stop in spans]
    names = _LaterTensors(base, base_dir, stand_ins)
    global_params = mapping(data.get("parameters"), "parameters")
    merged_global: dict[str, Any] = {}
    for key in _keys([global_params, *params]):
        per_slice = [slice_params.get(key, global_params.get(key)) for slice_params in params]
        if None in per_slice:
            raise _unset(per_slice.index(None), key, "")
        merged_global[key] = _combine(per_slice, lengths, f"parameters.{key}", names)
    models = []
    for position, source in enumerate(sources[0]):
        own: dict[str, Any] = {}
        keys = _keys([source_list[position]["parameters"] for source_list in sources])
        for key in keys:
            per_slice = []
            for index, source_list in enumerate(sources):
                value = source_list[position]["parameters"].get(key, params[index].get(key, global_params.get(key)))
                if value is None:
                    raise _unset(index, key, f" model '{model_key(source['model'])}'")
                per_slice.append(value)
            own[key] = _combine(per_slice, lengths, f"slices[*].sources[{position}].parameters.{key}", names)
        entry: dict[str, Any] = {"model": source["model"]}
        if own:
            entry["parameters"] = own
        models.append(entry)
    converted = {key: value for key, value in data.items() if key != "slices"}
    converted["models"] = models
    if merged_global:
        converted["parameters"] = merged_global
    else:
        converted.pop("parameters", None)
    return converted


def _unset(index: int, key: str, whom: str) -> MergeConfigError:
    return MergeConfigError(f"mergekit key 'slices[{index}]': it gives{whom} no '{key}' (nor does the config's "
                            "parameters) while another slice does; mergekit would take the method's default in its "
                            "layers: give every slice a value")


def _keys(blocks: list[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for block in blocks:
        seen += [key for key in block if key not in seen]
    return seen


def _read_slices(slices: list[Any], base: Any) -> tuple[list[tuple[int, int]], list[list[dict[str, Any]]],
                                                          list[dict[str, Any]]]:
    """Each slice's (start, stop), its sources in slice 0's model order, and its own parameters."""
    spans: list[tuple[int, int]] = []
    all_sources: list[list[dict[str, Any]]] = []
    all_params: list[dict[str, Any]] = []
    order: list[str] | None = None
    for index, item in enumerate(slices):
        where = f"slices[{index}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise MergeConfigError(f"mergekit key '{where}': expected {{sources: [{{model: ..., layer_range: "
                                   "[start, stop]}}, ...]}}")
        for key in item:
            if key not in _SLICE_KEYS:
                what = "is not supported by mergekit_lite" if key == "residual_weight" else "is not understood"
                raise MergeConfigError(f"mergekit key '{where}.{key}' {what}")
        if item.get("base_model") is not None and model_key(item["base_model"]) != model_key(base):
            raise stacking(where, "it names its own base_model")
        sources: dict[str, dict[str, Any]] = {}
        ranges: list[tuple[int, int]] = []
        for number, source in enumerate(item["sources"]):
            there = f"{where}.sources[{number}]"
            if not isinstance(source, Mapping) or "model" not in source:
                raise MergeConfigError(f"mergekit key '{there}': expected {{model: ..., layer_range: [start, stop]}}")
            for key in source:
                if key not in _SOURCE_KEYS:
                    raise MergeConfigError(f"mergekit key '{there}.{key}' is not understood")
            ranges.append(_layer_range(source.get("layer_range"), there))
            key = model_key(source["model"])
            if key in sources:
                raise stacking(where, f"it lists model '{key}' twice")
            sources[key] = {"model": source["model"], "parameters": mapping(source.get("parameters"),
                                                                            f"{there}.parameters")}
        if len(set(ranges)) > 1:
            shown = " and ".join(f"[{a}, {b}]" for a, b in dict.fromkeys(ranges))
            raise stacking(where, f"its sources take different layer ranges ({shown})")
        if order is None:
            order = list(sources)
        else:
            missing = [key for key in order if key not in sources]
            extra = [key for key in sources if key not in order]
            if missing:
                raise stacking(where, f"model '{missing[0]}' of slices[0] is missing from it")
            if extra:
                raise stacking(where, f"it lists model '{extra[0]}', which slices[0] does not")
        spans.append(ranges[0])
        all_sources.append([sources[key] for key in order])
        all_params.append(mapping(item.get("parameters"), f"{where}.parameters"))
    return spans, all_sources, all_params


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise MergeConfigError(f"mergekit key '{where}.layer_range': expected [start, stop] with 0 <= start < stop, "
                               f"got {value!r}")
    return value[0], value[1]


def _check_tiling(spans: list[tuple[int, int]], base: Any, base_dir: Path | None,
                  stand_ins: Mapping[str, Path]) -> None:
    expected = 0
    for index, (start, stop) in enumerate(spans):
        if start < expected:
            raise stacking(f"slices[{index}]",
                           f"it repeats layers {start}..{min(stop, expected) - 1} of the slices before it")
        if start > expected:
            raise stacking(f"slices[{index}]", f"layers {expected}..{start - 1} before it are in no slice")
        expected = stop
    count = layer_count(base, base_dir, stand_ins)
    if count is None:
        raise MergeConfigError(f"mergekit key 'slices': cannot read the layer count of the base '{model_key(base)}' "
                               "(no config.json with num_hidden_layers in a local folder) to check that the slices "
                               "cover all its layers; download it and name the folder")
    if expected != count:
        raise stacking(f"slices[{len(spans) - 1}]", f"the slices end at layer {expected} but the base "
                       f"'{model_key(base)}' has {count} layers")


def _folder(reference: Any, base_dir: Path | None, stand_ins: Mapping[str, Path] | None = None) -> Path:
    name = model_key(reference).partition("+")[0]
    if stand_ins and name in stand_ins:
        return stand_ins[name]
    path = Path(name).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def layer_count(reference: Any, base_dir: Path | None, stand_ins: Mapping[str, Path] | None = None) -> int | None:
    """The layer count in a local model folder's config.json (None when there is none to read)."""
    try:
        config = json.loads((_folder(reference, base_dir, stand_ins) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config, Mapping) and isinstance(config.get("text_config"), Mapping) and not any(
            k in config for k in _LAYER_KEYS):
        config = config["text_config"]
    for key in _LAYER_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class _LaterTensors:
    """The base's tensors after its layers (final norm, lm_head), read from its safetensors header when needed."""

    def __init__(self, base: Any, base_dir: Path | None, stand_ins: Mapping[str, Path]) -> None:
        self.folder = _folder(base, base_dir, stand_ins)
        self._names: list[str] | None = None

    def names(self, where: str) -> list[str]:
        if self._names is None:
            self._names = [name for name in self._all(where) if LAYER_INDEX.search(name) is None
                           and not any(part in name for part in _PRE_LAYER)]
        return self._names

    def _all(self, where: str) -> list[str]:
        from ..formats.safetensors import FormatError, read_header, read_index

        try:
            index = self.folder / "model.safetensors.index.json"
            if index.is_file():
                return sorted(read_index(index).weight_map)
            return sorted(k for k in read_header(self.folder / "model.safetensors")[0] if k != "__metadata__")
        except (OSError, FormatError):
            raise MergeConfigError(f"mergekit key '{where}': its last slice starts with another value than the first "
                                   f"slice, which mergekit gives the tensors after the layers; cannot read the tensor "
                                   f"names of '{self.folder}' to say which those are") from None


def _filters(setting: Any) -> list[tuple[Any, Any]]:
    """A setting as (filter, scalar or gradient) pairs: a scalar or gradient is one pair matching everything."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(item, Mapping) for item in setting):
        return [(item.get("filter"), item.get("value")) for item in setting]
    return [(None, setting)]


def _scalar_only(setting: Any) -> bool:
    return all(not isinstance(value, list) for _, value in _filters(setting))


def _combine(per_slice: list[Any], lengths: list[int], where: str, later: _LaterTensors) -> Any:
    """One setting over the whole model that takes, at every layer, the value mergekit gives it in its slice."""
    if len(per_slice) == 1 or (all(value == per_slice[0] for value in per_slice) and _scalar_only(per_slice[0])):
        return per_slice[0]
    pairs = [_filters(setting) for setting in per_slice]
    patterns = [pattern for pattern, _ in pairs[0]]
    for index, own in enumerate(pairs[1:], start=1):
        if [pattern for pattern, _ in own] != patterns:
            raise MergeConfigError(f"mergekit key '{where}': slices[{index}] gives it other filters than slices[0] "
                                   f"({[p for p, _ in own]} vs {patterns}); give every slice the same filters")
    combined = []
    for position, pattern in enumerate(patterns):
        values: list[Any] = []
        for own, length in zip(pairs, lengths):
            inner = own[position][1]
            values += [evaluate(inner, "", offset / (length - 1) if length > 1 else 1.0) for offset in range(length)]
        value: Any = values[0] if all(v == values[0] for v in values) else values
        combined.append({"filter": pattern, "value": value} if pattern is not None else {"value": value})
    result: Any = combined[0]["value"] if len(combined) == 1 and patterns[0] is None else combined
    return _after_layers(result, per_slice[-1], where, later)


def _after_layers(result: Any, last: Any, where: str, later: _LaterTensors) -> Any:
    """`result` with a filter for each tensor after the layers whose mergekit value (the last slice's at t = 0)
    is not the one `result` gives it (the first layer's)."""
    def differs() -> bool:
        return any(evaluate(v_last, "", 0.0) != evaluate(v_ours, "", 0.0)
                   for (_, v_last), (_, v_ours) in zip(_filters(last), _filters(result)))
    if not differs():
        return result
    extra = []
    for name in later.names(where):
        theirs, ours = evaluate(last, name, 0.0), evaluate(result, name, 0.0)
        if theirs is not None and theirs != ours:
            extra.append({"filter": name, "value": theirs})
    if not extra:
        return result
    return extra + (result if isinstance(result, list) and all(isinstance(i, Mapping) for i in result)
                    else [{"value": result}])
