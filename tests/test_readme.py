"""The README stays true: its Python example runs, and CI runs its two quick-start commands."""

from __future__ import annotations

import re

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_python_api_example_runs(monkeypatch) -> None:
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block, "README lost its Python API example"
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(block.group(1), namespace)  # noqa: S102 - our own README
    assert (namespace["result"].output_dir / "model.safetensors").is_file()


def test_ci_runs_the_quick_start_commands() -> None:
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S)
    assert quick_start
    commands = [line.strip() for line in quick_start.group(1).splitlines() if line.strip()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert all(command in ci for command in commands)
