#!/usr/bin/env bash
# Install (if needed) into .venv and run the whole test suite, slow real-model tests included.
#   bash launch/test.sh                 # everything (what CI runs)
#   bash launch/test.sh -m "not slow"   # the fast unit tests only
#   bash launch/test.sh tests/test_squeeze.py -k rsvd
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
# The formatter (pyproject.toml [tool.pyink]): a full run fails on unformatted code; a run of chosen tests warns.
if ! "$VENV/bin/python" -m pyink --check --quiet lora_squeeze tests experiments configs; then
  echo "[lora_squeeze] the files above are not formatted: run $VENV/bin/pyink lora_squeeze tests experiments configs" >&2
  for a in "$@"; do case "$a" in tests/*|*.py|*.py::*) selected=1 ;; esac; done
  [ -n "${selected:-}" ] || exit 1
fi
exec "$VENV/bin/python" -m pytest "$@"
