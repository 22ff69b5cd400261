#!/usr/bin/env bash
# Run one config on every worker of a Cloud TPU VM slice (one process per host; JAX detects the coordinator,
# the process count and each process id on TPU VMs by itself).
#
#   bash launch/tpu_vm.sh TPU_NAME ZONE configs/in_squeeze.py:src=128,tgt=1 /mnt/shared/runs/x [--config.k=v ...]
#
# 1. copies this checkout to ~/lora_squeeze on every worker (gcloud ... scp --worker=all),
# 2. installs the pinned stack with libtpu into ~/lora_squeeze/.venv on every worker (launch/_venv.sh with
#    LORA_SQUEEZE_EXTRA=tpu; a second launch installs nothing),
# 3. runs `python -m lora_squeeze.main` (or $LORA_SQUEEZE_ENTRY) on all workers at once with LORA_SQUEEZE_DISTRIBUTED=1.
# The workdir must be one directory all workers share (an NFS / Filestore / gcsfuse mount; train.run uses
# local paths, not gs:// URLs): orbax writes each
# checkpoint from all processes, only process 0 writes metrics.jsonl / result.json / the adapter json.
# Relaunching the same command resumes from the last checkpoint. Set PROJECT=... to pass --project.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU="$1"; ZONE="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
EXTRA_ARGS="$(printf ' %q' "$@")"

tar -C "$ROOT" --exclude=.venv --exclude=.git -czf /tmp/lora_squeeze_src.tgz .
"${GCLOUD[@]}" scp /tmp/lora_squeeze_src.tgz "$TPU":/tmp/lora_squeeze_src.tgz --worker=all "${COMMON[@]}"
"${GCLOUD[@]}" ssh "$TPU" --worker=all "${COMMON[@]}" --command="
  set -e; mkdir -p ~/lora_squeeze && tar -C ~/lora_squeeze -xzf /tmp/lora_squeeze_src.tgz
  cd ~/lora_squeeze && LORA_SQUEEZE_EXTRA=tpu bash -c 'source launch/_venv.sh'
  LORA_SQUEEZE_DISTRIBUTED=1 .venv/bin/python -m ${LORA_SQUEEZE_ENTRY:-lora_squeeze.main} --config=$(printf %q "$CONFIG") \
    --workdir=$(printf %q "$WORKDIR")$EXTRA_ARGS"
