"""lm-eval `custom_dataset` hook: the suite's held-out test and validation files, found next to this file whatever
the cwd.

The suite ships inside the package (mergekit_lite/evaluation/suite/): tasks/ (this file and the YAMLs) and
data/<task>/ sit side by side there, in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"


#: The splits a suite task may have: test (what `merge eval` reports), validation (what `merge sweep` selects on).
SPLITS = ("test", "validation")


def load(suite_task: str, **_: Any) -> dict[str, Any]:
    """Return {"test": Dataset, "validation": Dataset} read from ../data/<suite_task>/<split>.jsonl (absolute, so any
    cwd works). The YAMLs evaluate `test_split: test`; `merge sweep` selects on `validation_split: validation`."""
    import datasets

    splits = {}
    for split in SPLITS:
        path = DATA / suite_task / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rebuild the suite with `python evals/build_suite.py` "
                                    "in a mergekit_lite checkout, or reinstall mergekit_lite")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return splits
