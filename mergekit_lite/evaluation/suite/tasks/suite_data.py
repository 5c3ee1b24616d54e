"""lm-eval `custom_dataset` hook: the suite's held-out test file, found next to this file whatever the cwd.

The suite ships inside the package (mergekit_lite/evaluation/suite/): tasks/ (this file and the YAMLs) and
data/<task>/ sit side by side there, in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"


def load(suite_task: str, **_: Any) -> dict[str, Any]:
    """Return {"test": Dataset} read from ../data/<suite_task>/test.jsonl (absolute, so any cwd works)."""
    import datasets

    path = DATA / suite_task / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild the suite with `python evals/build_suite.py` "
                                "in a mergekit_lite checkout, or reinstall mergekit_lite")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
