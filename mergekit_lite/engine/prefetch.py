"""Read ahead: run the engine's reads in a background thread so disk and compute overlap.

Reads are positional (pread), release the GIL, and are consumed strictly in order; at most `depth` results
wait, so memory stays bounded by a couple of chunks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Runs `jobs` in order in one worker thread, `depth` ahead of `next()`."""

    def __init__(self, jobs: Iterable[Callable[[], T]], depth: int = 2,
                 initializer: Callable[[], object] | None = None) -> None:
        self._jobs = iter(jobs)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead", initializer=initializer)
        self._pending: deque[Future[T]] = deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        job = next(self._jobs, None)
        if job is not None:
            self._pending.append(self._pool.submit(job))

    def next(self) -> T:
        """The next job's result (re-raises its error)."""
        future = self._pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        """Stop reading ahead; pending reads are cancelled or left to finish."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
