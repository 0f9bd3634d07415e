#!/usr/bin/env bash
# Set up a virtualenv with millpond and its test tools, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k pool -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,embedded]'
exec .venv/bin/python -m pytest "$@"
