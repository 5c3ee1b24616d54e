"""Counter-based randomness: DARE keep-masks as a pure function of (seed, adapter, tensor name, flat index).

The flat index space of a tensor is cut into fixed blocks of 2¹⁶ entries; block b draws its uniforms from a
CPU generator seeded with a hash of (seed, adapter, tensor, b). Whatever the chunk size, tensor order or
device, entry j always gets the same uniform: a chunk generates the blocks it overlaps and slices them.
Drawing happens on the CPU (the CUDA generator is a different stream) and the mask moves to the device.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 1 << 16


def stream_key(seed: int, adapter: int, tensor: str) -> bytes:
    """The key of one (seed, adapter, tensor) stream."""
    return hashlib.blake2b(f"{seed}\x00{adapter}\x00{tensor}".encode(), digest_size=16).digest()


def _block_seed(key: bytes, block: int) -> int:
    digest = hashlib.blake2b(block.to_bytes(8, "little"), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class UniformStream:
    """The uniforms of one (seed, adapter, tensor) stream; remembers its last block for the next chunk."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._generator = torch.Generator()
        self._last: tuple[int, torch.Tensor] | None = None

    def _block(self, block: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == block:
            return self._last[1]
        self._generator.manual_seed(_block_seed(self.key, block))
        values = torch.rand(BLOCK, generator=self._generator)
        self._last = (block, values)
        return values

    def uniforms(self, start: int, count: int) -> torch.Tensor:
        """float32 uniforms in [0, 1) for flat indices [start, start + count) (on the CPU)."""
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        blocks = [self._block(block) for block in range(first, last + 1)]
        joined = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        offset = start - first * BLOCK
        return joined[offset : offset + count]

    def keep_mask(self, density: float, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Bernoulli(density) keep-mask for flat indices [start, start + count): True where kept."""
        if density >= 1.0:
            return torch.ones(count, dtype=torch.bool, device=device)
        return (self.uniforms(start, count) < density).to(device)


def keep_mask(key: bytes, density: float, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep-mask of flat indices [start, start + count) of stream `key` (one-off use)."""
    return UniformStream(key).keep_mask(density, start, count, device)
