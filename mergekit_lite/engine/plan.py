"""Pairs every base tensor with what each adapter contributes to it, before any tensor data is read.

The plan is where shape mismatches, unmatched adapter keys and unsupported combinations are found, so that
a bad input fails in a second, naming the tensor, and never halfway through a long merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AdapterError
from ..methods.gradients import check_filters_apply
from ..formats.safetensors import FLOAT_DTYPES, ITEM_SIZES
from ..sources.adapter import LoraModule, PeftAdapter
from ..sources.checkpoint import BaseCheckpoint, TensorInfo

if TYPE_CHECKING:
    from ..config import MergeConfig

#: model types whose attention/MLP layers are GPT-2 style Conv1D (weight stored in×out)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
MODULE_PREFIXES = ("model.", "transformer.")


@dataclass(frozen=True)
class LowRank:
    """τ = s·B·A (Linear) or s·(B·A)ᵀ (Conv1D, Embedding)."""

    module: LoraModule
    transposed: bool


@dataclass(frozen=True)
class BiasShift:
    """τ = s·b on a module's bias (`lora_bias`)."""

    key: str
    scale: float


@dataclass(frozen=True)
class Dora:
    """τ = m ⊙ (W + sBA) / ‖W + sBA‖_row − W."""

    module: LoraModule


@dataclass(frozen=True)
class SavedTensor:
    """τ = W_saved − W (modules_to_save, saved base_layer weights)."""

    key: str


Contribution = LowRank | BiasShift | Dora | SavedTensor


@dataclass(frozen=True)
class TensorPlan:
    """One base tensor: its layout, its output dtype, and each adapter's contributions (empty: untouched)."""

    info: TensorInfo
    out_dtype: str
    by_adapter: tuple[tuple[Contribution, ...], ...]

    @property
    def name(self) -> str:
        """The tensor's name in the base and in the output."""
        return self.info.name

    @property
    def touched(self) -> bool:
        """True when at least one adapter changes this tensor."""
        return any(self.by_adapter)

    @property
    def out_nbytes(self) -> int:
        """Bytes of the tensor in the output dtype."""
        return self.info.nbytes // ITEM_SIZES[self.info.dtype] * ITEM_SIZES[self.out_dtype]


@dataclass
class MergePlan:
    """Every base tensor in read order, with the adapters' contributions."""

    tensors: list[TensorPlan]
    adapters: list[PeftAdapter]
    touched_by: list[list[str]] = field(default_factory=list)

    @property
    def total_out_bytes(self) -> int:
        """Size of the merged checkpoint's tensor data."""
        return sum(t.out_nbytes for t in self.tensors)


def build_plan(base: BaseCheckpoint, adapters: list[PeftAdapter], out_dtype: str | None) -> MergePlan:
    """Map every adapter tensor onto a base tensor, check shapes, and list the work per base tensor."""
    model_type = str((base.read_json("config.json") or {}).get("model_type", ""))
    conv1d_model = model_type in CONV1D_MODEL_TYPES
    contributions: dict[str, list[list[Contribution]]] = {}
    touched_by: list[list[str]] = []
    for index, adapter in enumerate(adapters):
        touched: list[str] = []

        def add(name: str, item: Contribution, index: int = index, touched: list[str] = touched) -> None:
            contributions.setdefault(name, [[] for _ in adapters])[index].append(item)
            if name not in touched:
                touched.append(name)

        for module in adapter.modules.values():
            info, transposed = lora_target(base, adapter, module, conv1d_model)
            name = info.name
            if module.magnitude_key is not None:
                if transposed:
                    raise AdapterError(
                        f"adapter '{adapter.label}': DoRA on '{module.module}' (a Conv1D or Embedding layer) is not "
                        "supported yet; only DoRA on Linear layers can be merged"
                    )
                add(name, Dora(module))
            else:
                add(name, LowRank(module, transposed))
            if module.bias_key is not None:
                bias_name = _base_name(base, adapter, f"{module.module}.bias", purpose="lora_bias")
                _check_shape(base.info(bias_name), adapter.tensor_shape(module.bias_key), adapter, module.bias_key)
                add(bias_name, BiasShift(module.bias_key, module.scale))
        for param_path, key in adapter.full_tensors.items():
            name = _base_name(base, adapter, param_path)
            _check_shape(base.info(name), adapter.tensor_shape(key), adapter, key)
            add(name, SavedTensor(key))
        touched_by.append(touched)
    for name, per_adapter in contributions.items():
        for index, items in enumerate(per_adapter):
            if any(isinstance(item, Dora) for item in items) and len(items) > 1:
                raise AdapterError(
                    f"adapter '{adapters[index].label}': tensor '{name}' has DoRA together with other changes; "
                    "this combination is not supported"
                )
    plans = []
    empty: tuple[tuple[Contribution, ...], ...] = tuple(() for _ in adapters)
    for info in base:
        per_adapter = contributions.get(info.name)
        dtype = out_dtype if (out_dtype and info.dtype in FLOAT_DTYPES) else info.dtype
        if per_adapter is not None and info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"base tensor '{info.name}' has dtype {info.dtype}; adapters can only change float tensors")
        by_adapter = tuple(tuple(items) for items in per_adapter) if per_adapter else empty
        plans.append(TensorPlan(info, dtype, by_adapter))
    return MergePlan(plans, adapters, touched_by)


def check_filters(plan: MergePlan, config: MergeConfig) -> None:
    """Every filter in a weight or parameter (SEMANTICS §3d) gives its value to some tensor of the base, checked
    here, before any data is read or anything written: a filter that matches no tensor (a typo) or only tensors an
    earlier filter took is a config error naming it, never a silent no-op. (Matched against every base tensor, so
    a recipe's `mlp` filter stays valid for adapters that only change attention.)"""
    names = [tensor.name for tensor in plan.tensors]
    scope = "of the base model"
    for key, value in config.global_params.items():
        check_filters_apply(value, names, f"parameters.{key}", scope)
    per_input = config.adapter_params
    for index, (where, spec) in enumerate(zip(config.input_where, config.inputs)):
        check_filters_apply(spec.weight, names, f"{where}.weight", scope)
        for key in spec.parameters:
            check_filters_apply(per_input[index].get(key), names, f"{where}.{key}", scope)


def lora_target(base: BaseCheckpoint, adapter: PeftAdapter, module: LoraModule, conv1d_model: bool
                ) -> tuple[TensorInfo, bool]:
    """The base tensor a LoRA module changes, and whether τ = s·(B·A)ᵀ there: the merge's one mapping rule, also
    used by `merge verify --quantize` to rebuild ΔW of a PEFT output."""
    info = base.info(_base_name(base, adapter, f"{module.module}.weight"))
    return info, _layout(info, adapter, module, conv1d_model)


def _base_name(base: BaseCheckpoint, adapter: PeftAdapter, param_path: str, purpose: str = "") -> str:
    """Find the base tensor for a module parameter path, allowing a leading model./transformer. either way."""
    candidates = [param_path]
    for prefix in MODULE_PREFIXES:
        if param_path.startswith(prefix):
            candidates.append(param_path[len(prefix):])
        else:
            candidates.append(prefix + param_path)
    for candidate in candidates:
        if candidate in base:
            return candidate
    why = f" ({purpose} needs the base layer to have a bias)" if purpose else ""
    raise AdapterError(
        f"adapter '{adapter.label}' ({adapter.folder}): no base tensor '{param_path}'{why} in {base.folder}; "
        "is this adapter for a different base model?"
    )


def _layout(info: TensorInfo, adapter: PeftAdapter, module: LoraModule, conv1d_model: bool) -> bool:
    """True when τ = s·(B·A)ᵀ: decided from the base tensor's shape, never from fan_in_fan_out."""
    a_shape = adapter.tensor_shape(module.a_key)
    b_shape = adapter.tensor_shape(module.b_key)
    out_features, in_features = b_shape[0], a_shape[1]
    if module.embedding:
        if info.shape != (in_features, out_features):
            _shape_error(info, adapter, module, (in_features, out_features))
        return True
    as_linear = info.shape == (out_features, in_features)
    as_conv1d = info.shape == (in_features, out_features)
    if as_linear and as_conv1d:
        return conv1d_model and module.module.rsplit(".", 1)[-1] in CONV1D_LEAVES
    if as_linear or as_conv1d:
        return as_conv1d
    _shape_error(info, adapter, module, (out_features, in_features))
    return False


def _shape_error(info: TensorInfo, adapter: PeftAdapter, module: LoraModule, expected: tuple[int, int]) -> None:
    raise AdapterError(
        f"adapter '{adapter.label}': module '{module.module}' makes a {expected[0]}x{expected[1]} delta but base "
        f"tensor '{info.name}' is {'x'.join(map(str, info.shape))}; is this adapter for a different base model?"
    )


def _check_shape(info: TensorInfo, shape: tuple[int, ...], adapter: PeftAdapter, key: str) -> None:
    if info.shape != shape:
        raise AdapterError(
            f"adapter '{adapter.label}': tensor '{key}' has shape {list(shape)} but base tensor '{info.name}' has "
            f"{list(info.shape)} (a resized vocabulary cannot be merged)"
        )

