"""Counter-based randomness: uniforms (DARE's keep-masks, DELLA's draws) as a pure function of (seed, adapter,
tensor name, flat index).

The flat index space of a tensor is cut into fixed blocks of 2¹⁶ entries; block b draws its uniforms from a
CPU generator seeded with a hash of (seed, adapter, tensor, b). Whatever the chunk size, tensor order or
device, entry j always gets the same uniform: a chunk generates the blocks it overlaps and slices them.
Drawing happens on the CPU (the CUDA generator is a different stream) and the mask moves to the device.
`UniformStream.apply_keep` multiplies a chunk by its keep-mask in place; the engine passes the fused kernel
(`mkl_dare_keep`, which draws the very uniforms torch.rand draws) as `fused` for CPU float32 chunks: the same
bytes. This module sits below the methods and the engine: it imports neither.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import torch

BLOCK = 1 << 16


def stream_key(seed: int, adapter: int, tensor: str) -> bytes:
    """The key of one (seed, adapter, tensor) stream."""
    return hashlib.blake2b(f"{seed}\x00{adapter}\x00{tensor}".encode(), digest_size=16).digest()


#: an in-place keep kernel: (τ chunk, flat start, the seeds of the blocks it overlaps, density) -> None
FusedKeep = Callable[[torch.Tensor, int, list[int], float], None]


def block_seed(key: bytes, block: int) -> int:
    """The generator seed of block `block` of stream `key`."""
    digest = hashlib.blake2b(block.to_bytes(8, "little"), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class UniformStream:
    """The uniforms of one (seed, adapter, tensor) stream.

    Chunks of a tensor may be drawn from several threads at once: each thread keeps its own generator and
    its own last block (a block cut by one chunk is usually finished by the next), so no lock is shared.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._local = threading.local()

    def _fill(self, block: int, out: torch.Tensor) -> None:
        """Write block `block`'s uniforms into `out` (BLOCK entries)."""
        generator = getattr(self._local, "generator", None)
        if generator is None:
            generator = self._local.generator = torch.Generator()
        generator.manual_seed(block_seed(self.key, block))
        torch.rand(BLOCK, generator=generator, out=out)

    def uniforms(self, start: int, count: int) -> torch.Tensor:
        """float32 uniforms in [0, 1) for flat indices [start, start + count) (on the CPU)."""
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        result = torch.empty(count)
        for block in range(first, last + 1):
            begin, end = max(block * BLOCK, start), min((block + 1) * BLOCK, start + count)
            target = result[begin - start : end - start]
            if end - begin == BLOCK:
                self._fill(block, target)
                continue
            kept = getattr(self._local, "last", None)
            if kept is None or kept[0] != block:  # a block cut by the chunk: keep it for this thread's next
                values = torch.empty(BLOCK)
                self._fill(block, values)
                kept = self._local.last = (block, values)
            target.copy_(kept[1][begin - block * BLOCK : end - block * BLOCK])
        return result

    def keep_mask(self, density: float, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Bernoulli(density) keep-mask for flat indices [start, start + count): 1.0 where kept (u < density)."""
        if density >= 1.0:
            return torch.ones(count, device=device)
        # sign(density − u) clamped at 0: 1 where u < density, else 0 (float ops; boolean kernels are slow)
        return (density - self.uniforms(start, count)).sign_().clamp_(min=0.0).to(device)

    def block_seeds(self, start: int, count: int) -> list[int]:
        """The seeds of the blocks that flat indices [start, start + count) overlap, in order."""
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        return [block_seed(self.key, b) for b in range(first, last + 1)]

    def apply_keep(self, tau: torch.Tensor, density: float, start: int, fused: FusedKeep | None = None) -> torch.Tensor:
        """τ ← τ · keep_mask(density, start, τ.numel()) in place (flat indices from `start`); returns τ.

        `fused` (the engine's kernel, for contiguous CPU float32 chunks only) draws the same uniforms in one pass.
        """
        if fused is None or tau.device.type != "cpu" or tau.dtype != torch.float32 or not tau.is_contiguous():
            return tau.mul_(self.keep_mask(density, start, tau.numel(), tau.device).view(tau.shape))
        count = tau.numel()
        if count == 0 or density >= 1.0:  # keep_mask is all ones: τ · 1 is τ
            return tau
        fused(tau, start, self.block_seeds(start, count), density)
        return tau


def keep_mask(key: bytes, density: float, start: int, count: int, device: torch.device) -> torch.Tensor:
    """0/1 Bernoulli(density) keep-mask of flat indices [start, start + count) of stream `key` (one-off use)."""
    return UniformStream(key).keep_mask(density, start, count, device)
