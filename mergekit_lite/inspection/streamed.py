"""The parts of `merge inspect` that read whole tensors, a row chunk at a time: base norms, the row ranges a
pass visits (all rows, or a `--sample`), and the inner products of changes that have no factors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..sources.checkpoint import BaseCheckpoint

#: float32 elements per τ chunk at most: cache-sized chunks run faster than whole tensors (as in the engine)
CHUNK_ELEMENTS = 1 << 18
#: sampled row blocks per tensor (spread evenly over its rows)
SAMPLE_BLOCKS = 16


def chunk_rows(cols: int, adapters: int, max_memory: int) -> int:
    """Rows per chunk: T τ chunks, their trimmed copies and a few masks and base rows within `max_memory`."""
    per_row = max(cols, 1) * 4 * (2 * adapters + 6)
    return max(1, min(max_memory // per_row, max(CHUNK_ELEMENTS // max(cols, 1), 1)))


def row_ranges(rows: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering `rows` in steps of `step`."""
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def sample_ranges(rows: int, cols: int, entries: int, step: int) -> list[tuple[int, int]]:
    """Row ranges holding about `entries` entries of a rows×cols tensor: up to SAMPLE_BLOCKS contiguous blocks
    spread evenly from the first row to the last (never overlapping), each split into chunks of `step` rows;
    all rows when the tensor is no larger than the sample."""
    wanted = max(1, entries // max(cols, 1))
    if wanted >= rows:
        return row_ranges(rows, step)
    blocks = min(SAMPLE_BLOCKS, wanted)
    size = wanted // blocks
    starts = [(block * (rows - size)) // max(blocks - 1, 1) for block in range(blocks)]
    return [(first + a, first + b) for first in starts for a, b in row_ranges(size, step)]


def base_square_norm(base: BaseCheckpoint, name: str, ranges: Iterable[tuple[int, int]]) -> float:
    """‖W‖²_F of a base tensor, read a row range at a time and summed in float64."""
    total = 0.0
    for start, stop in ranges:
        rows = base.read_rows(name, start, stop).reshape(-1).to(torch.float64)
        total += float(torch.dot(rows, rows))  # ~2x faster than vector_norm's float64 reduction of bf16
    return total


def dense_inner(build: Callable[[Sequence[int], int, int, None], list[torch.Tensor]], adapters: Sequence[int],
                ranges: Sequence[tuple[int, int]], mapper: Callable[..., Iterable[torch.Tensor]] = map) -> torch.Tensor:
    """⟨τᵢ, τⱼ⟩ (float64) of changes that have no factors (DoRA, saved tensors): `build(adapters, start, stop,
    None)` gives the τᵢ rows of a range; the ranges' parts run through `mapper` and are summed in order."""
    def part(start: int, stop: int) -> torch.Tensor:
        flat = [c.reshape(-1).to(torch.float64) for c in build(adapters, start, stop, None)]
        inner = torch.zeros(len(flat), len(flat), dtype=torch.float64)
        for i in range(len(flat)):  # dot products, not a GEMM: no BLAS packing buffers in every worker thread
            for j in range(i, len(flat)):
                inner[i, j] = inner[j, i] = torch.dot(flat[i], flat[j]).cpu()
        return inner

    inner = torch.zeros(len(adapters), len(adapters), dtype=torch.float64)
    for value in mapper(part, *zip(*ranges)):
        inner += value
    return inner
