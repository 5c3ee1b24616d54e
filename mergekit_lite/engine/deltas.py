"""Task vectors τᵢ of one base tensor for any row range, on the compute device (SEMANTICS §1).

The adapters' factors of a tensor are small (r × in, out × r), so they are loaded once per tensor; τᵢ rows
are then produced chunk by chunk. For linear methods all adapters' low-rank parts become one product over
the concatenated, pre-scaled factors: Σ cᵢ sᵢ Bᵢ[rows] Aᵢ = [c₁s₁B₁ | c₂s₂B₂ | …][rows] · [A₁; A₂; …]; a
factored method hands back its own (L, R), streamed the same way (`StreamedDelta`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..formats.safetensors import TORCH_DTYPES
from ..methods import LowRankFactors
from ..sources.adapter import PeftAdapter
from ..sources.full_model import FullModel
from . import kernels, saved_kernels
from .finite import all_finite
from .plan import BiasShift, Contribution, Dora, LowRank, SavedTensor, TensorPlan

_scratch = threading.local()


def scratch(tag: object, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A flat CPU buffer of `numel` entries of `dtype`, this thread's own for `tag`, reused call after call (grown
    when too small). For per-chunk temporaries that never leave the thread: fresh chunk-sized buffers cost page
    faults and fragment the heap (its free blocks split by the small objects made in between)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    nbytes = numel * dtype.itemsize
    buffer = buffers.get(tag)
    if buffer is None or buffer.numel() < nbytes:
        buffers[tag] = None  # drop the smaller one first
        buffer = buffers[tag] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return buffer[:nbytes].view(dtype)


class _Factors:
    """A low-rank product in row form: τ[rows] = left[rows] @ right."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left = left
        self.right = right

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ[start:stop] as a 2-D tensor (into `out` when given).

        On CPU the sum over the rank runs in a fixed order (k = 0..r-1, each product rounded), through the
        fused kernel or the same steps in torch, so τ is the same bytes whatever the chunking, the threads or
        the buffers' alignment (a BLAS GEMM changes its order with all three). Other devices use the GEMM.
        """
        left = self.left[start:stop]
        if left.device.type != "cpu" or left.dtype != torch.float32:
            return torch.mm(left, self.right, out=out)
        if out is None:
            out = torch.empty(left.shape[0], self.right.shape[1], dtype=left.dtype)
        if kernels.usable(left, self.right, out):
            return kernels.lowrank(left, self.right, out)
        torch.mul(left[:, :1], self.right[:1], out=out)
        for k in range(1, left.shape[1]):
            out.add_(left[:, k:k + 1] * self.right[k:k + 1])
        return out


def _low_rank(adapter: PeftAdapter, item: LowRank | Dora, device: torch.device, dtype: torch.dtype) -> LowRankFactors:
    """τ = s·B·A (Linear) or s·(B·A)ᵀ = s·Aᵀ·Bᵀ (Conv1D, Embedding) as (left, right, s) in the tensor's layout."""
    module = item.module
    a = adapter.tensor(module.a_key).to(device=device, dtype=dtype)
    b = adapter.tensor(module.b_key).to(device=device, dtype=dtype)
    if isinstance(item, LowRank) and item.transposed:
        return LowRankFactors(a.T.contiguous(), b.T.contiguous(), module.scale)
    return LowRankFactors(b, a, module.scale)


def _scaled(factors: LowRankFactors, coef: float) -> _Factors:
    """coef · τ in row form, the scale folded into the left factor with one rounding (coef·s first)."""
    return _Factors(factors.left * (coef * factors.scale), factors.right)


class _PreparedLowRank:
    """A plain low-rank change loaded once: as stored (for the linear and factored phases) and, when an
    elementwise method asks for τᵢ rows, with its scale folded in (made on first use)."""

    def __init__(self, raw: LowRankFactors) -> None:
        self.raw = raw

    @functools.cached_property
    def scaled(self) -> _Factors:
        """τᵢ in row form."""
        return _scaled(self.raw, 1.0)


RowsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True)
class StreamedDelta:
    """A merged delta as the linear and factored phases stream it: left @ right plus any dense parts
    (DoRA, saved tensors, bias shifts), each a function of (W rows, start, stop)."""

    factors: _Factors | None
    dense: tuple[RowsFn, ...] = ()
    #: when every dense part is a saved full tensor (a full fine-tune, modules_to_save) and there are no factors:
    #: (adapter index, tensor key, coefficient) of each, in the order of `dense`, for the fused sum kernel
    saved: tuple[tuple[int, str, float], ...] = ()

    @staticmethod
    def of(left: torch.Tensor | None, right: torch.Tensor | None, dense: Sequence[RowsFn] = ()) -> StreamedDelta:
        """Wrap factors (L, R) with delta = L @ R; a rank-0 L (or None) means no low-rank part."""
        if left is None or right is None or left.shape[1] == 0:
            return StreamedDelta(None, tuple(dense))
        return StreamedDelta(_Factors(left.contiguous(), right.contiguous()), tuple(dense))


class TensorDeltas:
    """Everything needed to build τᵢ[rows] for one base tensor, loaded once onto the device."""

    def __init__(
        self,
        plan: TensorPlan,
        adapters: Sequence[PeftAdapter],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.plan = plan
        self.adapters = adapters
        self.device = device
        self.dtype = dtype
        self._caches: dict[int, list[object]] = {}
        self._lock = threading.RLock()  # chunks may be merged side by side; factors are loaded once
        self._linear_key: tuple[float, ...] | None = None
        self._linear_value: StreamedDelta | None = None

    def _vector(self, adapter: PeftAdapter, key: str) -> torch.Tensor:
        return adapter.tensor(key).to(device=self.device, dtype=self.dtype)

    def saved_only(self, index: int) -> bool:
        """True when adapter `index` changes this tensor by one saved full tensor alone (a full fine-tune)."""
        items = self.plan.by_adapter[index]
        return len(items) == 1 and isinstance(items[0], SavedTensor)

    def row_factors(self, index: int) -> _Factors | None:
        """τᵢ in row form (left @ right, the scale folded in) when adapter `index` changes this tensor by one plain
        low-rank product alone, else None: what the fused kernels compute τᵢ tiles from without materialising τᵢ."""
        items = self.plan.by_adapter[index]
        if len(items) != 1 or not isinstance(items[0], LowRank):
            return None
        return self._cache(index)[0].scaled  # type: ignore[attr-defined]

    def needs_base(self, index: int) -> bool:
        """True when τᵢ depends on the base rows (DoRA, saved full tensors)."""
        return any(isinstance(item, (Dora, SavedTensor)) for item in self.plan.by_adapter[index])

    def adapter_rows(self, index: int, base_rows: torch.Tensor, start: int, stop: int,
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
        """τᵢ[start:stop] of adapter `index` (None when it does not touch this tensor); base_rows = W[start:stop].

        With `out` (2-D, contiguous) the result lands there: a plain low-rank τ is written there directly.
        """
        items = self.plan.by_adapter[index]
        if not items:
            return None
        cache = self._cache(index)
        if out is not None:
            if len(items) == 1 and isinstance(items[0], LowRank):
                return cache[0].scaled.rows(start, stop, out=out)  # type: ignore[attr-defined]
            if len(items) == 1 and isinstance(items[0], SavedTensor) and out.dtype == self.dtype:
                return self._saved_rows(index, items[0].key, base_rows, start, stop, out=out.view(base_rows.shape))
            result = self.adapter_rows(index, base_rows, start, stop)
            assert result is not None
            return out.copy_(result.reshape(out.shape))
        total: torch.Tensor | None = None
        for item, prepared in zip(items, cache):
            part = self._part(index, item, prepared, base_rows, start, stop)
            total = part if total is None else total + part
        return total

    def linear_delta(self, coefficients: Sequence[float]) -> StreamedDelta:
        """Σ cᵢ τᵢ for a linear method: all plain low-rank parts as one product over the concatenated factors
        ([c₁s₁B₁ | c₂s₂B₂ | …] · [A₁; A₂; …]), every other change as a dense part. Built once per tensor."""
        with self._lock:
            key = tuple(coefficients)
            if self._linear_key != key:
                self._linear_key, self._linear_value = key, self._build_linear(key)
            return self._linear_value  # type: ignore[return-value]

    def _build_linear(self, coefficients: tuple[float, ...]) -> StreamedDelta:
        lefts, rights, dense, saved = [], [], [], []
        for index, items in enumerate(self.plan.by_adapter):
            coef = coefficients[index]
            if coef == 0:
                continue
            for item, prepared in zip(items, self._cache(index)):
                if isinstance(item, LowRank):
                    scaled = _scaled(prepared.raw, coef)  # type: ignore[attr-defined]
                    lefts.append(scaled.left)
                    rights.append(scaled.right)
                else:
                    dense.append(self._dense_part(index, item, prepared, coef))
                    if isinstance(item, SavedTensor):
                        saved.append((index, item.key, coef))
        if not lefts:
            return StreamedDelta(None, tuple(dense), tuple(saved) if len(saved) == len(dense) else ())
        return StreamedDelta.of(torch.cat(lefts, dim=1), torch.cat(rights, dim=0), dense)

    def _dense_part(self, index: int, item: Contribution, prepared: object, coef: float) -> RowsFn:
        def rows(base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            return self._part(index, item, prepared, base_rows, start, stop) * coef
        return rows

    def adapter_factors(self, index: int) -> list[LowRankFactors]:
        """Adapter `index`'s plain low-rank changes of this tensor, unscaled (τᵢ = Σ scale · left @ right)."""
        return [prepared.raw for item, prepared in zip(self.plan.by_adapter[index], self._cache(index))  # type: ignore[attr-defined]
                if isinstance(item, LowRank)]

    def vector(self, index: int) -> torch.Tensor:
        """Adapter `index`'s whole change of a 1-D tensor (a bias shift), for methods that combine vectors."""
        total = self.adapter_rows(index, None, 0, self.plan.info.rows)  # type: ignore[arg-type]
        assert total is not None
        return total

    def add_rows(self, delta: StreamedDelta, base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """base_rows + delta[start:stop], in place.

        The delta is summed first and added to W once: a GEMM accumulating into W itself (addmm_) may add its
        partial sums one block at a time, rounding W + partial each time, differently for each chunking. (On
        CPU with the kernels built, `merged_rows` takes the kernel instead.)
        """
        total = self.delta_rows(delta, base_rows, start, stop)
        return base_rows if total is None else base_rows.add_(total.reshape(base_rows.shape))

    def delta_rows(self, delta: StreamedDelta, base_rows: torch.Tensor | None, start: int, stop: int
                   ) -> torch.Tensor | None:
        """delta[start:stop] (None when empty); `base_rows` = W[start:stop] is needed only by dense parts."""
        total = torch.mm(delta.factors.left[start:stop], delta.factors.right) if delta.factors is not None else None
        for part_rows in delta.dense:
            part = part_rows(base_rows, start, stop)  # type: ignore[arg-type]
            total = part if total is None else total + part.reshape(total.shape)
        return total

    def merged_rows(self, delta: StreamedDelta, base_rows: torch.Tensor, start: int, stop: int,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """W + delta[start:stop] cast to `out_dtype`, and whether all of it is finite (linear, factored phases).

        When the delta is only low-rank and the kernels are built, one kernel pass reads W as stored (float32
        or bfloat16), sums the rank in a fixed order, adds W once and rounds to the output dtype: the same bytes
        for any chunking, thread count or alignment. Otherwise the torch steps of `add_rows` (W widened to the
        compute dtype first), a cast and a check.
        """
        factors = delta.factors
        if (delta.saved and factors is None and len(delta.saved) <= kernels.MAX_TAUS and self.dtype == torch.float32
                and kernels.rows_usable(base_rows, out_dtype)):
            return self._merged_saved_rows(delta, base_rows, start, stop, out_dtype)
        if (factors is not None and not delta.dense and kernels.rows_usable(base_rows, out_dtype)
                and kernels.usable(factors.left, factors.right)):
            out = kernels.output_rows(base_rows, out_dtype)
            return out, kernels.lowrank_add(factors.left[start:stop], factors.right, base_rows, out) == 0
        out = self.add_rows(delta, base_rows.to(self.dtype), start, stop).to(out_dtype)
        return out, all_finite(out)

    def _merged_saved_rows(self, delta: StreamedDelta, base_rows: torch.Tensor, start: int, stop: int,
                           out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """W + Σ cᵢ (W_savedᵢ − W) for saved full tensors only (full fine-tunes): the float32 operations of
        `add_rows` in the same order (τᵢ = f32(savedᵢ) − f32(W), uᵢ = τᵢ·cᵢ summed in order, W added once,
        rounded), so the same bytes. With the saved-sum kernel built: one pass over each model's stored rows and W
        (τᵢ inline, NaN/Inf in the inputs counted there); otherwise each τᵢ in one mixed-dtype subtraction into a
        buffer, then the fused sum kernel."""
        if self.device.type == "cpu" and len(delta.saved) <= saved_kernels.MAX_SAVED and \
                saved_kernels.usable(base_rows, out_dtype):
            stored = self._stored_saved_rows(delta.saved, start, stop)
            if stored is not None:
                out = kernels.output_rows(base_rows, out_dtype)
                not_finite, bad_inputs = saved_kernels.saved_sum(base_rows, stored,
                                                                 [coef for _, _, coef in delta.saved], out)
                if bad_inputs:  # name the first input holding them, as the checked read does
                    for index, key, _ in delta.saved:
                        self.adapters[index].tensor_rows(key, start, stop)
                    raise RuntimeError(f"the saved-sum kernel counted {bad_inputs} NaN/Inf input(s) in rows "
                                       f"{start}-{stop} that no input's check finds")
                return out, not_finite == 0
        wide = base_rows
        if base_rows.dtype != torch.float32:  # W widened once for every subtraction, in this thread's buffer
            wide = scratch("wide", base_rows.numel(), torch.float32).view(base_rows.shape).copy_(base_rows)
        taus = [self._saved_rows(index, key, wide, start, stop,
                                 out=scratch(("tau", n), wide.numel(), torch.float32).view(wide.shape))
                for n, (index, key, _) in enumerate(delta.saved)]
        out = kernels.output_rows(base_rows, out_dtype)
        count = len(taus)
        not_finite = kernels.consensus_into(kernels.SUM, base_rows, taus, [-1.0] * count,
                                            [coef for _, _, coef in delta.saved], [1.0] * count, out=out)
        return out, not_finite == 0

    def _stored_saved_rows(self, saved: tuple[tuple[int, str, float], ...], start: int, stop: int
                           ) -> list[torch.Tensor] | None:
        """Each saved tensor's rows [start, stop) as stored, for the saved-sum kernel; None when one is of a dtype it
        does not read. Full models' rows land in this thread's reused buffers, unchecked when every input is a full
        model (the kernel counts NaN/Inf as it reads); with any other input all are checked as read, so the first
        bad one in order is still the one named."""
        unchecked = all(isinstance(self.adapters[index], FullModel) for index, _, _ in saved)
        rows = []
        for n, (index, key, _) in enumerate(saved):
            adapter = self.adapters[index]
            if isinstance(adapter, FullModel):
                info = adapter.checkpoint.info(key)
                if TORCH_DTYPES.get(info.dtype) not in saved_kernels.ROW_TYPES:
                    return None
                buffer = scratch(("stored", n), (stop - start) * info.row_bytes)
                read = adapter.stored_rows if unchecked else adapter.tensor_rows
                rows.append(read(key, start, stop, buffer))
            else:
                part = adapter.tensor_rows(key, start, stop)
                if part.dtype not in saved_kernels.ROW_TYPES or part.device.type != "cpu":
                    return None
                rows.append(part.contiguous())
        return rows

    def _saved_rows(self, index: int, key: str, base_rows: torch.Tensor, start: int, stop: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """W_saved[start:stop] − W[start:stop] in the compute dtype (into `out`, shaped as `base_rows`, when
        given): a saved tensor that widens to the compute dtype exactly is subtracted as stored (one pass: torch
        widens each entry, then subtracts in the wider dtype, exactly what widening first and subtracting does).
        A full model's rows are read into this thread's reused buffer (they do not outlive the subtraction); with
        the saved-sum kernels built, the subtraction and the rows' NaN/Inf check are one C pass."""
        adapter = self.adapters[index]
        if isinstance(adapter, FullModel) and self.device.type == "cpu":
            info = adapter.checkpoint.info(key)
            buffer = scratch(("saved", index), (stop - start) * info.row_bytes)
            if (self.dtype == torch.float32 and TORCH_DTYPES.get(info.dtype) in saved_kernels.ROW_TYPES
                    and base_rows is not None and saved_kernels.usable(base_rows, torch.float32)
                    and (out is None or out.is_contiguous())):
                saved = adapter.stored_rows(key, start, stop, buffer)
                tau = torch.empty(base_rows.shape, dtype=torch.float32) if out is None else out
                if saved_kernels.saved_tau(saved, base_rows, tau):
                    adapter.tensor_rows(key, start, stop)  # raises, naming the model, tensor and rows
                    raise RuntimeError(f"the saved-tensor τ kernel counted NaN/Inf in '{key}' rows {start}-{stop} "
                                       "that the rows' check does not find")
                return tau
            saved = adapter.tensor_rows(key, start, stop, buffer)
        else:
            saved = adapter.tensor_rows(key, start, stop).to(device=self.device)
        if torch.promote_types(saved.dtype, self.dtype) == self.dtype == base_rows.dtype:
            return torch.sub(saved, base_rows, out=out)
        if out is None:
            return saved.to(dtype=self.dtype) - base_rows
        return torch.sub(saved.to(dtype=self.dtype), base_rows, out=out)

    # -- preparation, once per tensor ------------------------------------------------------------
    def _cache(self, index: int) -> list[object]:
        with self._lock:
            if index not in self._caches:
                self._caches[index] = [self._prepare(index, item) for item in self.plan.by_adapter[index]]
            return self._caches[index]

    def _prepare(self, index: int, item: Contribution) -> object:
        adapter = self.adapters[index]
        if isinstance(item, LowRank):
            return _PreparedLowRank(_low_rank(adapter, item, self.device, self.dtype))
        if isinstance(item, Dora):
            assert item.module.magnitude_key is not None
            factors = _scaled(_low_rank(adapter, item, self.device, self.dtype), 1.0)
            return factors, self._vector(adapter, item.module.magnitude_key).reshape(-1)
        if isinstance(item, BiasShift):
            return self._vector(adapter, item.key) * item.scale
        return None  # SavedTensor: read row ranges lazily, it can be as large as the base tensor

    def _part(
        self, index: int, item: Contribution, prepared: object, base_rows: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        if isinstance(item, LowRank):
            assert isinstance(prepared, _PreparedLowRank)
            return prepared.scaled.rows(start, stop)
        if isinstance(item, BiasShift):
            assert isinstance(prepared, torch.Tensor)
            return prepared[start:stop].clone()  # callers own what they get
        if isinstance(item, Dora):
            factors, magnitude = prepared  # type: ignore[misc]
            adapted = base_rows + factors.rows(start, stop)
            norm = torch.linalg.vector_norm(adapted, dim=1)
            return (magnitude[start:stop] / norm).unsqueeze(1) * adapted - base_rows
        assert isinstance(item, SavedTensor)
        return self._saved_rows(index, item.key, base_rows, start, stop)
