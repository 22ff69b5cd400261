"""In-Squeeze (paper Sec. 4.1): anneal the rank src -> src/2 -> ... -> tgt over N + M steps; ``scheme``
standard (steps ∝ rank) or min_steps (200 each, the rest ∝ rank). Each stage uses its rank's learning rate
(``lr_by_rank``) and re-warms over ``rank_change_warmup`` steps.

  python -m lora_squeeze.main --config=configs/in_squeeze.py:task=boolq,src=128,tgt=1,scheme=min_steps --workdir=...
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      task="arc_e",
      src=128,
      tgt=1,
      steps=10_000,
      extra=200,
      scheme="standard",
      lr=0.01,
      seed=42,
      model="gemma3_4b",
      checkpoint="",
      runlocal=False,
      method="efficient",
      change_warmup=100,
  )
  c = config_lib.base_config()
  c.mode = "in_squeeze"
  c.source_rank, c.target_rank = arg.src, arg.tgt
  c.lora.rank = arg.src
  c.steps, c.extra_steps = arg.steps, arg.extra
  c.scheme = arg.scheme
  c.learning_rate = arg.lr
  c.rank_change_warmup = arg.change_warmup
  c.squeeze.method = arg.method
  config_lib.apply_run_args(c, arg)
  return c
