"""A pinned copy of the package for benchmarks: edits made to the tree meanwhile change no timed run.

    .venv/bin/python benchmarks/snapshot.py /tmp/after                  # the working tree as it is now
    .venv/bin/python benchmarks/snapshot.py /tmp/before --rev HEAD~1    # a commit's Python files
    .venv/bin/python benchmarks/shape_7b.py --keep --merge-command "$PWD/.venv/bin/python /tmp/after/merge.py" \\
        --variant "before=$PWD/.venv/bin/python /tmp/before/merge.py"

The copy holds mergekit_lite/ (from the working tree, or from `--rev` through `git archive`) and the compiled kernel
library of the working tree (so before and after run the same C code unless the change is the kernel), plus a
`merge.py` that runs the copy's CLI with the copy first on the import path. The folder must not exist yet.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = """import sys
sys.path.insert(0, {folder!r})
from mergekit_lite.cli import main
sys.argv[0] = "merge"
sys.exit(main())
"""


def snapshot(target: Path, rev: str | None) -> Path:
    """Copy the package (working tree or `rev`) and the built kernels into `target`; return its runner."""
    target.mkdir(parents=True)
    if rev is None:
        shutil.copytree(ROOT / "mergekit_lite", target / "mergekit_lite",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        archive = subprocess.run(["git", "archive", "--format=tar", rev, "mergekit_lite"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
        for built in (ROOT / "mergekit_lite").rglob("*.so"):
            destination = target / built.relative_to(ROOT)
            if not destination.exists():
                shutil.copy2(built, destination)
    runner = target / "merge.py"
    runner.write_text(RUNNER.format(folder=str(target)))
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path, help="a new folder")
    parser.add_argument("--rev", default=None, help="a git revision (default: the working tree as it is)")
    args = parser.parse_args()
    if args.target.exists():
        raise SystemExit(f"snapshot: {args.target} exists; name a new folder")
    runner = snapshot(args.target, args.rev)
    print(f"{sys.executable} {runner}")


if __name__ == "__main__":
    main()
