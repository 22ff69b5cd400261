#!/usr/bin/env bash
# Fan a sweep's cells out, one launch per cell (lora_squeeze/sweep.py; the results store is DIR/results/).
#
#   bash launch/sweep.sh local CONFIG DIR                         # one process per cell, in order, here
#   SBATCH_ARGS="--nodes=1 --ntasks-per-node=8 --gpus-per-task=1" \
#     bash launch/sweep.sh slurm CONFIG DIR                       # one sbatch job per cell (launch/slurm.sh);
#                                                                 # Post-/Cont-Squeeze cells wait for their source
#   bash launch/sweep.sh tpu CONFIG DIR TPU_NAME ZONE             # one TPU-VM launch per cell, in order
#
# CONFIG is a sweep config (e.g. configs/quickstart.py[:args]); DIR must be shared by all hosts. Finished cells
# are skipped when relaunched (their results/NAME.json says ok), so rerunning the same command completes a sweep.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
MODE="$1"; CONFIG="$2"; DIR="$3"; shift 3
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${LORA_SQUEEZE_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
mapfile -t CELLS < <("$PY" -m lora_squeeze.sweep --config="$CONFIG" --workdir="$DIR" --list)
declare -A JOB
for line in "${CELLS[@]}"; do
  read -r CELL DEPS <<<"$line"
  case "$MODE" in
    local)
      "$PY" -m lora_squeeze.sweep --config="$CONFIG" --workdir="$DIR" --cell="$CELL" || echo "cell $CELL failed (recorded)";;
    slurm)
      DEP=""
      for d in ${DEPS//,/ }; do DEP="${DEP:+$DEP:}${JOB[$d]}"; done
      # shellcheck disable=SC2086
      JOB[$CELL]=$(LORA_SQUEEZE_ENTRY=lora_squeeze.sweep sbatch --parsable ${SBATCH_ARGS:-} \
        ${DEP:+--dependency=afterany:$DEP} --job-name="ls_$CELL" launch/slurm.sh "$CONFIG" "$DIR" --cell="$CELL")
      echo "submitted $CELL as job ${JOB[$CELL]}${DEP:+ (after $DEP)}";;
    tpu)
      [ $# -ge 2 ] || { echo "tpu mode needs TPU_NAME ZONE"; exit 2; }
      LORA_SQUEEZE_ENTRY=lora_squeeze.sweep bash launch/tpu_vm.sh "$1" "$2" "$CONFIG" "$DIR" --cell="$CELL" \
        || echo "cell $CELL failed (recorded)";;
    *) echo "unknown mode $MODE (local | slurm | tpu)"; exit 2;;
  esac
done
if [ "$MODE" = local ]; then "$PY" -m lora_squeeze.sweep --config="$CONFIG" --workdir="$DIR" || true; fi  # report
echo "[lora_squeeze] sweep results: $DIR/results/"
