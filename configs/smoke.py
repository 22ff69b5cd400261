"""Smoke run: the tiny random Gemma 3, a 3-stage In-Squeeze 8 -> 4 -> 2 on the
synthetic lookup task; well under a minute on 2 CPU cores.

  python -m lora_squeeze.main --config=configs/smoke.py --workdir=/tmp/smoke
  python -m lora_squeeze.main --config=configs/smoke.py:steps=60,optimizer_state=carry --workdir=...
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=24, scheme="standard", optimizer_state="fresh", method="efficient", seed=42)
  c = config_lib.base_config()
  c.mode = "in_squeeze"
  c.model = "tiny"
  c.seed = arg.seed
  c.source_rank, c.target_rank = 8, 2
  c.lora.rank = 8
  c.steps, c.extra_steps = arg.steps, 0
  c.scheme, c.min_steps = arg.scheme, 4
  c.learning_rate = 0.03
  c.warmup_steps, c.rank_change_warmup = 4, 2
  c.squeeze.method, c.squeeze.optimizer_state = arg.method, arg.optimizer_state
  c.data.update(task="synthetic", source="synthetic", batch_size=4, max_len=16, max_target_tokens=4)
  c.eval.enabled = False
  c.checkpoint_every = 5
  c.tensorboard = False  # TensorFlow's import alone is seconds here; metrics.jsonl has everything
  c.log_every = 5
  return c
