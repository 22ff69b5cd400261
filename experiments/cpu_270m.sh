#!/usr/bin/env bash
# The CPU-scale reproduction in experiments/results/cpu_270m/: the real Gemma 3 270M, offline data
# (configs/paper.py `runlocal`), the heatmap + table1 sweeps and a seed sweep, then every figure/table script
# and experiments/claims.py (the paper's claims as paired comparisons on the same held-out examples).
# Resumable: rerunning skips finished cells. Usage: bash experiments/cpu_270m.sh [RUN_DIR]
# About 2 minutes per training cell on 2 CPU cores (32 steps + loading + a 100-example evaluation): the
# 48 cells of the three tasks take about an hour and a half.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/cpu_270m}"
OUT=experiments/results/cpu_270m
PY="${PYTHON:-.venv/bin/python}"
ARGS="${CPU_ARGS:-runlocal,tasks=obqa+siqa+arc_e,ranks=1+2+4+8+16+32,sources=16+32,schemes=standard+min_steps}"
SEEDS="${CPU_SEEDS:-runlocal,artefact=lr_grid,tasks=arc_e,ranks=4,lr_grid=0.1,seeds=43+44}"
"$PY" -m lora_squeeze.sweep --config="configs/paper.py:artefact=heatmap+table1,${ARGS}" --workdir="$RUN"
"$PY" -m lora_squeeze.sweep --config="configs/paper.py:${SEEDS}" --workdir="$RUN"
mkdir -p "$OUT/store/results"
cp "$RUN"/results/*.json "$OUT/store/results/"   # the records (small); the cells' checkpoints stay in $RUN
for s in fig3_lr_transfer fig4_heatmap fig5_efficient_vs_standard fig6_retention table1_methods table3_seeds claims; do
  "$PY" "experiments/$s.py" --results "$OUT/store" --out "$OUT" --title "270M CPU" > /dev/null || echo "$s failed"
done
"$PY" experiments/appE_flops.py --out "$OUT" > /dev/null
echo "outputs: $OUT"
