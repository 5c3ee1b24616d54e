"""Drive the engine's per-tensor elementwise core over dense τᵢ in row chunks, as the engine does (test helper)."""

from __future__ import annotations

import math

import torch

from mergekit_lite.engine.elementwise import SparseTensorMerge
from mergekit_lite.methods import get_method


def row_ranges(taus: list[torch.Tensor], chunk_rows: int, whole_rows: bool = False) -> list[tuple[int, int]]:
    """[start, stop) row chunks; a 1-D tensor stays one chunk for a per-row sparsifier (as the schedule does)."""
    rows = taus[0].shape[0] if taus[0].dim() else 1
    if whole_rows and taus[0].dim() < 2:
        return [(0, rows)]
    return [(s, min(s + chunk_rows, rows)) for s in range(0, rows, chunk_rows)]


def merger(method: str, taus: list[torch.Tensor], weights: list[float], params: dict, per_adapter: list[dict],
           ranges: list[tuple[int, int]], seed: int = 0, name: str = "t") -> SparseTensorMerge:
    """A SparseTensorMerge with its selection passes done over the chunks `ranges` cut."""
    sparse = SparseTensorMerge(get_method(method), name, taus[0].numel(), list(range(len(taus))), weights, params,
                               per_adapter, seed, shape=tuple(taus[0].shape))
    for i, tau in enumerate(taus):
        if sparse.needs_selection(i):
            sparse.prepare(i, lambda tau=tau: [tau[a:b] for a, b in ranges])
    return sparse


def _prepared(method: str, taus: list[torch.Tensor], weights: list[float], params: dict, per_adapter: list[dict],
              chunk_rows: int, seed: int, name: str) -> tuple[list[tuple[int, int]], int, SparseTensorMerge]:
    """The row chunks (as the method's sparsifier cuts them), elements per row, and the prepared merger."""
    whole_rows = get_method(method).phase.sparsifier.whole_rows  # type: ignore[union-attr]
    ranges = row_ranges(taus, chunk_rows, whole_rows)
    row_elems = math.prod(taus[0].shape[1:]) if taus[0].dim() > 1 else 1
    return ranges, row_elems, merger(method, taus, weights, params, per_adapter, ranges, seed, name)


def stream(method: str, taus: list[torch.Tensor], weights: list[float], params: dict, per_adapter: list[dict],
           chunk_rows: int, seed: int = 0, name: str = "t") -> torch.Tensor:
    """The merged delta through the torch path (`merge_chunk`), chunks in row order."""
    ranges, row_elems, sparse = _prepared(method, taus, weights, params, per_adapter, chunk_rows, seed, name)
    return torch.cat([sparse.merge_chunk({i: t[a:b] for i, t in enumerate(taus)}, a * row_elems) for a, b in ranges])


def stream_fused(method: str, taus: list[torch.Tensor], weights: list[float], params: dict, per_adapter: list[dict],
                 chunk_rows: int, seed: int = 0, name: str = "t") -> torch.Tensor:
    """0 + the merged delta through `merged_rows` (the fused kernels when built and on), chunks out of order."""
    ranges, row_elems, sparse = _prepared(method, taus, weights, params, per_adapter, chunk_rows, seed, name)
    out = torch.zeros_like(taus[0])
    for a, b in reversed(ranges):  # out of order: the tie counts were taken up front
        merged, finite = sparse.merged_rows(torch.zeros_like(taus[0][a:b]), {i: t[a:b].clone() for i, t in enumerate(taus)},
                                            a * row_elems, torch.float32)
        assert finite
        out[a:b] = merged
    return out
