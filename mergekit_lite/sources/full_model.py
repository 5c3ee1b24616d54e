"""A full fine-tuned checkpoint as a merge input: τ = W_model − W_base for every tensor (SEMANTICS §1).

It is the case of a PEFT adapter whose every tensor is "saved in full": the engine already streams W_saved − W
row chunk by row chunk, so a full model is offered to it in the same shape (`full_tensors`, `tensor_rows`) and
never held whole in memory. Everything that would make the difference meaningless (another architecture, a
tensor missing or of another shape, another vocabulary) is refused before any tensor data is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..engine.finite import all_finite
from ..errors import CheckpointError
from ..formats.safetensors import FLOAT_DTYPES
from .checkpoint import BaseCheckpoint

#: config.json fields that must agree with the base's (architecture and sizes), under their usual names
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings",
)


class FullModel:
    """A full checkpoint folder (one file or shards), read lazily like the base; quacks as an adapter whose
    every float tensor is saved in full (`modules` empty, `full_tensors` = every float tensor)."""

    def __init__(self, folder: Path, label: str, allow_pickle: bool = False) -> None:
        self.label = label
        self.folder = folder
        if not folder.is_dir():
            raise CheckpointError(f"model '{label}': folder not found: {folder}")
        try:
            self.checkpoint = BaseCheckpoint(folder, allow_pickle=allow_pickle)
        except CheckpointError as error:
            raise CheckpointError(f"model '{label}': {error}") from None
        self.config: dict[str, Any] = self.checkpoint.read_json("config.json") or {}
        self.modules: dict[str, Any] = {}
        self.full_tensors = {info.name: info.name for info in self.checkpoint if info.dtype in FLOAT_DTYPES}
        self.weights_file = folder

    def check_against(self, base: BaseCheckpoint) -> None:
        """Refuse a model that is not a fine-tune of `base`: architecture and sizes in config.json, tensor names and
        shapes (naming the first that differs), the tokenizer's vocabulary size."""
        base_config = base.read_json("config.json") or {}
        for key in ARCHITECTURE_FIELDS:
            if key in base_config and key in self.config and base_config[key] != self.config[key]:
                raise CheckpointError(
                    f"model '{self.label}' ({self.folder}): config.json {key} is {self.config[key]!r} but the base's is "
                    f"{base_config[key]!r}; only fine-tunes of the base's architecture can be merged"
                )
        for info in base:
            if info.name not in self.checkpoint:
                raise CheckpointError(f"model '{self.label}' ({self.folder}) has no tensor '{info.name}', which the "
                                      f"base has; is it a fine-tune of {base.folder}?")
            mine = self.checkpoint.info(info.name)
            if mine.shape != info.shape:
                raise CheckpointError(
                    f"model '{self.label}': tensor '{info.name}' has shape {list(mine.shape)} but the base's has "
                    f"{list(info.shape)} (a resized vocabulary or another size of model cannot be merged)"
                )
            if (mine.dtype in FLOAT_DTYPES) != (info.dtype in FLOAT_DTYPES):
                raise CheckpointError(f"model '{self.label}': tensor '{info.name}' is {mine.dtype} but the base's is "
                                      f"{info.dtype}")
        for info in self.checkpoint:
            if info.name not in base:
                raise CheckpointError(f"model '{self.label}' ({self.folder}) has tensor '{info.name}', which the base "
                                      f"lacks; is it a fine-tune of {base.folder}?")
        mine, theirs = tokenizer_size(self.folder), tokenizer_size(base.folder)
        if mine is not None and theirs is not None and mine != theirs:
            raise CheckpointError(
                f"model '{self.label}': its tokenizer has {mine} tokens but the base's has {theirs}; token rows would "
                "not line up (merge models that share the base's tokenizer)"
            )

    def tensor_shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor from the header alone."""
        return self.checkpoint.info(key).shape

    def tensor_rows(self, key: str, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor as stored, checked finite (read into `scratch`, a reused uint8 buffer,
        when given: see BaseCheckpoint.read_rows)."""
        rows = self.stored_rows(key, start, stop, scratch)
        if not all_finite(rows):
            bad = rows.numel() - int(torch.isfinite(rows).sum())
            raise CheckpointError(f"model '{self.label}' ({self.folder}): tensor '{key}' holds {bad} NaN/Inf value(s) "
                                  f"in rows {start}-{stop}")
        return rows

    def stored_rows(self, key: str, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) as stored, not checked: for a kernel that counts NaN/Inf as it reads them (a pass
        saved); when it counts any, `tensor_rows` over the same rows raises the error naming them."""
        return self.checkpoint.read_rows(key, start, stop, scratch)

    def tensor(self, key: str) -> torch.Tensor:
        """A whole tensor (only for small ones)."""
        return self.tensor_rows(key, 0, self.checkpoint.info(key).rows)

    def describe(self) -> str:
        """One line for plans and cards."""
        dtypes = sorted({self.checkpoint.info(k).dtype for k in self.full_tensors})
        kind = self.config.get("model_type", "model")
        return f"full {kind} checkpoint, {len(self.full_tensors)} tensors ({', '.join(dtypes)})"

    def close(self) -> None:
        """Close the open files."""
        self.checkpoint.close()

    def __enter__(self) -> FullModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tokenizer_size(folder: Path) -> int | None:
    """Tokens in a folder's tokenizer.json (largest id + 1 over the vocabulary and added tokens), None without one."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ids: list[int] = []
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids += [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    return max(ids) + 1 if ids else None
