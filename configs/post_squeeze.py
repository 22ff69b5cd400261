"""Post-Squeeze (paper Sec. 3): squeeze the finished adapter of a direct run (``source=DIR``) to each target
rank and evaluate; no training.

  python -m lora_squeeze.main --config=configs/post_squeeze.py:source=runs/direct_r128,targets=64+32+8+1 --workdir=...
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      task="arc_e",
      source="",
      targets=(64, 32, 16, 8, 4, 2, 1),
      seed=42,
      model="gemma3_4b",
      checkpoint="",
      runlocal=False,
      method="efficient",
  )
  c = config_lib.base_config()
  c.mode = "post_squeeze"
  c.source_workdir = arg.source
  c.target_ranks = arg.targets
  c.squeeze.method = arg.method
  config_lib.apply_run_args(c, arg)
  return c
