"""Shared fixtures: the committed demo (base + three adapters) and helpers to write configs.

Two tiers: tests marked `slow` (real signals, fuzzing, lm-eval end to end, the 100M-entry memory probe, anything
over about a second) and the rest. The fast tier, for edit-test loops (under a minute on two cores):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m "not slow"

`./scripts/test.sh` (what CI runs) runs both tiers, with the derandomized "ci" Hypothesis profile.

Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default "dev"; "ci" where the CI variable is set, as
Hypothesis itself does):
- "ci": derandomized (the same examples on every run, no example database), no deadline, and a failure prints
  the blob to replay it with @reproduce_failure;
- "dev": random examples on every run (each local run explores new inputs), failures are saved to and replayed
  from .hypothesis/, no deadline either (these tests check results, not timing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", derandomize=False, print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "evals" / "demo"


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo folder (rebuilt into a temp folder if it is missing from the checkout)."""
    if (DEMO / "base" / "model.safetensors").is_file():
        return DEMO
    from evals.fixtures import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def demo_copy(demo: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo (for tests that damage inputs)."""
    target = tmp_path / "demo"
    shutil.copytree(demo, target)
    return target


def write_config(folder: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    """Write a YAML config into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def demo_merge(demo: Path, out: Path, **changes: Any) -> dict[str, Any]:
    """A config over the demo: task arithmetic of the style adapter (weight 1) and the facts adapter (weight −1)
    into its base, writing to `out`; `changes` replace top-level keys."""
    return {
        "base_model": str(demo / "base"),
        "method": "task_arithmetic",
        "adapters": [{"path": str(demo / "adapters" / "style")}, {"path": str(demo / "adapters" / "facts"), "weight": -1}],
        "output": {"path": str(out)},
        **changes,
    }


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases, built once for the session and only read: Llama, Llama with attention biases (lora_bias),
    GPT-2 (Conv1D)."""
    from evals.fixtures import build_tiny_gpt2, build_tiny_llama

    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": build_tiny_llama(root / "llama"),
        "llama_bias": build_tiny_llama(root / "llama_bias", attention_bias=True),
        "gpt2": build_tiny_gpt2(root / "gpt2"),
    }
