"""The PEFT adapter output kind (`output.format: peft`): one LoRA adapter whose merge gives the merged checkpoint.

Per merged tensor (SEMANTICS §6): the merged delta as factors lora_B (out×k) · lora_A (k×in) with
`lora_alpha = k` (scale 1; `rank_pattern`/`alpha_pattern` where ranks differ). Linear methods write the exact
concatenation of the adapters' factors (k = Σ rᵢ), factored methods their own factors; `output.rank` compresses
either to the Eckart–Young optimal rank k through the SVD of the small core (QR of the factors, never the dense
delta). Full-space elementwise methods (full-rank deltas) need `output.rank` and use a seeded randomized SVD of
the tensor's delta. Bias shifts become `lora_bias`, saved full tensors `modules_to_save`; DoRA is refused.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.device import single_threaded_torch
from ..engine.loop import EngineStats
from ..engine.plan import BiasShift, Dora, LowRank, SavedTensor
from ..errors import MergeConfigError
from ..formats import peft
from ..formats.safetensors import ITEM_SIZES, TORCH_DTYPES, TensorInfo, dtype_code, tensor_bytes
from ..methods import LowRankFactors
from ..methods.lowrank_core import core_of
from ..progress import Progress
from .checkpoint import ShardedWriter
from .failures import naming

if TYPE_CHECKING:
    from ..config import MergeConfig
    from ..engine.loop import MergeEngine
    from ..engine.schedule import TensorSchedule

PREFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS = peft.KEY_PREFIX, peft.CONFIG_FILE, peft.WEIGHTS_FILE
#: the randomized SVD's oversampling and power iterations (Halko et al.): error within a few % of optimal
OVERSAMPLE, POWER_ITERATIONS = 8, 4


@dataclass
class AdapterTensor:
    """How one merged base tensor appears in the adapter."""

    schedule: TensorSchedule
    #: "lora" (factors), "bias" (lora_B.bias) or "full" (a modules_to_save tensor)
    role: str
    #: the module path as PEFT keys it (without the base_model.model. prefix)
    module: str
    #: for "lora": "linear" (W = B·A), "conv1d" (W = (B·A)ᵀ) or "embedding" (lora_embedding_A/B)
    layout: str = "linear"
    #: for "lora": the rank written
    rank: int = 0
    #: for "lora": the exact delta's rank before compression (the factors' width)
    exact_rank: int = 0


@dataclass
class Compression:
    """What `output.rank` kept of one tensor's delta: the fraction of ‖ΔW‖²_F, or the measured error."""

    tensor: str
    rank: int
    kept_energy: float
    relative_error: float


@dataclass
class PeftAdapterOutput:
    """`output.format: peft`: a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors, card)."""

    rank: int | None = None
    #: the factors' dtype ("float32", "float16", "bfloat16"); None: float32
    dtype: str | None = None
    name: str = "peft"
    card_relation: str = "adapter"
    tensors: list[AdapterTensor] = field(default_factory=list)
    compression: list[Compression] = field(default_factory=list)
    #: a factored method's factors, computed by `layout` for their rank (unless its phase declares the rank) and
    #: taken (once) by `produce` when it runs the same engine
    _computed: dict[str, LowRankFactors | None] = field(default_factory=dict, repr=False, compare=False)
    _computed_by: Any = field(default=None, repr=False, compare=False)

    # -- the plan: roles, modules and ranks, before anything is written ------------------------------

    def layout(self, engine: MergeEngine) -> list[TensorInfo]:
        """Every adapter tensor in write order; factored methods compute their factors once, here, for the ranks
        (kept for `produce`: in memory at most the size of the exact, untruncated adapter)."""
        self._computed, self._computed_by = {}, engine
        with single_threaded_torch():
            self.tensors = [self._describe(engine, s) for s in engine.schedules if s.action == "merge"]
        if not self.tensors:
            raise MergeConfigError("output.format peft: no adapter changes any tensor (every weight or coefficient "
                                   "is 0), so there is no adapter to write; the merge is the base model itself")
        dtype = self._dtype_code()
        out = []
        for t in self.tensors:
            info = t.schedule.plan.info
            if t.role == "full":
                out.append(TensorInfo(PREFIX + t.schedule.name, t.schedule.plan.out_dtype, info.shape,
                                        t.schedule.plan.out_nbytes))
            elif t.role == "bias":
                out.append(_tensor(f"{PREFIX}{t.module}.lora_B.bias", dtype, (info.shape[0],)))
            else:
                (a_key, a_shape), (b_key, b_shape) = _factor_keys(t, info.shape)
                out.append(_tensor(a_key, dtype, a_shape))
                out.append(_tensor(b_key, dtype, b_shape))
        return out

    def _describe(self, engine: MergeEngine, schedule: TensorSchedule) -> AdapterTensor:
        items = [(i, item) for i in schedule.active for item in schedule.plan.by_adapter[i]]
        labels = [a.label for a in engine.plan.adapters]
        for i, item in items:
            if isinstance(item, Dora):
                raise MergeConfigError(
                    f"output.format peft: adapter '{labels[i]}' changes tensor '{schedule.name}' with DoRA, which "
                    "a merged LoRA adapter cannot hold; write a checkpoint (output.format: checkpoint)"
                )
        if any(isinstance(item, SavedTensor) for _, item in items):
            return AdapterTensor(schedule, "full", schedule.name.rsplit(".", 1)[0])
        if all(isinstance(item, BiasShift) for _, item in items):
            key = next(item.key for _, item in items if isinstance(item, BiasShift))
            return AdapterTensor(schedule, "bias", _module_of(key, ".lora_B.bias"))
        low = [item for _, item in items if isinstance(item, LowRank)]
        module = low[0].module
        layout = "embedding" if module.embedding else ("conv1d" if low[0].transposed else "linear")
        rows, cols = schedule.plan.info.rows, schedule.plan.info.cols
        phase = engine.method.phase
        ranks = [item.module.rank for item in low]
        if phase.combines_chunks:  # a full-rank delta
            if self.rank is None:
                raise MergeConfigError(
                    f"output.format peft with method '{engine.method.name}': its merged deltas are full rank, so "
                    "set output.rank (a randomized SVD per tensor, error recorded), use space: core, or write a "
                    "checkpoint"
                )
            exact = min(rows, cols)
        elif (declared := phase.exact_rank(ranks)) is not None:  # known from the ranks (a data-aware method's
            exact = declared  # factors need its calibration: it must declare them)
        elif engine.method.calibrated is not None:
            raise AssertionError(f"method '{engine.method.name}': a calibrated factored phase must declare its rank "
                                 "(FactoredPhase.rank): its factors do not exist before the calibration")
        else:
            factors = self._computed[schedule.name] = engine.tensor_delta(schedule).factors
            exact = 0 if factors is None else factors.left.shape[1]
        rank = exact if self.rank is None else min(self.rank, exact)
        return AdapterTensor(schedule, "lora", module.module, layout, max(rank, 1), exact)

    # -- producing the tensors ----------------------------------------------------------------------

    def produce(self, engine: MergeEngine, writer: ShardedWriter, progress: Progress) -> EngineStats:
        """Write every adapter tensor in layout order, one base tensor's delta at a time."""
        stats = EngineStats()
        out_dtype = TORCH_DTYPES[self._dtype_code()]
        self.compression = []
        with single_threaded_torch():
            self._produce_all(engine, writer, progress, stats, out_dtype)
        stats.bytes_written = writer.bytes_written
        return stats

    def _produce_all(self, engine: MergeEngine, writer: ShardedWriter, progress: Progress, stats: EngineStats,
                     out_dtype: torch.dtype) -> None:
        for t in self.tensors:
            if t.role == "full":
                writer.begin(PREFIX + t.schedule.name)
                engine.merge_into(t.schedule, writer, progress)
            elif t.role == "bias":
                self._write(writer, progress, f"{PREFIX}{t.module}.lora_B.bias",
                            engine.dense_delta(t.schedule).reshape(-1).to(out_dtype))
            else:
                left, right = self._factors(engine, t)
                (a_key, _), (b_key, _) = _factor_keys(t, t.schedule.plan.info.shape)
                if t.layout == "linear":
                    a, b = right, left
                else:  # W (m×n) = L·R = (B·A)ᵀ: B = Rᵀ, A = Lᵀ
                    a, b = left.T, right.T
                self._write(writer, progress, a_key, a.to(out_dtype))
                self._write(writer, progress, b_key, b.to(out_dtype))
            stats.tensors_merged += 1

    def _factors(self, engine: MergeEngine, t: AdapterTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L m×k, R k×n) of the tensor's merged delta at the rank written."""
        if engine.method.phase.combines_chunks:  # a full-rank delta
            return self._randomized(engine, t)
        if engine is self._computed_by and t.schedule.name in self._computed:
            factors = self._computed.pop(t.schedule.name)  # computed once, by layout; held until written
        else:
            factors = engine.tensor_delta(t.schedule).factors
        m, n = t.schedule.plan.info.rows, t.schedule.plan.info.cols
        if factors is None:
            return torch.zeros(m, 1), torch.zeros(1, n)
        left, right = factors.left, factors.right
        if engine.method.phase.rank_declared and left.shape[1] != t.exact_rank:
            raise AssertionError(f"method '{engine.method.name}' declared rank {t.exact_rank} for tensor "
                                 f"'{t.schedule.name}' but returned factors of rank {left.shape[1]}")
        if self.rank is None:
            return left, right
        return self._truncated(t, left, right)

    def _truncated(self, t: AdapterTensor, left: torch.Tensor, right: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eckart–Young: the best rank-k factors of L·R from the SVD of its small core (float64)."""
        core = core_of([LowRankFactors(left, right, 1.0)], [1.0], (left.shape[0], right.shape[1]))
        u, s, vh = torch.linalg.svd(core.cores[0], full_matrices=False)
        k = t.rank
        total = float((s**2).sum())
        kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        self.compression.append(Compression(t.schedule.name, k, kept, math.sqrt(max(0.0, 1.0 - kept))))
        new_left, new_right = core.u_p @ (u[:, :k] * s[:k]), vh[:k] @ core.u_q.T
        return new_left.to(left.dtype), new_right.to(right.dtype)

    def _randomized(self, engine: MergeEngine, t: AdapterTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded randomized SVD of the tensor's whole (full-rank) delta, its relative error measured."""
        delta = engine.dense_delta(t.schedule).reshape(t.schedule.plan.info.rows, -1)
        k = t.rank
        devices = [delta.device] if delta.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's CPU and CUDA generators are left as they were
            torch.manual_seed(engine.seed)
            u, s, v = torch.svd_lowrank(delta, q=min(k + OVERSAMPLE, *delta.shape), niter=POWER_ITERATIONS)
        left, right = u[:, :k] * s[:k], v[:, :k].T.contiguous()
        norm = float(torch.linalg.vector_norm(delta.double()))
        error = float(torch.linalg.vector_norm((delta - left @ right).double())) / norm if norm > 0 else 0.0
        self.compression.append(Compression(t.schedule.name, k, max(0.0, 1.0 - error**2), error))
        return left, right

    def _dtype_code(self) -> str:
        """The factors' dtype: output.dtype when set, else float32 (exact to the factor product's rounding)."""
        return dtype_code(self.dtype) or "F32"

    @staticmethod
    def _write(writer: ShardedWriter, progress: Progress, key: str, tensor: torch.Tensor) -> None:
        writer.begin(key)
        data = tensor_bytes(tensor.detach().cpu().contiguous())
        writer.write(data)
        progress.update(data.nbytes)

    # -- side files ---------------------------------------------------------------------------------

    def side_file_bytes(self, base_folder: Path) -> int:
        """The adapter config and card are a few kB."""
        return 1 << 20

    def shard_size(self, config: MergeConfig) -> int:
        """One file: PEFT reads a single adapter_model.safetensors (adapters are small)."""
        return 1 << 62

    def finish(self, staging: Path, layout: list[TensorInfo], base_folder: Path, config: MergeConfig) -> None:
        """Check the tensor file against the layout, give it PEFT's name, then adapter_config.json, the resolved
        merge config and the card."""
        from ..formats.integrity import check_written
        from ..formats.safetensors import SINGLE_FILE
        from .card import render_card
        from .output_files import CARD, CONFIG_COPY, write_text

        check_written(staging, layout)
        with naming(staging / ADAPTER_WEIGHTS):
            (staging / SINGLE_FILE).rename(staging / ADAPTER_WEIGHTS)

        with naming(staging / ADAPTER_CONFIG):
            (staging / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(config), indent=2, sort_keys=True))
        write_text(staging / CONFIG_COPY, config.to_yaml())
        write_text(staging / CARD, render_card(config, extra_sections=self.card_sections(), relation="adapter"))

    def adapter_config(self, config: MergeConfig) -> dict[str, Any]:
        """The LoraConfig that makes PEFT apply every written factor pair at scale 1."""
        lora = [t for t in self.tensors if t.role == "lora"]
        ranks = Counter(t.rank for t in lora)
        r = ranks.most_common(1)[0][0] if ranks else 1
        pattern = {t.module: t.rank for t in lora if t.rank != r}
        inputs = [json.loads((config.resolve_path(a.path) / ADAPTER_CONFIG).read_text())
                  if (config.resolve_path(a.path) / ADAPTER_CONFIG).is_file() else {} for a in config.adapters]
        return {
            "peft_type": "LORA",
            "task_type": next((i.get("task_type") for i in inputs if i.get("task_type")), None),
            "base_model_name_or_path": _base_reference(config),
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted({t.module for t in lora}),
            "modules_to_save": sorted({t.module for t in self.tensors if t.role == "full"}) or None,
            "lora_bias": any(t.role == "bias" for t in self.tensors),
            "fan_in_fan_out": any(t.layout == "conv1d" for t in lora),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def summary(self) -> str:
        """What compression kept, for `merge run`'s summary and the card ('' when exact)."""
        if not self.compression:
            return ""
        worst = min(self.compression, key=lambda c: c.kept_energy)
        return (f"rank {self.rank}: kept {self.kept_energy() * 100:.2f}% of ‖ΔW‖²_F overall; worst tensor "
                f"{worst.tensor} {worst.kept_energy * 100:.2f}% (relative error {worst.relative_error:.3g})")

    def kept_energy(self) -> float:
        """Mean kept fraction of ‖ΔW‖²_F over the compressed tensors (each tensor counts once)."""
        return sum(c.kept_energy for c in self.compression) / max(len(self.compression), 1)

    def card_sections(self) -> list[str]:
        """The adapter's own card section (`card_section`)."""
        return [self.card_section()]

    def card_section(self) -> str:
        """The adapter's own card section: ranks, and per tensor what the rank kept."""
        lora = [t for t in self.tensors if t.role == "lora"]
        lines = ["## Adapter", "",
                 f"A PEFT LoRA adapter: {len(lora)} module(s), scale 1 (`lora_alpha = r`), "
                 f"ranks {sorted({t.rank for t in lora})}"
                 + (f"; {sum(t.role == 'bias' for t in self.tensors)} bias shift(s) (`lora_bias`)"
                    if any(t.role == 'bias' for t in self.tensors) else "")
                 + (f"; modules_to_save: {sorted({t.module for t in self.tensors if t.role == 'full'})}"
                    if any(t.role == 'full' for t in self.tensors) else "") + ".",
                 "", "Load it with `PeftModel.from_pretrained(base, this_folder)`; `merge_and_unload()` gives the "
                 "merged checkpoint.", ""]
        if self.compression:
            lines += [f"Compressed: {self.summary()}.", "",
                      "| tensor | rank | kept ‖ΔW‖²_F | relative error |", "|---|---|---|---|"]
            lines += [f"| {c.tensor} | {c.rank} | {c.kept_energy:.6f} | {c.relative_error:.3g} |"
                      for c in self.compression]
            lines.append("")
        return "\n".join(lines)


def _tensor(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, math.prod(shape) * ITEM_SIZES[dtype])


def _factor_keys(t: AdapterTensor, shape: tuple[int, ...]) -> tuple[tuple[str, tuple[int, int]], ...]:
    """((A key, A shape), (B key, B shape)) for a tensor of base shape `shape`."""
    m, n = shape[0], shape[1]
    k = t.rank
    a_key, b_key = peft.factor_keys(t.module, embedding=t.layout == "embedding")
    if t.layout == "embedding":  # W is vocab×dim: A is k×vocab, B dim×k
        return (a_key, (k, m)), (b_key, (n, k))
    if t.layout == "conv1d":  # W is in×out
        return (a_key, (k, m)), (b_key, (n, k))
    return (a_key, (k, n)), (b_key, (m, k))


_module_of = peft.module_of




def _base_reference(config: MergeConfig) -> str:
    """The base as PEFT should find it: its Hub id (with revision), or the absolute local folder."""
    from ..hub.resolve import hub_reference

    reference = hub_reference(config, config.base_model)
    return str(reference) if reference is not None else str(config.resolve_path(config.base_model))

