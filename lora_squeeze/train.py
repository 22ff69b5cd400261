"""The train loop: LoRA on a frozen Gemma 3 with Adafactor, whose rank changes after or during training.

Run modes (``config.mode``; configs in ``configs/``, see the paper's Sec. 3-4):

* ``direct``: one stage at ``config.lora.rank`` for ``config.steps`` steps (paper: N = 10k / 15k).
* ``post_squeeze``: no training. The finished adapter of ``config.source_workdir`` (a ``direct`` run at
  r_src) is squeezed to each of ``config.target_ranks`` and evaluated.
* ``cont_squeeze``: Post-Squeeze r_src → r_tgt, then ``config.extra_steps`` (paper: M = 200 / 700) more steps
  at r_tgt with a ``config.rank_change_warmup``-step warmup (paper: 100) and r_tgt's learning rate. The source
  is ``config.source_workdir``'s adapter when given (a sweep trains it once), otherwise this run first
  trains r_src for ``config.steps`` steps itself.
* ``in_squeeze``: a rank ladder (``config.ranks``, default the halvings source_rank → target_rank) over
  N + M steps, split by ``schedules.in_squeeze_steps`` (``config.scheme``: ``standard`` / ``min_steps``).

Every run is a list of ``Stage``s (``plan_stages``); a stage after the first starts with the rank-change
step. The state is a plain pytree ``{"params": LoRA params, "opt_state": Adafactor state, "step": int32}``;
the stage, its step, the ranks, the data iterator state and the RNG seed travel as JSON metadata beside it
in the orbax checkpoint.

The pieces: ``trainer.py`` (the jitted train and rank-change steps), ``optim.py`` (Adafactor and its state
across a rank change), ``checkpoints.py`` (orbax checkpoints, the adapter files), ``run_log.py`` (metrics,
progress, timing), ``eval_modes.py`` (the modes that train nothing: Post-Squeeze and zero-shot). This module
plans the stages and runs them: ``run`` is setup, restore, the loop over stages, finish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_squeeze import checkpoints
from lora_squeeze import config_lib
from lora_squeeze import data
from lora_squeeze import eval_modes
from lora_squeeze import fileio
from lora_squeeze import lora as lora_lib
from lora_squeeze import lora_layout
from lora_squeeze import rank_rules
from lora_squeeze import run_log
from lora_squeeze import schedules
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import squeeze as squeeze_lib
from lora_squeeze import trainer as trainer_lib
from lora_squeeze import workdir as workdir_lib

MODES = ("direct", "post_squeeze", "cont_squeeze", "in_squeeze", "zero_shot")

# --------------------------------------------------------------------------------------------------------
# The stage plan.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """One constant-rank stretch of training. ``index`` > 0 (or ``squeeze_first``) starts with a rank change."""

  index: int
  rank: int
  steps: int
  learning_rate: float
  warmup_steps: int
  squeeze_first: bool = False


def learning_rate_for(config, rank: int) -> float:
  """``config.lr_by_rank["r{rank}"]`` if set (the paper tunes one rate per rank, Table 2), else
  ``config.learning_rate``."""
  table = config.get("lr_by_rank", None) or {}
  key = f"r{int(rank)}"
  if key in table:
    return float(table[key])
  return float(config.learning_rate)


def _cfg(config, key: str, default=None):
  return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def plan_stages(config) -> list[Stage]:
  """The stages of a run from its config (empty for ``post_squeeze`` and ``zero_shot``: no training)."""
  mode = config.mode
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r}: expected one of {MODES}")
  warmup = int(config.warmup_steps)
  change_warmup = int(config.rank_change_warmup)
  if mode in ("post_squeeze", "zero_shot"):
    return []
  if mode == "direct":
    r = int(config.lora.rank)
    _positive(config.steps, "config.steps")
    return [Stage(0, r, int(config.steps), learning_rate_for(config, r), warmup)]
  if mode == "cont_squeeze":
    src, tgt = int(config.source_rank), int(config.target_rank)
    _positive(config.extra_steps, "config.extra_steps")
    if tgt > src:
      raise ValueError(f"config.target_rank={tgt} > config.source_rank={src} in cont_squeeze")
    cont = dict(
        rank=tgt,
        steps=int(config.extra_steps),
        learning_rate=learning_rate_for(config, tgt),
        warmup_steps=change_warmup,
    )
    if _cfg(config, "source_workdir"):
      return [Stage(0, squeeze_first=True, **cont)]
    _positive(config.steps, "config.steps")
    return [Stage(0, src, int(config.steps), learning_rate_for(config, src), warmup), Stage(1, **cont)]
  # in_squeeze
  ranks = list(
      _cfg(config, "ranks", None) or schedules.halving_ladder(int(config.source_rank), int(config.target_rank))
  )
  if any(b > a for a, b in zip(ranks, ranks[1:])):
    raise ValueError(f"config.ranks={ranks}: an In-Squeeze ladder must not increase")
  total = int(config.steps) + int(_cfg(config, "extra_steps", 0) or 0)
  steps = schedules.in_squeeze_steps(ranks, total, scheme=config.scheme, min_steps=int(config.min_steps))
  return [
      Stage(i, r, s, learning_rate_for(config, r), warmup if i == 0 else change_warmup)
      for i, (r, s) in enumerate(zip(ranks, steps))
  ]


def _positive(value, what: str) -> None:
  if value is None or int(value) < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Running a config.
# --------------------------------------------------------------------------------------------------------


def _fault_point(name: str) -> None:
  """Fault injection for the kill/resume tests: ``LORA_SQUEEZE_FAULT=name`` SIGKILLs this process here."""
  if os.environ.get("LORA_SQUEEZE_FAULT") == name:
    os.kill(os.getpid(), signal.SIGKILL)


def run(config, workdir: str | os.PathLike, *, evaluate_fn: Callable | None = None, fresh: bool = False) -> dict:
  """Run (or resume, or skip if finished) the config in ``workdir``; returns the result dict.

  ``evaluate_fn(model, lora_params, lora_config) -> dict`` computes final metrics; by default
  ``eval_modes.evaluate_adapter``: ``config.data``'s evaluation set when ``config.eval.enabled``.

  The workdir guarantees of ``lora_squeeze.workdir`` hold: the config is checked before anything is
  created (``config_lib.check_run_config``); one process writes a workdir at a time (``workdir.Lock``); a
  workdir holding a run with other result-determining settings is refused (``workdir.SettingsMismatch``),
  unless ``fresh``, which moves the old run to ``workdir/superseded/`` and starts afresh.
  """
  config_lib.check_run_config(config)
  workdir = workdir_lib.check_writable_dir(workdir)
  primary = jax.process_index() == 0
  if not fresh:  # every process refuses a mismatch before anyone writes (process 0 alone would hang the rest)
    workdir_lib.check_settings(workdir, config)
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
  sharding_lib.sync(f"run:{workdir}:mkdir")
  with workdir_lib.Lock(workdir, primary=primary):
    if primary:
      moved = workdir_lib.record_settings(workdir, config, fresh=fresh)
      if moved is not None:
        print(f"[lora_squeeze] --fresh: the earlier run in {workdir} was moved to {moved}")
    sharding_lib.sync(f"run:{workdir}:settings")
    return _run_locked(config, workdir, evaluate_fn=evaluate_fn)


def _run_locked(config, workdir: Path, *, evaluate_fn: Callable | None) -> dict:
  result_path = workdir / workdir_lib.RESULT_NAME
  if result_path.exists():
    print(f"[lora_squeeze] {workdir} is finished ({workdir_lib.RESULT_NAME} exists): nothing to do")
    return json.loads(result_path.read_text())
  if config.mode == "post_squeeze":
    return eval_modes.run_post_squeeze(config, workdir, evaluate_fn=evaluate_fn)
  if config.mode == "zero_shot":
    return eval_modes.run_zero_shot(config, workdir, evaluate_fn=evaluate_fn)
  run_ = _TrainingRun(config, workdir)
  run_.restore()
  try:
    for stage in run_.stages[run_.stage_idx :]:
      run_.train_stage(stage)
  finally:
    run_.close_loop()
  return run_.finish(evaluate_fn)


class _TrainingRun:
  """One training run in its locked workdir: ``__init__`` sets up (model, trainer, data, checkpoints),
  ``restore`` resumes from the newest checkpoint or initialises, ``train_stage`` runs one stage (its rank
  change first, then its steps, checkpoints and metrics), ``finish`` evaluates and writes the adapter and
  ``result.json``."""

  def __init__(self, config, workdir: Path):
    self.config, self.workdir = config, workdir
    self.t_start = time.time()
    self.primary = jax.process_index() == 0
    self.seed = int(config.seed)
    self.stages = plan_stages(config)
    self.lora_config = trainer_lib.lora_config_from(config)
    # Several devices (or processes): the (data, fsdp) mesh of config.mesh (sharding.py). One device: no
    # mesh, exactly the single-device programs.
    self.mesh, shard = None, (0, 1)
    if jax.device_count() > 1:
      self.mesh = sharding_lib.mesh_from_config(config)
      shard = sharding_lib.process_batch_shard(self.mesh, int(config.data.batch_size))
    self.model = trainer_lib.load_model(config, mesh=self.mesh)
    self.trainer = trainer_lib.Trainer(
        self.model,
        self.lora_config,
        max_targets=int(config.data.batch_size) * int(config.data.max_target_tokens),
        squeeze_method=config.squeeze.method,
        optimizer_state=config.squeeze.optimizer_state,
        mesh=self.mesh,
        shard_lora=sharding_lib.shard_lora_enabled(config),
        remat=bool(config.remat),
    )
    self.ckpts = checkpoints.Checkpoints(workdir / "checkpoints", keep=int(config.keep_checkpoints))
    self.iterator = data.make_train_iterator(
        config.data, self.model.tokenizer, seed=self.seed, shard=shard, image_spec=trainer_lib.image_spec(self.model)
    )
    self.base_params = self.model.params  # on a mesh: split over fsdp by load_model
    auto = config.get("auto_rank", None) or {}
    self.auto_tau, self.auto_min = float(auto.get("tau", 0.0) or 0.0), int(auto.get("min_rank", 0) or 0)
    self.auto_records: list[dict[str, Any]] = []  # per rank change: the modules' chosen ranks and V_r
    self.timing: dict[int, dict[str, Any]] = {}
    self.t_last_step = None  # when the previous stage's last step ended (synced): a boundary's stall starts there
    self.end_save_seconds = 0.0  # the previous stage's end checkpoint

  def restore(self) -> None:
    """The state and position of the newest checkpoint that restores, else a new run's."""
    restored = self.ckpts.restore_latest(self.trainer.abstract_state)
    stage_losses = {}
    if restored is not None:
      meta, self.state = restored
      stage_losses = {int(k): v for k, v in meta.get("stage_losses", {}).items()}
      self.auto_records = list(meta.get("auto_rank", []))
      self.iterator.set_state(checkpoints.decode_data_state(meta["data_state"]))
      self.stage_idx, self.stage_step, self.phase = int(meta["stage"]), int(meta["stage_step"]), meta["phase"]
      self.wall_before = float(meta["wall_seconds"])
      print(
          f"[lora_squeeze] resuming {self.workdir} at step {meta['global_step']} (stage {self.stage_idx}, "
          f"{self.stage_step}/{self.stages[self.stage_idx].steps}, phase {self.phase})"
      )
    else:
      if self.stages[0].squeeze_first:
        source = Path(self.config.source_workdir)
        source_params, source_cfg, _ = checkpoints.load_adapter(source / checkpoints.ADAPTER_DIR)
        _check_same_layout(source_cfg, self.lora_config, self.config.source_workdir)
        self.state = self.trainer.state_from_params(source_params)
      else:
        self.state = self.trainer.init_state(jax.random.fold_in(jax.random.key(self.seed), 0), self.stages[0].rank)
      self.stage_idx, self.stage_step, self.phase, self.wall_before = 0, 0, "trained", 0.0
    self.global_step = int(self.state["step"])
    self.log = run_log.StepLog(
        self.workdir,
        resume_step=self.global_step,
        total_steps=sum(s.steps for s in self.stages),
        primary=self.primary,
        progress=bool(self.config.get("progress", True)),
        tensorboard=bool(self.config.get("tensorboard", False)),
    )
    self.log.stage_losses.update(stage_losses)
    self.t_loop = time.time()

  def _meta(self, stage_idx: int, stage_step: int, phase: str) -> dict:
    return {
        "stage": stage_idx,
        "stage_step": stage_step,
        "phase": phase,
        "global_step": int(self.state["step"]),
        "ranks": lora_lib.describe_ranks(lora_lib.lora_ranks(self.state["params"])),
        "data_state": checkpoints.encode_data_state(self.iterator.get_state()),
        "seed": self.seed,
        "stage_losses": {str(k): v for k, v in self.log.stage_losses.items()},
        "auto_rank": self.auto_records,
        "wall_seconds": self.wall_before + time.time() - self.t_start,
    }

  def _save(self, stage_idx: int, stage_step: int, phase: str) -> float:
    t = time.time()
    self.ckpts.save(self.state, self._meta(stage_idx, stage_step, phase))
    return time.time() - t

  def _flush(self, stage: Stage) -> None:
    try:
      self.log.flush(stage, len(self.stages))
    except run_log.NonFiniteStep as e:
      if not e.loss_is_finite:  # the state this loss was computed on (step g - 1) is not good either
        self.ckpts.discard_from(e.step.global_step - 1, why=f"its loss at step {e.step.global_step} is {e.loss}")
      kept = self.ckpts.latest()
      kept = (
          f"the newest checkpoint, {checkpoints.Checkpoints.describe(kept)}, stays in {self.workdir / 'checkpoints'}"
          if kept is not None
          else "no checkpoint was saved before it"
      )
      raise FloatingPointError(
          f"non-finite {e.what} at step {e.step.global_step} (stage {stage.index}, rank {stage.rank}, learning "
          f"rate {e.step.learning_rate:g}); stopped without saving that state: {kept}. Lower "
          "config.learning_rate / config.lr_by_rank and rerun with --fresh."
      ) from None

  def train_stage(self, stage: Stage) -> None:
    """The stage's rank change (unless resumed past it), then its steps."""
    stage_time = self.timing.setdefault(
        stage.index,
        {
            "rank": stage.rank,
            "change_seconds": 0.0,
            "first_step_seconds": 0.0,
            "steady_seconds": 0.0,
            "steady_steps": 0,
            # From the end of the previous stage's last step to the end of this stage's first: the
            # stage-end checkpoint, the rank change, its checkpoint and the first step (None: no previous
            # stage in this process). ``save_seconds``: the checkpoints' part of it.
            "boundary_seconds": None,
            "save_seconds": self.end_save_seconds if self.t_last_step is not None else 0.0,
        },
    )
    resumed_here = stage.index == self.stage_idx and (self.stage_step > 0 or self.phase == "changed")
    if not resumed_here:
      self.stage_step = 0
      if stage.index > 0 or stage.squeeze_first:
        t = time.time()
        key = trainer_lib.stage_key(self.seed, stage.index)
        target = self._auto_ranks(stage) if self.auto_tau else stage.rank
        self.state = jax.block_until_ready(self.trainer.change_rank(self.state, target, key))
        stage_time["change_seconds"] = time.time() - t
        _fault_point(f"after_change:{stage.index}")
        stage_time["save_seconds"] += self._save(stage.index, 0, "changed")
        _fault_point(f"after_change_saved:{stage.index}")
    self.log.restart_clock(time.time(), self.stage_step)
    checkpoint_every, log_every = int(self.config.checkpoint_every), int(self.config.log_every)
    first, start_step = True, self.stage_step
    while self.stage_step < stage.steps:
      lr = schedules.warmup_constant(self.stage_step, peak=stage.learning_rate, warmup_steps=stage.warmup_steps)
      batch = next(self.iterator)
      t = time.time()
      self.state, m = self.trainer.train_step(self.state, self.base_params, batch, lr)
      if first:  # the stage's compile (a new rank) + one step; one sync per stage
        jax.block_until_ready(m)
        stage_time["first_step_seconds"] = time.time() - t
        if self.t_last_step is not None:
          stage_time["boundary_seconds"] = time.time() - self.t_last_step
        self.log.restart_clock(t, self.stage_step)  # the first flush reports this (compiling) step's own rate
        t_steady = time.time()
        self._precompile_ahead(stage, batch)
      self.stage_step += 1
      self.global_step += 1
      tokens = int(np.asarray(batch["segment_ids"]).astype(bool).sum())
      self.log.add(run_log.Step(self.global_step, self.stage_step, lr, tokens, m))
      stage_end = self.stage_step == stage.steps
      checkpoint_now = stage_end or self.global_step % checkpoint_every == 0
      if first or len(self.log.pending) >= log_every or checkpoint_now:
        self._flush(stage)
      first = False
      if checkpoint_now:
        if stage_end:  # steps after this stage's first, up to its end (flushed: synced)
          self.t_last_step = time.time()
          stage_time["steady_seconds"] = self.t_last_step - t_steady
          stage_time["steady_steps"] = stage.steps - start_step - 1
          stage_time["steady_window"] = [t_steady - self.t_loop, self.t_last_step - self.t_loop]
        seconds = self._save(stage.index, self.stage_step, "trained")
        if stage_end:  # the stage-end checkpoint: part of the next boundary
          self.end_save_seconds = seconds
        _fault_point(f"after_save:{self.global_step}")
    self.stage_idx, self.phase = stage.index, "trained"

  def _auto_ranks(self, stage: Stage) -> dict[str, int]:
    """Every module's rank for ``stage`` (``config.auto_rank``): the smallest r with V_r >= tau of its ΔW's
    spectrum now, at most the ladder's rank and the module's own, at least max(1, min_rank); recorded."""
    spectra = squeeze_lib.lora_spectra(self.state["params"])
    floor = max(1, self.auto_min)
    ranks, kept = {}, {}
    for path, s in spectra.items():
      r = min(stage.rank, len(s), max(floor, rank_rules.choose_rank(s, self.auto_tau)))
      ranks[path], kept[path] = int(r), float(rank_rules.retention(s, r))
    self.auto_records.append({"stage": stage.index, "ladder_rank": stage.rank, "ranks": ranks, "retention": kept})
    return ranks

  def _precompile_ahead(self, stage: Stage, batch) -> None:
    """Once the run's first stage runs its compiled step: every coming boundary's programs compile beside it
    (not with automatic ranks: a boundary's ranks are known only when it comes)."""
    if (
        bool(self.config.get("background_compile", True))
        and not self.auto_tau
        and self.trainer.precompiler is None
        and stage.index + 1 < len(self.stages)
    ):
      self.trainer.precompile(
          [(self.stages[j - 1].rank, self.stages[j].rank) for j in range(stage.index + 1, len(self.stages))],
          base_params=self.base_params,
          batch=batch,
          key=trainer_lib.stage_key(self.seed, stage.index + 1),
      )

  def close_loop(self) -> None:
    self.log.close()
    self.trainer.close()
    self.train_seconds = time.time() - self.t_loop

  def finish(self, evaluate_fn: Callable | None) -> dict:
    """Evaluates the final adapter, saves it, writes ``result.json`` (process 0); returns the result."""
    config, stages = self.config, self.stages
    final_params = self.state["params"]
    if self.mesh is not None:  # evaluation and the adapter files are host-side: every process gets the whole LoRA
      final_params = sharding_lib.to_host(final_params)
    final_config = dataclasses.replace(
        self.lora_config, rank=lora_lib.describe_ranks(lora_lib.lora_ranks(final_params))
    )
    # On a mesh the evaluation runs there too: the fsdp-split base (load_model), each batch's rows split over
    # the batch axes (evaluate's programs read the mesh off the base params).
    metrics = eval_modes.evaluate_adapter(config, self.model, final_params, final_config, evaluate_fn)
    checkpoints.save_adapter(
        self.workdir / checkpoints.ADAPTER_DIR, final_params, final_config, extra={"mode": config.mode}
    )
    self.ckpts.close()
    losses = self.log.stage_losses
    result = {
        "mode": config.mode,
        "model": config.model,
        "task": config.data.get("task", None),
        "seed": self.seed,
        "stages": [dataclasses.asdict(s) | {"final_loss": losses.get(s.index)} for s in stages],
        "ranks_per_stage": [s.rank for s in stages],
        "final_rank": stages[-1].rank,
        "source_rank": _source_rank(config) if stages[0].squeeze_first else stages[0].rank,
        "learning_rate": stages[0].learning_rate,
        "scheme": str(config.scheme) if config.mode == "in_squeeze" else None,
        "squeeze_method": str(config.squeeze.method) if len(stages) > 1 or stages[0].squeeze_first else None,
        "optimizer_state": str(config.squeeze.optimizer_state) if len(stages) > 1 else None,
        "source_workdir": str(_cfg(config, "source_workdir", "") or "") or None,
        "steps": int(self.state["step"]),
        "wall_seconds": self.wall_before + time.time() - self.t_start,
        "final_train_loss": losses.get(stages[-1].index),
        "metrics": metrics,
        "auto_rank": (
            {"tau": self.auto_tau, "min_rank": self.auto_min, "stages": self.auto_records} if self.auto_tau else None
        ),
        "final_ranks": final_config.rank,
        "lora_params": lora_layout.lora_param_count(self.model.config, final_config),
        # The count of a rank-1 adapter on the same modules (a uniform rank r costs r times it).
        "lora_params_per_rank": lora_layout.lora_param_count(
            self.model.config, dataclasses.replace(final_config, rank=1)
        ),
        "timing": run_log.timing_summary(self.timing, self.train_seconds, self.trainer.precompiler, self.t_loop),
    }
    if self.primary:
      fileio.atomic_write_text(self.workdir / workdir_lib.RESULT_NAME, json.dumps(result, indent=2))
    return result


def _check_same_layout(source: lora_lib.LoRAConfig, ours: lora_lib.LoRAConfig, where) -> None:
  if (source.targets, source.joint_kv, source.joint_gate_up, source.alpha) != (
      ours.targets,
      ours.joint_kv,
      ours.joint_gate_up,
      ours.alpha,
  ):
    raise ValueError(
        f"config.source_workdir={where}: its adapter has targets={source.targets}, "
        f"joint_kv={source.joint_kv}, joint_gate_up={source.joint_gate_up}, alpha={source.alpha}; "
        f"this config has {ours.targets}, {ours.joint_kv}, {ours.joint_gate_up}, {ours.alpha}"
    )


def _source_rank(config):
  """The rank of ``config.source_workdir``'s adapter (from its result.json, else from the adapter)."""
  source = Path(config.source_workdir)
  if (source / workdir_lib.RESULT_NAME).exists():
    return json.loads((source / workdir_lib.RESULT_NAME).read_text()).get("final_rank")
  return lora_lib.describe_ranks(lora_lib.lora_ranks(checkpoints.load_adapter(source / checkpoints.ADAPTER_DIR)[0]))
