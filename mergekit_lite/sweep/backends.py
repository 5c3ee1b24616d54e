"""Where a sweep's evaluations run: in this process (`local`), or on Ray actors that each hold the base once.

Both take jobs and yield (job, result) as results come in; the driver alone reads and writes the cache, so the
leaderboard does not depend on the backend. A Ray actor that dies mid-point has its point retried on another
(a new actor is started when none is left), so a lost worker costs time, never a point.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Protocol

from ..errors import MergeError
from ..evaluation.tasks import TaskSelection
from .worker import Job, Worker, WorkerSpec

logger = logging.getLogger(__name__)

#: Ray namespace and actor name prefix (a test or an operator finds the actors by name)
RAY_NAMESPACE = "mergekit_lite_sweep"
ACTOR_PREFIX = "sweep_worker_"
#: attempts of one job before its point is reported failed (actors dying again and again)
MAX_ATTEMPTS = 3


class Backend(Protocol):
    """Runs jobs and yields each with its result ({"scores", ...} or {"error": one line})."""

    workers: int

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]: ...

    def close(self) -> None: ...


def _evaluate(worker: Worker, job: Job) -> dict[str, Any]:
    """A job's result; a point the engine refuses (a config error only its tensors reveal) is an error row."""
    try:
        return worker.evaluate(job)
    except MergeError as error:
        return {"error": str(error)}


class LocalBackend:
    """One worker in this process: the base loaded once, points evaluated one after another."""

    workers = 1

    def __init__(self, spec: WorkerSpec, selections: dict[str, TaskSelection] | None = None) -> None:
        self.worker = Worker(spec, selections)

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        """Evaluate each job in order."""
        for job in jobs:
            yield job, _evaluate(self.worker, job)

    def close(self) -> None:
        """Nothing to release (the model goes with the backend)."""


class _RayWorker:
    """The body of a Ray actor: a Worker built inside the actor's process."""

    def __init__(self, spec: WorkerSpec) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        self.worker = Worker(spec)

    def evaluate(self, job: Job) -> dict[str, Any]:
        """One job's result."""
        return _evaluate(self.worker, job)

    def ready(self) -> bool:
        """True once the base is loaded and the tasks built."""
        return True


class RayBackend:
    """Ray actors, each holding the base model once (and asking for a GPU when the cluster has them)."""

    def __init__(self, spec: WorkerSpec, workers: int | None = None, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MergeError("--backend ray needs Ray: pip install 'mergekit_lite[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        resources = ray.cluster_resources()
        self._gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        self.workers = workers or max(1, int(resources.get("GPU", 0)) if self._gpus else int(resources.get("CPU", 1)))
        # the actors pick their own device: the driver may have no GPU while the cluster's nodes do
        self._spec = replace(spec, options=replace(spec.options, device="cuda" if self._gpus else "cpu"))
        self._actor_class = ray.remote(num_cpus=1, num_gpus=self._gpus)(_RayWorker)
        self._count = 0
        self.actors = [self._new_actor() for _ in range(self.workers)]

    def _new_actor(self) -> Any:
        name = f"{ACTOR_PREFIX}{self._count}"
        self._count += 1
        return self._actor_class.options(name=name, namespace=RAY_NAMESPACE).remote(self._spec)

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        """Keep every actor busy with one job; a dead actor's job goes back to the queue, to another actor."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        pending: deque[tuple[Job, int]] = deque((job, 0) for job in jobs)
        running: dict[Any, tuple[Any, Job, int]] = {}
        idle = list(self.actors)
        while pending or running:
            while idle and pending:
                actor = idle.pop(0)
                job, attempts = pending.popleft()
                running[actor.evaluate.remote(job)] = (actor, job, attempts)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, job, attempts = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError:  # the actor died (killed, out of memory, node lost): retry the job elsewhere
                logger.warning("sweep: a Ray worker died during '%s'; retrying it on another", job.name)
                self.actors = [a for a in self.actors if a is not actor]
                replacement = self._new_actor()
                self.actors.append(replacement)
                idle.append(replacement)
                if attempts + 1 >= MAX_ATTEMPTS:
                    yield job, {"error": f"Ray workers died {MAX_ATTEMPTS} times while evaluating this point"}
                else:
                    pending.appendleft((job, attempts + 1))
                continue
            except RayTaskError as error:
                idle.append(actor)
                yield job, {"error": f"{type(error.cause).__name__}: {error.cause}".splitlines()[0]}
                continue
            idle.append(actor)
            yield job, result

    def close(self) -> None:
        """Stop the actors, and the Ray instance when this backend started it."""
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self._started:
            self._ray.shutdown()
