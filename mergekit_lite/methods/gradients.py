"""Per-layer parameter values: gradients and filters, as mergekit defines them (SEMANTICS §3d).

A parameter value (or an input's weight) may be
- a scalar: the same for every tensor;
- a gradient, a list of numbers: interpolated over the layer position t = idx / (n_layers − 1) (t = 1 when the
  model has one layer), piecewise linearly between neighbouring list entries; tensors outside the layers
  (embeddings, final norm, lm_head) take t = 0, i.e. the first value (mergekit's behaviour);
- a list of filters `[{filter: substring, value: v}, …]`: the first entry whose substring occurs in the tensor's
  name wins (`filter` absent or `*` matches everything); its value may itself be a gradient.
They let one config give attention and MLP tensors, or early and late layers, different strengths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MergeConfigError

#: a transformer block's index inside a tensor name (Llama/Mistral `layers.N.`, GPT-2 `h.N.`, BERT `layer.N.`,
#: T5 `block.N.`, others `blocks.N.`); the first match from the left wins, so T5's sub-layers
#: (`block.3.layer.1.`) are block 3. The one rule for gradients, slices and `merge inspect` (SEMANTICS §3d).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None outside the blocks (embeddings, the head, final norms)."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None
_FILTER_KEYS = ("filter", "value")


def is_setting(value: Any) -> bool:
    """True when `value` varies by tensor (a gradient or a filter list), not a plain scalar."""
    return isinstance(value, list)


def check_setting(value: Any, check: Callable[[Any], Any], where: str) -> Any:
    """`value` with every leaf checked by `check` (which converts and raises); lists and filters keep their shape."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        return check(value)
    if not value:
        raise MergeConfigError(f"{where}: an empty list is neither a gradient nor a list of filters")
    if all(not isinstance(item, (Mapping, list)) for item in value):
        return [check(item) for item in value]
    checked = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or "value" not in item:
            raise MergeConfigError(f"{where}[{index}]: a filter list holds entries like {{filter: self_attn, value: 0.5}}"
                                   " (or one {value: ...} matching everything)")
        for key in item:
            if key not in _FILTER_KEYS:
                from ..suggest import did_you_mean
                raise MergeConfigError(f"{where}[{index}]: unknown key '{key}'" + did_you_mean(str(key), _FILTER_KEYS))
        pattern = item.get("filter")
        if pattern is not None and not isinstance(pattern, str):
            raise MergeConfigError(f"{where}[{index}]: 'filter' must be a substring of tensor names, got {pattern!r}")
        inner = item["value"]
        if isinstance(inner, (Mapping,)) or (isinstance(inner, list) and any(isinstance(v, (Mapping, list)) for v in inner)):
            raise MergeConfigError(f"{where}[{index}]: a filter's value is a scalar or a gradient (list of numbers)")
        checked.append({"filter": pattern, "value": check_setting(inner, check, f"{where}[{index}].value")})
    return checked


def check_filters_apply(setting: Any, names: Sequence[str], where: str, scope: str) -> None:
    """Each filter of a filter list (`filter: substring`) must give its value to at least one tensor of `names`
    (the tensors the setting is evaluated for): a filter that matches none, or only tensors an earlier entry
    already took, is a typo or a mistake in order, and would silently do nothing. `scope` says which tensors."""
    if not (isinstance(setting, list) and setting and all(isinstance(item, Mapping) for item in setting)):
        return
    def applies(pattern: Any, name: str) -> bool:
        return pattern is None or pattern == "*" or pattern in name

    chosen = {next((i for i, item in enumerate(setting) if applies(item.get("filter"), name)), None) for name in names}
    for index, item in enumerate(setting):
        pattern = item.get("filter")
        if pattern is None or pattern == "*" or index in chosen:
            continue
        matching = [name for name in names if pattern in name]
        if not matching:
            sample = next((name for name in names if LAYER_INDEX.search(name)), names[0] if names else None)
            example = f" (names look like '{sample}')" if sample else ""
            raise MergeConfigError(f"{where}[{index}]: filter '{pattern}' matches no tensor {scope}{example}; "
                                   "fix the substring or drop the entry")
        raise MergeConfigError(f"{where}[{index}]: filter '{pattern}' never applies: every tensor it matches "
                               f"('{matching[0]}'{', …' if len(matching) > 1 else ''}) takes an earlier entry's "
                               "value (the first match wins); move it up or drop it")


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The value of `setting` for `tensor` at layer position `t` (None when no filter matches)."""
    if not isinstance(setting, list):
        return setting
    if all(isinstance(item, Mapping) for item in setting):
        for item in setting:
            pattern = item.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor:
                return evaluate(item["value"], tensor, t)
        return None
    values = list(setting)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]  # booleans and strings select, they do not interpolate
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def layer_count(names: Iterable[str]) -> int:
    """Number of transformer blocks, from the base tensors' names (largest block index + 1; 0 when none)."""
    indices = [int(m.group(1)) for m in map(LAYER_INDEX.search, names) if m]
    return max(indices) + 1 if indices else 0


def layer_position(name: str, n_layers: int) -> float:
    """t for `name`: idx / (n_layers − 1) inside the blocks (1 with a single block), 0 outside them."""
    match = LAYER_INDEX.search(name)
    if match is None or n_layers == 0:
        return 0.0
    return int(match.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


@dataclass(frozen=True)
class TensorParams:
    """One tensor's resolved weights and parameters (every gradient and filter evaluated)."""

    weights: tuple[float, ...]
    params: dict[str, Any]
    adapter_params: list[dict[str, Any]]


def any_setting(weights: Sequence[Any], params: Mapping[str, Any], adapter_params: Sequence[Mapping[str, Any]]) -> bool:
    """True when some weight or parameter varies by tensor."""
    return (any(is_setting(w) for w in weights) or any(is_setting(v) for v in params.values())
            or any(is_setting(v) for own in adapter_params for v in own.values()))


def resolve_tensor(name: str, t: float, weights: Sequence[Any], params: Mapping[str, Any],
                   adapter_params: Sequence[Mapping[str, Any]]) -> TensorParams:
    """Evaluate every setting for tensor `name` at layer position `t`; a filter list that matches nothing is an
    error naming the tensor (mergekit would fall back to the default: we never guess)."""
    def value(setting: Any, what: str) -> Any:
        result = evaluate(setting, name, t)
        if result is None and setting is not None:
            raise MergeConfigError(f"{what}: no filter matches tensor '{name}'; end the list with {{value: ...}} "
                                   "(no filter) to give every other tensor a value")
        return result

    resolved_weights = tuple(float(value(w, f"weight of input {i}")) for i, w in enumerate(weights))
    resolved = {k: value(v, f"parameters.{k}") for k, v in params.items()}
    per_input = [{k: value(v, f"input {i}: '{k}'") for k, v in own.items()} for i, own in enumerate(adapter_params)]
    return TensorParams(resolved_weights, resolved, per_input)
