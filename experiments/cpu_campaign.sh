#!/usr/bin/env bash
# The CPU science campaign on the real Gemma 3 270M (offline data, packed 8 x 128 rows of ~1k real tokens):
#   rates  one task (SIQA), ranks 1 and 32, each rate of {0.003, 0.01, 0.03, 0.1}, short runs (40 steps, about
#          one epoch): each rank's rate = its lowest held-out NLL (experiments/rank_pilot.py rates)
#   pilot  five tasks, ranks 1 and 32 at their own rates, 120 steps, evaluated on the WHOLE offline held-out
#          half: does rank matter here? (experiments/rank_pilot.py report)
# Resumable and safe to rerun: finished cells are skipped (on a new machine too: each stage first copies the
# committed store's records into its sweep directory), a killed cell resumes from its checkpoints, a
# changed cell reruns (sweep.py). Each stage has its own sweep directory ($RUN/rates, $RUN/pilot: the two
# stages share cell names) and its own committed store (experiments/results/cpu_campaign/{rates,pilot}/:
# records and training curves, copied after each stage so that they can be committed as they land).
# Usage: bash experiments/cpu_campaign.sh [STAGE ...]   (default: rates pilot)   RUN=runs/cpu_campaign
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${RUN:-runs/cpu_campaign}"
OUT=experiments/results/cpu_campaign
PY="${PYTHON:-.venv/bin/python}"
# Packed rows of 128 tokens, 8 rows a step; the answer budget is per row (WinoGrande rows hold up to 58 answer
# tokens, OBQA 50: measured over 40 batches).
COMMON=(--config.data.batch_size=8 --config.data.max_len=128 --config.data.pack=True
        --config.data.max_target_tokens=64 --config.checkpoint_every=20 --config.progress=False)
PILOT_TASKS="${PILOT_TASKS:-siqa+arc_e+obqa+winogrande+boolq}"

collect() {  # $1 = stage: its records + the loss curve of every finished cell, small files only
  local run="$RUN/$1" store="$OUT/$1"
  mkdir -p "$store/results" "$store/curves"
  cp "$run"/results/*.json "$store/results/" 2>/dev/null || true
  for d in "$run"/cells/*/; do
    n="$(basename "$d")"
    [ -f "$d/result.json" ] && cp "$d/metrics.jsonl" "$store/curves/$n.jsonl"
  done
  return 0
}

seed() {  # $1 = stage: a new machine starts from the committed store, so finished cells are not rerun
  local run="$RUN/$1" store="$OUT/$1"
  mkdir -p "$run/results"
  [ -d "$store/results" ] && cp -n "$store"/results/*.json "$run/results/" 2>/dev/null || true
  return 0
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(rates pilot)
for stage in "${stages[@]}"; do
  case "$stage" in
    rates)
      seed rates
      "$PY" -m lora_squeeze.sweep --workdir="$RUN/rates" \
        --config="configs/paper.py:artefact=lr_grid,runlocal,tasks=siqa,ranks=1+32,lr_grid=0.003+0.01+0.03+0.1,steps=40" \
        "${COMMON[@]}" --config.eval.limit=300 || true
      collect rates ;;
    pilot)
      LRS="$("$PY" experiments/rank_pilot.py rates --results "$OUT/rates" --task siqa --lrs-only)"
      echo "[cpu_campaign] pilot rates: $LRS"
      seed pilot
      "$PY" -m lora_squeeze.sweep --workdir="$RUN/pilot" \
        --config="configs/paper.py:artefact=direct,runlocal,tasks=$PILOT_TASKS,ranks=1+32,lrs=$LRS,steps=120" \
        "${COMMON[@]}" --config.eval.limit=0 || true
      collect pilot
      "$PY" experiments/rank_pilot.py report --results "$OUT/pilot" --out "$OUT" || true ;;
    *) echo "unknown stage $stage (rates | pilot)"; exit 2 ;;
  esac
done
