"""merge sweep --backend ray on a local Ray instance (2 CPUs, started here): the same leaderboard as the local
backend, also when one actor is killed during the sweep (its point is retried on another)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")
ray = pytest.importorskip("ray")

from mergekit_lite.evaluation.tasks import SUITE_DIR  # noqa: E402
from mergekit_lite.sweep import load_sweep_config, run_sweep  # noqa: E402
from mergekit_lite.sweep.backends import ACTOR_PREFIX, RAY_NAMESPACE  # noqa: E402
from mergekit_lite.sweep.run import CACHE_DIR  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ["add", "capitals"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _config(folder: Path) -> Path:
    data = {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in TASKS],
            "sweep": {"method": ["ties"], "parameters": {"lambda": [0.5, 1.0], "density": [0.5]}},
            "eval": {"tasks": TASKS, "limit": 12, "batch_size": 16}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _board(result: Any) -> list[tuple[str, Any]]:
    return [(row.name, row.result["scores"]) for row in result.rows] + \
        [(row.name, row.result["scores"]) for row in result.test_rows]


def test_ray_backend_gives_the_local_leaderboard_even_when_an_actor_dies(local_ray: None, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path)
    local = run_sweep(load_sweep_config(config), tmp_path / "local", progress=False, device="cpu")
    out = tmp_path / "ray"
    done: dict[str, Any] = {}

    def sweep() -> None:
        try:
            done["result"] = run_sweep(load_sweep_config(config), out, backend="ray", workers=2, progress=False)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            done["error"] = error

    caplog.set_level(logging.WARNING, logger="mergekit_lite.sweep.backends")
    thread = threading.Thread(target=sweep)
    thread.start()
    deadline = time.monotonic() + 180
    while not list((out / CACHE_DIR).glob("*.json")):
        assert thread.is_alive() and time.monotonic() < deadline, done
        time.sleep(0.05)
    ray.kill(ray.get_actor(f"{ACTOR_PREFIX}0", namespace=RAY_NAMESPACE), no_restart=True)
    thread.join(timeout=300)
    assert "error" not in done, done.get("error")
    result = done["result"]
    assert "died" in caplog.text
    assert result.backend == "ray" and result.workers == 2
    assert _board(result) == _board(local)
    assert result.best.name == local.best.name
