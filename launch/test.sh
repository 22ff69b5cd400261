#!/usr/bin/env bash
# Install (if needed) into .venv and run the whole test suite, slow real-model tests included.
#   bash launch/test.sh                 # everything (what CI runs)
#   bash launch/test.sh -m "not slow"   # the fast unit tests only
#   bash launch/test.sh tests/test_squeeze.py -k rsvd
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
