#!/usr/bin/env bash
# Install mergekit_lite into .venv (CPU torch) and merge the shipped demo, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 -e .
HF_HUB_OFFLINE=1 "$VENV/bin/merge" run merge_configs/demo_task_arithmetic.yaml --overwrite "$@"
HF_HUB_OFFLINE=1 "$VENV/bin/merge" verify out/demo_task_arithmetic --no-progress
