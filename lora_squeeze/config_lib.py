"""Helpers for the ``configs/*.py`` files (ml_collections, big_vision style).

Every config file defines ``get_config(arg=None)``; ``arg`` is the text after the colon in
``--config=configs/direct.py:rank=8,task=arc_e,runlocal`` and is parsed by ``parse_arg`` into typed values
(defaults given by the config decide the type). Unknown keys raise, naming the config file's accepted keys.
"""

from __future__ import annotations

import ml_collections

# The paper's learning-rate grid (Table 2 / Sec. 4): {0.001, 0.003, 0.01, 0.03, 0.1}.
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
PAPER_SEEDS = (42, 43, 44)
PAPER_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def _convert(text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  if isinstance(default, tuple):
    return tuple(_convert(t, default[0]) if default else t for t in text.split("+") if t)
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'rank=8,runlocal,ranks=8+4+2' -> ConfigDict(rank=8, runlocal=True, ranks=(8, 4, 2)) over ``defaults``.

  A bare key means True (booleans); tuples are written with '+' between items.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
    try:
      out[key] = _convert(value if "=" in item else "true", defaults[key])
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r}: {e}") from None
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """The fields every run config has, with the paper's values where the paper gives them."""
  c = ml_collections.ConfigDict()
  c.mode = "direct"
  c.model = "gemma3_4b"
  c.model_options = ml_collections.ConfigDict({})
  c.seed = 42
  c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=ml_collections.FieldReference(None, field_type=float),
                                          targets=("q", "k", "v", "o", "gate", "up", "down"),
                                          joint_kv=False, joint_gate_up=False))
  c.source_rank = 128
  c.target_rank = 1
  c.target_ranks = PAPER_RANKS
  c.ranks = ()  # explicit In-Squeeze ladder; empty = halvings source_rank -> target_rank
  c.source_workdir = ""
  c.steps = 10_000  # N (paper: 10k smaller / 15k larger datasets)
  c.extra_steps = 200  # M (paper: 200 or 700)
  c.scheme = "standard"  # In-Squeeze budget: standard | min_steps
  c.min_steps = 200
  c.learning_rate = 0.01
  c.lr_by_rank = ml_collections.ConfigDict({})  # {"r8": 0.01, ...}: the per-rank rate (paper Table 2)
  c.warmup_steps = 1000
  c.rank_change_warmup = 100
  c.squeeze = ml_collections.ConfigDict(dict(method="efficient", optimizer_state="fresh"))
  c.data = ml_collections.ConfigDict(dict(task="arc_e", source="tfds", batch_size=8, max_len=1024,
                                          max_target_tokens=64, train_split="", eval_split="",
                                          shuffle_buffer=0, num_workers=0))
  c.eval = ml_collections.ConfigDict(dict(enabled=True, limit=0, batch_size=8))
  # Device mesh (lora_squeeze/sharding.py), used when there is more than one device: axis sizes, -1 = the
  # devices the other axis leaves. data: batch split only; fsdp: batch AND the frozen base weights split.
  # shard_lora: split the LoRA factors / optimizer state over fsdp too (default replicated; see sharding.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_lora=False))
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.log_every = 50
  c.progress = True
  c.tensorboard = True  # clu SummaryWriter event files in workdir/tensorboard (imports TensorFlow)
  c.save_adapters = False
  return c


def apply_run_args(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """The arguments every run config shares (model, checkpoint, seed, task, runlocal), applied last so
  ``runlocal`` sees the config's own step counts."""
  c.model = arg.model
  if arg.checkpoint:
    c.model_options.checkpoint = arg.checkpoint
  c.seed = arg.seed
  c.data.task = arg.task
  if arg.runlocal:
    runlocal(c, steps=arg.get("steps", 0))


def runlocal(c: ml_collections.ConfigDict, *, steps: int) -> None:
  """CPU scale (big_vision's ``runlocal``): the real Gemma 3 270M, the offline validation data (split into
  train / held-out parts, not the paper's protocol), short sequences, frequent checkpoints. ``steps`` is
  kept if the caller set it below the paper's 10k, else a CPU-sized 200."""
  c.model = "gemma3_270m"
  c.model_options = ml_collections.ConfigDict({})
  if c.steps >= 10_000:
    c.steps = 200 if steps >= 10_000 else steps
  c.extra_steps = min(c.extra_steps, 50)
  c.warmup_steps = min(c.warmup_steps, 20)
  c.rank_change_warmup = min(c.rank_change_warmup, 10)
  c.min_steps = min(c.min_steps, 20)
  c.data.source = "olmo"
  c.data.max_len = 256
  c.data.batch_size = 8
  c.checkpoint_every = 50
  c.log_every = 5
  c.eval.limit = 200
