"""A PEFT LoRA adapter on disk: its config, its tensors (read lazily), and what each module contributes.

Every variant SEMANTICS §1 lists is recognised here; every feature we do not merge exactly is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.finite import all_finite
from ..errors import AdapterError
from ..formats.peft import BASE_LAYER_KEY, CONFIG_FILE, KEY_PREFIX, LORA_KEY, PICKLED_WEIGHTS, WEIGHTS_FILE
from ..formats.safetensors import SafetensorsFile
from .adapter_config import check_config_types
from .files import PickledTensors, dangling, inside_folder


#: config fields that, when set, mean a feature we cannot merge exactly
UNSUPPORTED_FIELDS = {
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}
#: initialisations that change the base at init: deltas then are not relative to the original base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

_LORA_KEY, _BASE_LAYER_KEY = LORA_KEY, BASE_LAYER_KEY


@dataclass(frozen=True)
class LoraModule:
    """One module an adapter targets with low-rank factors, with its effective rank and scaling."""

    module: str
    a_key: str
    b_key: str
    embedding: bool
    rank: int
    alpha: float
    scale: float
    bias_key: str | None = None
    magnitude_key: str | None = None


class PeftAdapter:
    """An adapter folder; tensors stay on disk until asked for."""

    def __init__(self, folder: Path, label: str, allow_pickle: bool = False) -> None:
        self.folder = folder
        self.label = label
        self.allow_pickle = allow_pickle
        self.config = self._read_config()
        self.weights_file = self._weights_file()
        self._file: SafetensorsFile | PickledTensors
        if self.weights_file.suffix == ".bin":
            self._file = PickledTensors(self.weights_file, AdapterError)
        else:
            try:
                self._file = SafetensorsFile(self.weights_file)
            except (OSError, ValueError) as error:
                raise AdapterError(f"{self.weights_file}: not a readable safetensors file ({error})") from None
        self.keys = self._file.keys()
        self.modules: dict[str, LoraModule] = {}
        #: full tensors saved by the adapter, by their parameter path in the base model ("lm_head.weight")
        self.full_tensors: dict[str, str] = {}
        self._finite_keys: set[str] = set()  # tensors already checked for NaN/Inf (the file does not change)
        self._parse_keys()
        self._check_factors()

    # -- reading -------------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        if not self.folder.is_dir():
            raise AdapterError(f"adapter folder not found: {self.folder}")
        path = self.folder / CONFIG_FILE
        if not path.is_file():
            if dangling(path):
                raise AdapterError(f"{path}: cannot be read{dangling(path)}")
            raise AdapterError(f"{self.folder}: no {CONFIG_FILE} (is this a PEFT adapter folder?)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:
            raise AdapterError(f"{path}: not valid JSON ({str(error)[:200]})") from None
        check_config_types(config, path)
        self._refuse_unsupported(config, path)
        return config

    def _refuse_unsupported(self, config: dict[str, Any], path: Path) -> None:
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{path}: peft_type {peft_type} is not supported; only LoRA adapters can be merged")
        for field, feature in UNSUPPORTED_FIELDS.items():
            if config.get(field):
                raise AdapterError(f"{path}: '{field}' is set; {feature} cannot be merged exactly, so we refuse it")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            raise AdapterError(
                f"{path}: init_lora_weights='{init}' changes the base model at init, so this adapter's deltas are "
                "not relative to the original base. Save it with PEFT's conversion "
                "(path_initial_model_for_weight_conversion) and merge the converted adapter."
            )

    def _weights_file(self) -> Path:
        path = self.folder / WEIGHTS_FILE
        if path.is_file():
            return inside_folder(self.folder, WEIGHTS_FILE, path, where="weights file", error=AdapterError)
        pickled = self.folder / PICKLED_WEIGHTS
        if pickled.is_file() and self.allow_pickle:
            return inside_folder(self.folder, PICKLED_WEIGHTS, pickled, where="weights file", error=AdapterError)
        if pickled.is_file():
            raise AdapterError(
                f"{self.folder} holds only {PICKLED_WEIGHTS} (pickle); mergekit_lite never unpickles files by "
                "default, since a pickle can run code. Re-save the adapter with save_pretrained(..., "
                "safe_serialization=True), or, if you trust the file, pass --allow-pickle (it is then loaded "
                "with torch.load(weights_only=True))."
            )
        raise AdapterError(f"{self.folder}: no {WEIGHTS_FILE}{dangling(path)}")

    def tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor (small: factors, biases, magnitude vectors, saved modules), checked finite once."""
        tensor = self._read(key)
        if key not in self._finite_keys:
            self._finite(key, tensor)
            self._finite_keys.add(key)
        return tensor

    def tensor_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a (possibly large) saved full tensor, checked finite."""
        return self._finite(key, self._read(key, start, stop))

    def _read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        try:
            return self._file.tensor(key, start, stop)
        except (OSError, ValueError) as error:
            raise AdapterError(f"adapter '{self.label}': cannot read tensor '{key}' ({error})") from None

    def _finite(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A NaN or Inf in an adapter would spread through every merged weight it touches: refuse it by name."""
        if not all_finite(tensor):
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            raise AdapterError(
                f"adapter '{self.label}' ({self.weights_file}): tensor '{key}' holds {bad} NaN/Inf value(s); "
                "the adapter is corrupt or diverged in training"
            )
        return tensor

    def _check_factors(self) -> None:
        """Fail in the first second, not mid-merge: factor dtypes are float and every small tensor is finite."""
        for module in self.modules.values():
            for key in (module.a_key, module.b_key, module.bias_key, module.magnitude_key):
                if key is None:
                    continue
                if not self._file.is_float(key):
                    raise AdapterError(f"{self.weights_file}: LoRA tensor '{key}' is not floating point")
                self.tensor(key)

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """Shape of an adapter tensor from the header alone."""
        return self._file.shape(key)

    # -- parsing -------------------------------------------------------------------------------
    def _parse_keys(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self.keys:
            if not key.startswith(KEY_PREFIX):
                raise AdapterError(
                    f"{self.weights_file}: key '{key}' does not start with '{KEY_PREFIX}'; not a PEFT LoRA file"
                )
            rest = key[len(KEY_PREFIX):]
            match = _LORA_KEY.match(rest)
            if match:
                part = match["part"].removesuffix(".weight") if match["part"].startswith("lora_magnitude") else match["part"]
                parts.setdefault(match["module"], {})[part] = key
                continue
            if "lora_" in rest:
                raise AdapterError(f"{self.weights_file}: unrecognised LoRA tensor '{key}' (unsupported variant)")
            base_layer = _BASE_LAYER_KEY.match(rest)
            name = f"{base_layer['module']}.{base_layer['param']}" if base_layer else rest
            self.full_tensors[name] = key
        for module, found in parts.items():
            self.modules[module] = self._lora_module(module, found)

    def _lora_module(self, module: str, found: dict[str, str]) -> LoraModule:
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in found or b_part not in found:
            raise AdapterError(f"{self.weights_file}: module '{module}' lacks {a_part} or {b_part}")
        a_shape = self.tensor_shape(found[a_part])
        b_shape = self.tensor_shape(found[b_part])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise AdapterError(
                f"{self.weights_file}: module '{module}' has factors of shapes {a_shape} and {b_shape}; "
                "only 2-D LoRA on Linear, Conv1D and Embedding layers can be merged"
            )
        rank, alpha = self._rank_and_alpha(module)
        if rank != a_shape[0]:
            raise AdapterError(
                f"{self.folder / CONFIG_FILE}: module '{module}' has rank {a_shape[0]} in its tensors but the config "
                f"(r / rank_pattern) says {rank}; the scaling would be wrong, so we refuse it"
            )
        root = math.sqrt(rank) if self.config.get("use_rslora") else rank
        return LoraModule(
            module=module,
            a_key=found[a_part],
            b_key=found[b_part],
            embedding=embedding,
            rank=rank,
            alpha=alpha,
            scale=alpha / root,
            bias_key=found.get("lora_B.bias"),
            magnitude_key=found.get("lora_magnitude_vector"),
        )

    def _rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and alpha of a module: rank_pattern / alpha_pattern with PEFT's regex rule, else the defaults."""
        rank = int(self.config.get("r", 8))
        alpha = float(self.config.get("lora_alpha", 8))
        for key, value in (self.config.get("rank_pattern") or {}).items():  # keys checked to compile
            if re.match(rf"(.*\.)?({key})$", module):
                rank = int(value)
                break
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return rank, alpha

    def close(self) -> None:
        """Close the weights file."""
        if "_file" in self.__dict__:
            self._file.close()

    def __enter__(self) -> PeftAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line for plans and cards: rank, alpha, variants."""
        flags = [name for name in ("use_rslora", "use_dora", "lora_bias") if self.config.get(name)]
        extra = f", {', '.join(flags)}" if flags else ""
        saved = f", {len(self.full_tensors)} saved full tensor(s)" if self.full_tensors else ""
        return f"r={self.config.get('r')}, alpha={self.config.get('lora_alpha')}{extra}, {len(self.modules)} modules{saved}"
