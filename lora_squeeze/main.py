"""Entry point (DESIGN.md contract 6), thin as in big_vision / the flax examples:

  python -m lora_squeeze.main --config=configs/NAME.py[:k=v,...] --workdir=DIR [--config.key=value]

Runs, resumes, or (when DIR holds result.json) skips the run. Multi-host: set LORA_SQUEEZE_DISTRIBUTED=1 (or
``--distributed``) to call ``jax.distributed.initialize()`` first (``sharding.initialize_distributed``: the
coordinator detected on TPU VMs / SLURM, else from JAX_COORDINATOR_ADDRESS, LORA_SQUEEZE_NUM_PROCESSES,
LORA_SQUEEZE_PROCESS_ID). Every process runs this same command on the same (shared) workdir.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, result.json).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("LORA_SQUEEZE_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() before anything else.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top
  adapters.enable_compile_cache()
  if _DISTRIBUTED.value:
    from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()
  from lora_squeeze import train  # pylint: disable=g-import-not-at-top
  result = train.run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    summary = {k: result.get(k) for k in ("mode", "task", "final_rank", "steps", "wall_seconds", "metrics")}
    print(json.dumps(summary, indent=None, default=str))


if __name__ == "__main__":
  app.run(main)
