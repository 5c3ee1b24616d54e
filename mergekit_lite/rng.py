"""Counter-based randomness: DARE keep-masks as a pure function of (seed, adapter, tensor name, flat index).

A stream RNG would make the mask depend on chunk size, tensor order and device; a hash of the counter does
not. Integer ops are kept below 2⁶³ (16-bit split multiplies), so CPU and CUDA agree bit for bit.
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF


def stream_key(seed: int, adapter: int, tensor: str) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, adapter, tensor) stream."""
    digest = hashlib.blake2b(f"{seed}\x00{adapter}\x00{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² for int64 x < 2³², without int64 overflow."""
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (high + x * (constant & 0xFFFF)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the 'lowbias32' constants of C. Wellons)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_bits(key: tuple[int, int], start: int, count: int, device: torch.device) -> torch.Tensor:
    """32-bit hashes (as int64) of flat indices [start, start + count) under `key`."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    low = index & _MASK32
    high = index >> 32
    return _mix32(_mix32(low ^ key[0]) ^ ((high + key[1]) & _MASK32))


def keep_mask(key: tuple[int, int], density: float, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep-mask for flat indices [start, start + count): True where kept."""
    if density >= 1.0:
        return torch.ones(count, dtype=torch.bool, device=device)
    threshold = int(density * 2**32)
    return uniform_bits(key, start, count, device) < threshold
