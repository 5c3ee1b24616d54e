"""The base model loaded once, with every adapter attached as a frozen low-rank branch scaled by a coefficient.

For each base tensor t that adapters change, and each adapter i, the branch adds λᵢ,ₜ·τᵢ's effect to the module's
output without ever building τᵢ: with τᵢ = sᵢ·Lᵢ·Rᵢ in the tensor's own layout (exactly the factors the engine
streams: `engine.plan` decides Linear / Conv1D / Embedding layout, rank and alpha patterns and rsLoRA set sᵢ),

- Linear (W is out×in, y = x·Wᵀ):   Δy = Σᵢ λᵢ,ₜ sᵢ (x·Rᵢᵀ)·Lᵢᵀ
- Conv1D (W is in×out, y = x·W):     Δy = Σᵢ λᵢ,ₜ sᵢ (x·Lᵢ)·Rᵢ
- Embedding (W is vocab×dim):        Δy = Σᵢ λᵢ,ₜ sᵢ Lᵢ[ids]·Rᵢ
- a bias shift (`lora_bias`):        Δy = Σᵢ λᵢ,ₜ sᵢ bᵢ

all adapters of one tensor in one product over their concatenated factors. `coefficients` (adapters × tensors)
is read at every forward, so it may be a differentiable function of trainable parameters; the base's own weights
never require gradients. Adapter i alone (λ = one-hot i) is the model base + τᵢ: its teacher.

Refused, with one line each: full fine-tuned inputs, DoRA and saved whole tensors (`modules_to_save`), whose
changes are not low-rank branches, and a changed tensor the loaded model shares between modules (tied
embeddings: the branch would see only one of its uses).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.plan import BiasShift, LowRank
from ..errors import MergeConfigError
from .batches import TokenBatch

logger = logging.getLogger(__name__)

LINEAR, CONV1D, EMBEDDING, BIAS = "linear", "conv1d", "embedding", "bias"


@contextmanager
def loader_bars(shown: bool) -> Iterator[None]:
    """transformers' own "Loading weights" bar only while progress is shown: with `--no-progress` a command's
    stderr holds our lines alone (one line on error). Scoped: the switch is transformers' global, put back after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if shown and before:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


@dataclass
class Branch:
    """Every adapter's change of one base tensor, as concatenated factors (or bias vectors) in the tensor's layout."""

    tensor: str
    #: the tensor's column in `BranchedModel.coefficients`
    column: int
    kind: str
    #: the loaded model's module the branch adds to
    module: str
    #: adapter index of each rank column (factors) or each vector (bias)
    owner: torch.Tensor
    #: sᵢ of each rank column (1 for bias vectors, whose scale is folded in as the engine folds it)
    scale: torch.Tensor
    #: m×R (factors) or k×m (bias vectors: one row per adapter)
    left: torch.Tensor
    #: R×n (factors); None for bias vectors
    right: torch.Tensor | None


class BranchedModel:
    """A Hugging Face causal LM of the base, with every adapter of `prepared` as frozen low-rank branches.

    `tensors` are the changed base tensors in checkpoint order; `coefficients[i, t]` scales adapter i's change of
    tensors[t] in every forward. Use `teacher(i)` for adapter i alone, `student(c)` to run with coefficients c.
    """

    def __init__(self, prepared: Any, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 progress: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .. import methods  # noqa: F401  (registry import order)

        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        #: the coefficients' dtype: float32, or float64 for a float64 model (gradient checks)
        self.lambda_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        labels = [a.label for a in prepared.adapters]
        config = prepared.config
        for index, spec in enumerate(config.inputs):
            if config.is_full_model(index):
                raise MergeConfigError(f"{config.input_where[index]} ('{spec.label}'): a full fine-tune has no "
                                       "low-rank factors to calibrate; data-aware methods merge LoRA adapters only")
        folder = prepared.base.folder
        with loader_bars(progress):
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.labels = labels
        self.n_adapters = len(labels)
        modules = dict(self.model.named_modules())
        owners = _parameter_owners(self.model)
        self.tensors: list[str] = []
        self.branches: list[Branch] = []
        for tensor in prepared.plan.tensors:
            if not tensor.touched:
                continue
            branch = self._branch(tensor, len(self.tensors), prepared.adapters, modules, owners)
            self.tensors.append(tensor.name)
            self.branches.append(branch)
        self.coefficients = torch.zeros(self.n_adapters, len(self.tensors), device=self.device, dtype=self.lambda_dtype)
        self._hooks = [modules[b.module].register_forward_hook(self._hook(b)) for b in self.branches]

    # ---------------------------------------------------------------------------------------------- building

    def _branch(self, tensor: Any, column: int, adapters: Sequence[Any], modules: dict[str, torch.nn.Module],
                owners: dict[int, list[str]]) -> Branch:
        path, param = _module_of(tensor.name, modules)
        module = modules[path]
        weight = getattr(module, param)
        if tuple(weight.shape) != tuple(tensor.info.shape):
            raise MergeConfigError(f"tensor '{tensor.name}' is {tuple(tensor.info.shape)} in the checkpoint but "
                                   f"{tuple(weight.shape)} in the loaded model; cannot attach branches")
        shared = owners.get(id(weight), [])
        if len(shared) > 1:
            raise MergeConfigError(f"tensor '{tensor.name}' is shared by {', '.join(shared)} in the loaded model "
                                   "(tied weights); calibrating it would see one use only. Untie the weights or "
                                   "leave this module out of the adapters")
        if param == "bias":
            kind = BIAS
        elif isinstance(module, torch.nn.Embedding):
            kind = EMBEDDING
        elif isinstance(module, torch.nn.Linear):
            kind = LINEAR
        elif type(module).__name__ == "Conv1D":
            kind = CONV1D
        else:
            raise MergeConfigError(f"tensor '{tensor.name}' belongs to a {type(module).__name__}; low-rank branches "
                                   "attach to Linear, Conv1D and Embedding layers only")
        lefts, rights, owner, scale = [], [], [], []
        for index, items in enumerate(tensor.by_adapter):
            for item in items:
                if isinstance(item, LowRank) and kind != BIAS:
                    left, right, s = _factors(adapters[index], item)
                    lefts.append(left)
                    rights.append(right)
                    owner += [index] * left.shape[1]
                    scale += [s] * left.shape[1]
                elif isinstance(item, BiasShift) and kind == BIAS:
                    lefts.append((adapters[index].tensor(item.key).to(torch.float32) * item.scale).reshape(1, -1))  # as the engine folds it
                    owner.append(index)
                    scale.append(1.0)
                else:
                    what = type(item).__name__
                    raise MergeConfigError(
                        f"adapter '{adapters[index].label}': tensor '{tensor.name}' has a {what} change "
                        f"({'DoRA' if what == 'Dora' else 'a saved whole tensor' if what == 'SavedTensor' else what});"
                        " data-aware methods attach plain LoRA branches only. Merge this adapter with a data-free "
                        "method, or retrain it without DoRA / modules_to_save")
        on = {"device": self.device, "dtype": self.dtype}
        return Branch(
            tensor=tensor.name, column=column, kind=kind, module=path,
            owner=torch.tensor(owner, dtype=torch.long, device=self.device),
            scale=torch.tensor(scale, dtype=self.lambda_dtype, device=self.device),
            left=torch.cat(lefts, dim=0 if kind == BIAS else 1).to(**on),
            right=torch.cat(rights, dim=0).to(**on) if rights else None,
        )

    def _hook(self, branch: Branch) -> Any:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            c = (self.coefficients[branch.owner, branch.column] * branch.scale).to(output.dtype)
            x = args[0]
            if branch.kind == BIAS:
                return output + c @ branch.left
            assert branch.right is not None
            if branch.kind == LINEAR:
                h = (x @ branch.right.T) * c
                return output + h @ branch.left.T
            if branch.kind == CONV1D:
                h = (x @ branch.left) * c
                return output + h @ branch.right
            h = torch.nn.functional.embedding(x, branch.left) * c
            return output + h @ branch.right
        return hook

    # ------------------------------------------------------------------------------------------------ using

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes (its config's positions, else the tokenizer's limit)."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else 2048

    @property
    def pad_id(self) -> int:
        """The padding token (EOS when the tokenizer has none; padded positions are masked anyway)."""
        for value in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.model.config.pad_token_id):
            if value is not None:
                return int(value)
        return 0

    @property
    def eos_ids(self) -> set[int]:
        """Tokens that end a generated continuation."""
        ids = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, (list, tuple)) else ([value] if value is not None else []))
        return {int(v) for v in ids}

    def module(self, tensor: str) -> torch.nn.Module:
        """The loaded model's module whose output the change of base tensor `tensor` adds to (for input hooks)."""
        return dict(self.model.named_modules())[self.branches[self.tensors.index(tensor)].module]

    def logits(self, batch: TokenBatch) -> torch.Tensor:
        """Next-token logits b×T×V of `batch` at the current coefficients (float32, or float64 for a float64 model)."""
        batch = batch.to(self.device)
        output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return output.logits.to(self.lambda_dtype)

    @contextmanager
    def using(self, coefficients: torch.Tensor) -> Iterator[None]:
        """Run with `coefficients` (adapters × tensors), restoring the previous ones afterwards."""
        before = self.coefficients
        self.coefficients = coefficients.to(self.device)
        try:
            yield
        finally:
            self.coefficients = before

    def one_hot(self, index: int) -> torch.Tensor:
        """Coefficients of adapter `index` alone: 1 on its row, 0 elsewhere (its model is base + τᵢ)."""
        coefficients = torch.zeros(self.n_adapters, len(self.tensors), device=self.device, dtype=self.lambda_dtype)
        coefficients[index] = 1.0
        return coefficients

    def teacher(self, index: int) -> Any:
        """Context: the model is adapter `index` alone (base + τᵢ)."""
        return self.using(self.one_hot(index))

    def close(self) -> None:
        """Remove the hooks (the model is then the plain base again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _factors(adapter: Any, item: LowRank) -> tuple[torch.Tensor, torch.Tensor, float]:
    """τ = s·left·right in the base tensor's layout, as the engine reads it (s·B·A, or s·Aᵀ·Bᵀ when transposed)."""
    module = item.module
    a = adapter.tensor(module.a_key).to(torch.float32)
    b = adapter.tensor(module.b_key).to(torch.float32)
    if item.transposed:
        return a.T.contiguous(), b.T.contiguous(), float(module.scale)
    return b, a, float(module.scale)


def _module_of(name: str, modules: dict[str, torch.nn.Module]) -> tuple[str, str]:
    """(module path in the loaded model, parameter name) of checkpoint tensor `name` (model./transformer. either way)."""
    path, _, param = name.rpartition(".")
    for candidate in (path, path.removeprefix("model."), f"model.{path}", path.removeprefix("transformer."),
                      f"transformer.{path}"):
        module = modules.get(candidate)
        if module is not None and isinstance(getattr(module, param, None), torch.Tensor):
            return candidate, param
    raise MergeConfigError(f"the loaded base model has no module for checkpoint tensor '{name}'")


def _parameter_owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the modules holding it directly (more than one: tied weights)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(path)
    return owners
