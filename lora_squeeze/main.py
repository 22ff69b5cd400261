"""Entry point, thin as in big_vision / the flax examples:

  python -m lora_squeeze.main --config=configs/NAME.py[:k=v,...] --workdir=DIR [--config.key=value]

Runs, resumes, or (when DIR holds result.json) skips the run. Multi-host: set LORA_SQUEEZE_DISTRIBUTED=1 (or
``--distributed``) to call ``jax.distributed.initialize()`` first (``sharding.initialize_distributed``: the
coordinator detected on TPU VMs / SLURM, else from JAX_COORDINATOR_ADDRESS, LORA_SQUEEZE_NUM_PROCESSES,
LORA_SQUEEZE_PROCESS_ID). Every process runs this same command on the same (shared) workdir.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lora_squeeze import config_lib
from lora_squeeze import runtime
from lora_squeeze import workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, result.json).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("LORA_SQUEEZE_DISTRIBUTED") == "1",
    "Call jax.distributed.initialize() before anything else.",
)
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "Start afresh even if --workdir holds a run: the old run's files move "
    "to WORKDIR/superseded/<time>/ (never mixed in). Without it, a workdir holding a run "
    "with other settings is refused.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.quiet_native_logs()
  # pylint: disable=g-import-not-at-top  (jax, sharding, train: after quiet_native_logs, which must see
  # the native logs of jax's backend and of TensorFlow)
  import jax

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.enable_compile_cache()
  if _DISTRIBUTED.value:
    from lora_squeeze import sharding

    sharding.initialize_distributed()
  from lora_squeeze import train

  try:
    result = train.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
  except workdir.UserError as e:  # the user's to fix: one line, no traceback
    print(f"lora_squeeze: error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    summary = {k: result.get(k) for k in ("mode", "task", "final_rank", "steps", "wall_seconds", "metrics")}
    print(json.dumps(summary, indent=None, default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, _CONFIG))
