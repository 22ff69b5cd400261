#!/usr/bin/env bash
# Run one config on a SLURM GPU cluster: one process per GPU, the coordinator from SLURM's environment
# (jax.distributed.initialize() detects SLURM_* itself: the first node of the allocation is the coordinator).
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 launch/slurm.sh \
#       configs/in_squeeze.py:src=128,tgt=1 /shared/runs/x [--config.mesh.fsdp=8 ...]
#
# Every task runs `python -m lora_squeeze.main` (or $LORA_SQUEEZE_ENTRY, e.g. lora_squeeze.sweep for one sweep cell)
# with LORA_SQUEEZE_DISTRIBUTED=1 on the same workdir, which
# must be on a filesystem all nodes share. Install first, once, on the shared checkout:
#   LORA_SQUEEZE_EXTRA=gpu bash -c 'source launch/_venv.sh'
# Resubmitting the same command resumes from the last checkpoint.
#SBATCH --job-name=lora_squeeze
#SBATCH --output=lora_squeeze-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
VENV="${LORA_SQUEEZE_VENV:-$ROOT/.venv}"
cd "$ROOT"
# srun starts one task per GPU (outside an allocation, run this script through sbatch).
exec srun --kill-on-bad-exit=1 env LORA_SQUEEZE_DISTRIBUTED=1 \
  "$VENV/bin/python" -m ${LORA_SQUEEZE_ENTRY:-lora_squeeze.main} --config="$CONFIG" --workdir="$WORKDIR" "$@"
