"""Helpers for the ``configs/*.py`` files (ml_collections, big_vision style).

Every config file defines ``get_config(arg=None)``; ``arg`` is the text after the colon in
``--config=configs/direct.py:rank=8,task=arc_e,runlocal`` and is parsed by ``parse_arg`` into typed values
(defaults given by the config decide the type). Unknown keys raise, naming the config file's accepted keys.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys

from absl import flags
import ml_collections

from lora_squeeze import results
from lora_squeeze.workdir import UserError
from lora_squeeze.workdir import did_you_mean
from lora_squeeze.workdir import flatten

# The paper's learning-rate grid (Table 2 / Sec. 4): {0.001, 0.003, 0.01, 0.03, 0.1}.
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
PAPER_SEEDS = (42, 43, 44)
PAPER_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


# A learning rate left to the sweep: ``{"best_lr_from": STORE, "rank": R}`` as an override value (or as a value
# of ``lr_by_rank``) stands for the best direct-training rate at rank R in the lr_grid results store STORE
# (``results.best_direct_lr``). ``sweep.py`` reads the store when the sweep runs, not when the config is parsed.
# "Best" by one of ``results.RATE_RULES``: "accuracy" (the paper's Table 2 rule, the default) or "nll" (the
# lowest held-out NLL; the reference then also holds ``"by": "nll"``).
BEST_LR_FROM = "best_lr_from"


def check_rate_rule(by: str) -> str:
  """``by`` if it is one of ``results.RATE_RULES``, else one UserError naming the valid ones."""
  rules = results.RATE_RULES
  if by not in rules:
    raise UserError(f"learning-rate rule {by!r}: expected one of {', '.join(rules)}{did_you_mean(by, rules)}")
  return by


def best_lr_from(store: str, rank: int, by: str = "accuracy") -> dict:
  """The override value standing for rank ``rank``'s best learning rate (by ``by``) in the results store
  ``store``."""
  ref = {BEST_LR_FROM: str(store), "rank": int(rank)}
  if check_rate_rule(by) != "accuracy":  # the default stays implicit: older references are unchanged
    ref["by"] = by
  return ref


def is_best_lr_from(value) -> bool:
  return isinstance(value, dict) and set(value) in ({BEST_LR_FROM, "rank"}, {BEST_LR_FROM, "rank", "by"})


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
  c.lora = ml_collections.ConfigDict(
      dict(
          rank=8,
          alpha=ml_collections.FieldReference(None, field_type=float),
          targets=("q", "k", "v", "o", "gate", "up", "down"),
          joint_kv=False,
          joint_gate_up=False,
      )
  )
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
  # In-Squeeze with ranks the adapter chooses (the paper's future work): at each rank change every module
  # takes the smallest rank r with V_r >= tau (its share of ΔW's energy), at most the ladder's next rank and
  # at least max(1, min_rank). tau = 0: off (every module takes the ladder's rank).
  c.auto_rank = ml_collections.ConfigDict(dict(tau=0.0, min_rank=0))
  c.data = ml_collections.ConfigDict(
      dict(
          task="arc_e",
          source="tfds",
          batch_size=8,
          max_len=1024,
          max_target_tokens=64,
          train_split="",
          eval_split="",
          shuffle_buffer=0,
          num_workers=0,
          # pack: several examples per row; max_target_tokens is then per ROW
          pack=False,
      )
  )
  c.eval = ml_collections.ConfigDict(dict(enabled=True, limit=0, batch_size=8))
  # Device mesh (lora_squeeze/sharding.py), used when there is more than one device: axis sizes, -1 = the
  # devices the other axis leaves. data: batch split only; fsdp: batch AND the frozen base weights split.
  # shard_lora: split the LoRA factors / optimizer state over fsdp too (default replicated; see sharding.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_lora=False))
  # Rematerialise each transformer block in the train step's backward pass (jax.checkpoint): activation
  # memory of one layer instead of all, for about one more forward of compute (experiments/remat_memory.py).
  c.remat = False
  # In-Squeeze / Cont-Squeeze: compile the coming stages' rank-change and train-step programs from abstract
  # shapes in a background thread while the current stage trains (trainer.Trainer.precompile), so a stage
  # boundary costs the rank change plus about one ordinary step. Results are bit-identical either way.
  c.background_compile = True
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


# ----------------------------------------------------------------------------------------------------------
# Checking a run config before anything is created.
# ----------------------------------------------------------------------------------------------------------


def check_run_config(config) -> None:
  """Raises ``workdir.UserError`` (one line: the key, the bad value, what is valid) for a config that
  cannot run. Called before a workdir is created, so a typo leaves nothing behind."""
  # pylint: disable=g-import-not-at-top  (lazy: config files and the entry points' flag parsing import this
  # module before runtime.quiet_native_logs; the training stack, TensorFlow included, loads only here)
  from lora_squeeze import squeeze
  from lora_squeeze import train
  from lora_squeeze import optim as optim_lib
  from lora_squeeze.data import pipeline
  from lora_squeeze.data import tasks as tasks_lib

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise UserError(message)

  def positive_int(key: str, value, minimum: int = 1) -> None:
    need(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"config.{key}={value!r}: must be an integer >= {minimum}",
    )

  def rate(key: str, value) -> None:
    need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
        f"config.{key}={value!r}: a learning rate must be a finite number > 0",
    )

  mode = config.mode
  need(
      mode in train.MODES,
      f"config.mode={mode!r} is not a mode{did_you_mean(str(mode), train.MODES)}; " f"modes: {', '.join(train.MODES)}",
  )
  from lora_squeeze import models  # (lazy: as above)

  need(
      str(config.model).strip().lower().replace("-", "_") in models.KNOWN_MODELS,
      f"config.model={config.model!r} is not a known model{did_you_mean(str(config.model), models.KNOWN_MODELS)}; "
      f"known: {', '.join(models.KNOWN_MODELS)}",
  )
  positive_int("lora.rank", config.lora.rank)
  if mode in ("cont_squeeze", "in_squeeze"):
    positive_int("source_rank", config.source_rank)
    positive_int("target_rank", config.target_rank)
  if mode == "post_squeeze":
    need(len(tuple(config.target_ranks)) > 0, "config.target_ranks is empty: give the ranks to squeeze to")
    for r in config.target_ranks:
      positive_int("target_ranks[]", r)
  if mode in ("post_squeeze",) or (mode == "cont_squeeze" and config.get("source_workdir")):
    need(
        bool(config.get("source_workdir")),
        f"config.source_workdir is empty: mode {mode} squeezes the " "adapter of a finished run; give its workdir",
    )
  for r in tuple(config.get("ranks", ()) or ()):
    positive_int("ranks[]", r)
  trains_source = mode in ("direct", "in_squeeze") or (mode == "cont_squeeze" and not config.get("source_workdir"))
  positive_int("steps", config.get("steps"), minimum=1 if trains_source else 0)
  positive_int("extra_steps", config.get("extra_steps"), minimum=1 if mode == "cont_squeeze" else 0)
  positive_int("min_steps", config.get("min_steps"), minimum=0)
  for key in ("warmup_steps", "rank_change_warmup"):
    positive_int(key, config.get(key), minimum=0)
  for key, default in (("background_compile", True), ("remat", False)):
    need(isinstance(config.get(key, default), bool), f"config.{key}={config.get(key)!r}: must be True or False")
  for key in ("checkpoint_every", "log_every", "keep_checkpoints", "seed"):
    positive_int(key, config.get(key), minimum=1 if key != "seed" else 0)
  rate("learning_rate", config.learning_rate)
  for k, v in dict(config.get("lr_by_rank", {}) or {}).items():
    need(k.startswith("r") and k[1:].isdigit(), f"config.lr_by_rank.{k}: keys are r<rank>, e.g. r8")
    rate(f"lr_by_rank.{k}", v)
  need(
      config.squeeze.method in squeeze.METHODS,
      f"config.squeeze.method={config.squeeze.method!r}: one of " f"{', '.join(squeeze.METHODS)}",
  )
  need(
      config.squeeze.optimizer_state in optim_lib.OPTIMIZER_STATE_MODES,
      f"config.squeeze.optimizer_state="
      f"{config.squeeze.optimizer_state!r}: one of {', '.join(optim_lib.OPTIMIZER_STATE_MODES)}",
  )
  auto = config.get("auto_rank", None) or {}
  tau = auto.get("tau", 0.0)
  need(
      isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0.0 <= tau <= 1.0,
      f"config.auto_rank.tau={tau!r}: the energy each module keeps, in (0, 1] (0 = off)",
  )
  positive_int("auto_rank.min_rank", auto.get("min_rank", 0), minimum=0)
  need(
      not tau or mode == "in_squeeze",
      f"config.auto_rank.tau={tau!r} with config.mode={mode!r}: ranks chosen per module are an In-Squeeze "
      "mode (mode=in_squeeze); set auto_rank.tau=0 for other modes",
  )
  d = config.data
  sources = pipeline.DATA_SOURCES
  need(d.source in sources, f"config.data.source={d.source!r}: one of {', '.join(sources)}")
  if d.source == "synthetic" or d.task == "synthetic":
    need(
        d.source == "synthetic" and d.task == "synthetic",
        f"config.data.task={d.task!r} with "
        f"config.data.source={d.source!r}: the synthetic task and source go together (task=synthetic, "
        "source=synthetic)",
    )
  else:
    try:
      tasks_lib.get_task(d.task)
    except ValueError:
      names = tasks_lib.ALL_TASK_NAMES
      raise UserError(
          f"config.data.task={d.task!r} is not a task{did_you_mean(str(d.task), names)}; " f"tasks: {', '.join(names)}"
      ) from None
  need(
      not (d.get("pack", False) and d.source == "synthetic"),
      "config.data.pack=True: the synthetic source " "has no packing (its rows are made whole); use pack=False with it",
  )
  positive_int("data.batch_size", d.batch_size)
  positive_int("data.max_len", d.max_len, minimum=2)
  positive_int("data.max_target_tokens", d.max_target_tokens)
  try:
    train.plan_stages(config)
  except ValueError as e:
    raise UserError(str(e)) from None


def flag_error_message(error: BaseException, argv, config) -> str:
  """One line for a failed parse of ``--config=FILE[:args] --config.KEY=VALUE ...`` (the entry points print
  it and exit 2): an unknown override key names the nearest valid keys; a bad config argument or value
  says which; never a traceback. ``config``: the parsed config if the parse got that far, else None."""
  if config is not None:
    valid = flatten(config.to_dict())
    prefixes = {k.rsplit(".", i)[0] for k in valid for i in range(k.count(".") + 1)}
    for arg in argv[1:]:
      if arg.startswith("--config."):
        key = arg[len("--config.") :].split("=", 1)[0]
        if key not in valid and key not in prefixes:
          return f"--config.{key}: unknown config key{did_you_mean(key, valid)}"
  text = str(error)
  if isinstance(error, OSError) and "No such file" in text:  # config_flags' report of a missing config file
    path = next((a.split("=", 1)[1].split(":", 1)[0] for a in argv if a.startswith("--config=")), "?")
    return f"--config={path}: no such config file"
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  if len(lines) == 1 and lines[0].startswith("flag --"):  # absl's own one-line report names the flag
    return lines[0]
  # config_flags wraps a failing get_config with its traceback: keep the exception's own message.
  line = lines[-1] if lines else type(error).__name__
  # (its class may be printed with its module: "lora_squeeze.workdir.UserError: ...")
  return line.split(": ", 1)[1] if re.match(r"^(\w+\.)*\w+(Error|Exception): ", line) else line


def parse_flags_or_exit(argv, config_flag, prog: str = "lora_squeeze"):
  """absl ``flags_parser`` for ``app.run``: on a bad flag, one line on stderr and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    config_flag.value.get("mode")  # a config file that failed to load raises only when first read
    return rest
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is the user's to fix)
    try:  # the Flag object, not the holder: after a failed parse the holder refuses to be read
      config = flags.FLAGS[config_flag.name].value
      config = config if hasattr(config, "to_dict") else None
    except Exception:  # pylint: disable=broad-except
      config = None
    if config is None:
      config = _load_config_arg(argv)
    print(f"{prog}: error: {flag_error_message(e, argv, config)}", file=sys.stderr)
    sys.exit(2)


def _load_config_arg(argv):
  """The config of ``--config=FILE[:arg]`` in ``argv``, loaded on its own (None if that fails too)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_lora_squeeze_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
