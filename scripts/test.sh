#!/usr/bin/env bash
# Install mergekit_lite with its test extra into .venv (CPU torch) and run the whole suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"
