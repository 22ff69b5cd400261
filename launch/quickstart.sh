#!/usr/bin/env bash
# Install (if needed) into .venv and run the quickstart.
# Until configs/quickstart.py exists (train loop issue), the quickstart runs the squeeze benchmark and a
# real-model check: the real Gemma 3 270M (offline, from PyPI) answers "The capital of France is".
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
if [ -f configs/quickstart.py ]; then
  exec "$VENV/bin/python" -m lora_squeeze.main --config=configs/quickstart.py --workdir="${WORKDIR:-workdirs/quickstart}"
fi
"$VENV/bin/python" - <<'PY'
import jax.numpy as jnp
from lora_squeeze import models
m = models.load("gemma3_270m")
ids = m.tokenizer.encode("The capital of France is", add_bos=True)
logits = m.transformer.apply({"params": m.params}, jnp.asarray([ids])).logits[0, -1]
print("Gemma 3 270M, top-5 after 'The capital of France is':",
      [m.tokenizer.decode([int(i)]) for i in jnp.argsort(-logits)[:5]])
PY
"$VENV/bin/python" experiments/squeeze_speed.py --quick --out workdirs/quickstart/squeeze_speed.md
echo "[lora_squeeze] quickstart outputs: workdirs/quickstart/squeeze_speed.md"
