#!/usr/bin/env bash
# The suite against the newest releases of every dependency (torch stays at the CPU build 2.13.0), in its own
# venv (.venv-latest). With --write-constraints, a green run rewrites constraints.txt with what it installed:
# that is how the pins are refreshed. Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-latest}
WRITE=0
if [ "${1:-}" = "--write-constraints" ]; then WRITE=1; shift; fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade torch==2.13.0 -e '.[test,eval,verify,sweep,ray]'
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}  # derandomized, as scripts/test.sh
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
if [ "$WRITE" = 1 ]; then
  {
    echo "# Tested versions: what the suite last passed with. Used by scripts/demo.sh and scripts/test.sh"
    echo "# (pip install -c constraints.txt ...). Refresh: ./scripts/test_latest.sh --write-constraints"
    "$VENV/bin/pip" freeze --exclude-editable --disable-pip-version-check | grep -v -i '^mergekit[_-]lite' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
  } > constraints.txt
  echo "constraints.txt rewritten from $VENV"
fi
