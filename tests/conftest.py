"""Shared fixtures: the committed demo (base + three adapters) and helpers to write configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
