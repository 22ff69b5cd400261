#!/usr/bin/env bash
# The CPU science campaign on the real Gemma 3 270M (offline data, packed 8 x 128 rows of ~1k real tokens):
#   rates  one task (SIQA), ranks 1 and 32, each rate of {0.003, 0.01, 0.03, 0.1}, short runs (40 steps, about
#          one epoch): each rank's rate = its lowest held-out NLL (experiments/rank_pilot.py rates)
#   pilot  five tasks, ranks 1 and 32 at their own rates, 120 steps, evaluated on the WHOLE offline held-out
#          half: does rank matter here? (experiments/rank_pilot.py report)
# The campaign proper, on SIQA at N = 40 steps (about one epoch of its 971 training examples: at 40 steps r=32
# beats r=1 on held-out NLL, the paper's direction; at 120 steps r=32 overfits). Sweep directory $RUN/rates
# (evaluated on the first 300 held-out examples, like the rate search, so its cells pair with it):
#   grid     Table 2: ranks 2, 4, 8, 16 at 0.01, 0.03, 0.1 (ranks 1 and 32 have the whole grid, 0.003-0.3)
#   fig3     Fig. 3: every rank at r=32's rate, Post-Squeeze from r=32 to every lower rank
#   heatmap  Fig. 4/5/6: every rank at its own rate, Post-Squeeze from every source, efficient and rsvd
# and $RUN/table1 (the WHOLE held-out half, 983 examples: the claims with the most power):
#   table1   Table 1 at r_src = 32, r_tgt = 1, M = 10: zero-shot, direct N and N + M, Post-, Cont-Squeeze,
#            In-Squeeze standard and minimum-steps, each with a fresh and a carried optimizer state
#   seeds    Table 3: its seed-study cells (direct r=1, r=32, Post-Squeeze, direct N + M, In-Squeeze
#            minimum-steps) at seeds 43 and 44
#   seeds2   beyond Table 3: Cont-Squeeze and In-Squeeze standard at seeds 43 and 44 (their Table 1 verdicts
#            against direct training had one seed; the seed-to-seed spread reversed another claim's NLL sign)
#   autorank In-Squeeze 32 -> 4 with per-module ranks (V_r >= 0.9) against uniform In-Squeeze 32 -> 4, 2, 1
#            and Post-Squeeze 32 -> 4, 3, 2, 1 (experiments/auto_rank.py pairs it with those at its budget r_eq)
# Resumable and safe to rerun: finished cells are skipped (on a new machine too: each stage first copies the
# committed store's records into its sweep directory), a killed cell resumes from its checkpoints, a
# changed cell reruns (sweep.py). Each stage has its own sweep directory ($RUN/rates, $RUN/pilot: the two
# stages share cell names) and its own committed store (experiments/results/cpu_campaign/{rates,pilot}/:
# records and training curves, copied after each stage so that they can be committed as they land).
# Usage: bash experiments/cpu_campaign.sh [STAGE ...]
#   (default: rates pilot table1 seeds autorank grid fig3 heatmap seeds2)   RUN=runs/cpu_campaign
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
    # (Post-Squeeze and zero-shot cells train nothing: no curve. A bare `[ ] && cp` failing here ended the
    # whole script under set -e, after table1's first collect.)
    if [ -f "$d/result.json" ] && [ -f "$d/metrics.jsonl" ]; then cp "$d/metrics.jsonl" "$store/curves/$n.jsonl"; fi
  done
  return 0
}

seed() {  # $1 = stage: a new machine starts from the committed store, so finished cells are not rerun
  local run="$RUN/$1" store="$OUT/$1"
  mkdir -p "$run/results"
  [ -d "$store/results" ] && cp -n "$store"/results/*.json "$run/results/" 2>/dev/null || true
  return 0
}

# The campaign's sweeps: configs/paper.py on SIQA at N = 40, each stage adding its artefact.
SIQA="runlocal,tasks=siqa,steps=40"
campaign() {  # $1 = stage dir, $2 = eval.limit, $3 = configs/paper.py arguments, then --cell=NAME ... (all)
  seed "$1"
  "$PY" -m lora_squeeze.sweep --workdir="$RUN/$1" --config="configs/paper.py:$3" "${COMMON[@]}" \
    --config.eval.limit="$2" "${@:4}" || true
  collect "$1"
}
rates_of() {  # the rank's own rates (lowest held-out NLL of the rate search) for the ranks in $1 (1+32)
  "$PY" experiments/rank_pilot.py rates --results "$OUT/rates" --task siqa --lrs-only |
    tr + '\n' | grep -E "^(${1//+/|}):" | paste -sd+
}
reports() {  # every figure and table script that the stores can feed; a script without its cells says so
  # (each rank's rate by the campaign's own rule, the lowest held-out NLL: rates_of)
  local title="Gemma 3 270M, SIQA, CPU scale:" rule=(--rate-rule nll)
  for s in table2_lr_grid fig3_lr_transfer fig4_heatmap fig5_efficient_vs_standard fig6_retention; do
    "$PY" "experiments/$s.py" --results "$OUT/rates" --out "$OUT" --title "$title" "${rule[@]}" || true
  done
  for s in table1_methods table3_seeds; do
    "$PY" "experiments/$s.py" --results "$OUT/table1" --out "$OUT" --title "$title" "${rule[@]}" || true
  done
  "$PY" experiments/claims.py --results "$OUT/table1" --out "$OUT/table1" --title "$title" "${rule[@]}" || true
  "$PY" experiments/claims.py --results "$OUT/rates" --out "$OUT/rates" --title "$title" "${rule[@]}" || true
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(rates pilot table1 seeds autorank grid fig3 heatmap seeds2)
for stage in "${stages[@]}"; do
  case "$stage" in
    rates)
      seed rates
      "$PY" -m lora_squeeze.sweep --workdir="$RUN/rates" \
        --config="configs/paper.py:artefact=lr_grid,runlocal,tasks=siqa,ranks=1+32,lr_grid=0.003+0.01+0.03+0.1,steps=40" \
        "${COMMON[@]}" --config.eval.limit=300 || true
      # r=1's best rate was the grid's largest: one more rate above it, at both ends of the rank range.
      "$PY" -m lora_squeeze.sweep --workdir="$RUN/rates" \
        --config="configs/paper.py:artefact=lr_grid,runlocal,tasks=siqa,ranks=1+32,lr_grid=0.3,steps=40" \
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
    table1)
      LRS="$(rates_of 1+32)"; echo "[cpu_campaign] table1 rates: $LRS"
      campaign table1 0 "artefact=table1,$SIQA,ranks=1+32,src=32,tgt=1,extra=10,lrs=$LRS,optimizer_states=fresh+carry"
      reports ;;
    seeds)
      LRS="$(rates_of 1+32)"
      campaign table1 0 "artefact=table3,$SIQA,ranks=1+32,src=32,tgt=1,extra=10,lrs=$LRS,seeds=43+44"
      reports ;;
    seeds2)
      LRS="$(rates_of 1+32)"
      campaign table1 0 "artefact=table1,$SIQA,ranks=1+32,src=32,tgt=1,extra=10,lrs=$LRS,seeds=43+44,schemes=standard" \
        --cell=siqa_s43_cont_32to1_m10 --cell=siqa_s43_in_standard_32to1_m10 \
        --cell=siqa_s44_cont_32to1_m10 --cell=siqa_s44_in_standard_32to1_m10
      reports ;;
    autorank)
      LRS="$(rates_of 1+32)"
      campaign table1 0 "artefact=auto_rank,$SIQA,ranks=1+32,src=32,tgt=1,extra=10,lrs=$LRS,tau=0.9,auto_tgt=4"
      "$PY" experiments/auto_rank.py --results "$OUT/table1" --out "$OUT" || true ;;
    grid)
      campaign rates 300 "artefact=lr_grid,$SIQA,ranks=2+4+8+16,lr_grid=0.01+0.03+0.1"
      reports ;;
    fig3)
      LR32="$(rates_of 32)"; LR32="${LR32#32:}"
      campaign rates 300 "artefact=fig3,$SIQA,ranks=1+2+4+8+16+32,lr=$LR32"
      reports ;;
    heatmap)
      LRS="$(rates_of 1+2+4+8+16+32)"; echo "[cpu_campaign] heatmap rates: $LRS"
      campaign rates 300 "artefact=heatmap,$SIQA,ranks=1+2+4+8+16+32,lrs=$LRS"
      reports ;;
    *) echo "unknown stage $stage (rates | pilot | table1 | seeds | seeds2 | autorank | grid | fig3 | heatmap)"; exit 2 ;;
  esac
done
