"""Cont-Squeeze (paper Sec. 4.1): Post-Squeeze r_src -> r_tgt, then M more steps at r_tgt with a 100-step
warmup and r_tgt's learning rate. With ``source=DIR`` the finished direct run in DIR is the source (a sweep
trains it once); without, this run trains r_src for N steps first.

  python -m lora_squeeze.main --config=configs/cont_squeeze.py:task=mmlu,src=128,tgt=1,extra=200 --workdir=...
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
      lr_src=0.003,
      lr_tgt=0.03,
      source="",
      seed=42,
      model="gemma3_4b",
      checkpoint="",
      runlocal=False,
      method="efficient",
  )
  c = config_lib.base_config()
  c.mode = "cont_squeeze"
  c.source_rank, c.target_rank = arg.src, arg.tgt
  c.lora.rank = arg.src
  c.steps, c.extra_steps = arg.steps, arg.extra
  c.lr_by_rank = {f"r{arg.src}": arg.lr_src, f"r{arg.tgt}": arg.lr_tgt}
  c.rank_change_warmup = 100
  c.source_workdir = arg.source
  c.squeeze.method = arg.method
  config_lib.apply_run_args(c, arg)
  return c
