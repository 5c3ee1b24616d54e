"""The one way the tests build a merge config (a helper module, not a test module): `merge_config` for any base
and inputs, `demo_config` for the demo (base + three adapters). Test modules bind their own defaults on top."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_lite import MergeConfig, merge

from .reference import load_checkpoint, plain_lora_task_vectors

DEMO_ADAPTERS = ("style", "math", "facts")


def config_data(base: Path | str, adapters: Sequence[Mapping[str, Any]], out: Path | str, method: str = "task_arithmetic",
                **extra: Any) -> dict[str, Any]:
    """A config mapping: `base`, adapter entries (path, weight, per-adapter keys), the output path (plus the keys of
    `output=`), and any other top-level key in `extra` (parameters, seed, models, …)."""
    return {"base_model": str(base), "method": method,
            "adapters": [{**entry, "path": str(entry["path"])} for entry in adapters],
            "output": {"path": str(out), **extra.pop("output", {})}, **extra}


def merge_config(base: Path | str, adapters: Sequence[Mapping[str, Any]], out: Path | str,
                 method: str = "task_arithmetic", folder: Path | None = None, **extra: Any) -> MergeConfig:
    """`config_data` checked as a MergeConfig; relative paths resolve against `folder` (default: the cwd)."""
    return MergeConfig.from_dict(config_data(base, adapters, out, method, **extra), folder)


def demo_adapters(demo: Path, weights: Sequence[float] = (1.0, -0.5, 2.0), names: Sequence[str] = DEMO_ADAPTERS,
                  per_adapter: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The demo adapters `names` with their weights (and per-adapter keys merged into each entry)."""
    own = per_adapter or [{}] * len(names)
    return [{"path": demo / "adapters" / name, "weight": w, **own[i]} for i, (name, w) in enumerate(zip(names, weights))]


def demo_config(demo: Path, out: Path, method: str, weights: Sequence[float] = (1.0, -0.5, 2.0),
                per_adapter: list[dict[str, Any]] | None = None, **extra: Any) -> MergeConfig:
    """A config merging the three demo adapters (weights in order) into `out`; `extra` as for `config_data`."""
    return merge_config(demo / "base", demo_adapters(demo, weights, per_adapter=per_adapter), out, method, **extra)


def assert_demo_merge(demo: Path, config: MergeConfig, delta: Callable[[str, list[torch.Tensor]], torch.Tensor],
                      chunk_rows: int | None = 7) -> None:
    """Merge `config` (demo adapters) on the CPU: each adapted tensor is base + `delta(name, float32 τs)` in float64
    (to 1e-5), every other tensor the base's bytes."""
    merged = load_checkpoint(merge(config, device="cpu", chunk_rows=chunk_rows, progress=False).output_dir)
    base = load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(demo / "adapters" / name) for name in DEMO_ADAPTERS]
    for name, tensor in merged.items():
        if name not in taus[0]:
            assert torch.equal(tensor, base[name])
            continue
        expected = base[name].double() + delta(name, [t[name].float() for t in taus])
        torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=1e-5, msg=name)
