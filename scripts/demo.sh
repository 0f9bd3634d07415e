#!/usr/bin/env bash
# Set up a virtualenv with millpond, then run a short demonstration of the pool.
# Uses $DATABASE_URL when set; otherwise starts a throwaway embedded PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[binary,fast,embedded]'
exec .venv/bin/millpond demo "$@"
