"""Direct LoRA fine-tuning at one rank (the paper's baseline): N steps of Adafactor, 1000-step warmup.

Paper scale (Gemma 3 4B IT on TPU/GPU; batch 8, length 1024, 10k steps):
  python -m lora_squeeze.main --config=configs/direct.py:task=anli_r2,rank=8,lr=0.01 --workdir=...
CPU scale (``runlocal``: the real Gemma 3 270M, the offline data, short runs):
  python -m lora_squeeze.main --config=configs/direct.py:runlocal,task=arc_e,rank=8 --workdir=...
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, task="arc_e", rank=8, lr=0.01, seed=42, steps=10_000, model="gemma3_4b", checkpoint="", runlocal=False
  )
  c = config_lib.base_config()
  c.mode = "direct"
  c.lora.rank = arg.rank
  c.learning_rate = arg.lr
  c.steps = arg.steps
  config_lib.apply_run_args(c, arg)
  return c
