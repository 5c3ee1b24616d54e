#!/usr/bin/env bash
# Install mergekit_lite with its test and eval extras into .venv (CPU torch) and run the whole suite, offline.
# One torch thread: the suite's tensors are tiny, and thread hand-offs cost more than they save.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[test,eval,verify,sweep,ray,quantize]'
# Every test, both tiers (the fast tier alone: `-m "not slow"`, see setup.cfg). Hypothesis runs its "ci" profile:
# derandomized, so every run tries the same examples (HYPOTHESIS_PROFILE=dev to explore new ones).
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest "$@"
