"""The one progress helper: a byte-counting bar on stderr, silent when asked or when not a terminal."""

from __future__ import annotations

from typing import Protocol

from tqdm.auto import tqdm


class Progress(Protocol):
    """What the engine calls: advance by n bytes, then close."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


class _Silent:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def byte_progress(total: int, enabled: bool, description: str = "merging") -> Progress:
    """A progress bar over `total` bytes (tqdm), or a no-op when disabled."""
    if not enabled:
        return _Silent()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=description, dynamic_ncols=True)
