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

Train step (``Trainer.train_step``): one ``jax.jit`` with the state donated; gradients for the LoRA params
only (the base params are an argument, never a baked-in constant, never differentiated); the loss is the
mean cross-entropy over answer tokens (``batch["loss_mask"]``), and vocabulary logits are computed only at
those positions (``lora.logits_at`` on gathered hidden states: the 262k-vocab projection is most of the
forward on the small Gemmas). The learning rate is a traced scalar argument, so warmups and per-stage rates
never recompile: the step compiles once per distinct rank (``Trainer.traces`` counts it). A vision-language
batch (``data.vqa`` tasks, a ``text_only=False`` model) also carries ``images``: the frozen SigLIP tower and
projector embed them inside the step; like every base param they are an argument, never differentiated.

Optimizer: ``optax.adafactor`` with optax's defaults (factored second moments, update clipping 1.0,
multiply-by-parameter-scale, no momentum) and the learning rate applied outside it: Adafactor's chain is
linear after its RMS scaling, so ``lr · adafactor(None)`` equals ``adafactor(lr)`` and lets the rate change per
step without a schedule baked into the program. Schedule (paper): linear warmup over ``config.warmup_steps``
(1000) then constant; each later stage warms up again over ``config.rank_change_warmup`` steps.

Rank change (``Trainer.change_rank``): one jitted program for the whole tree, on one device as on a mesh,
with the target rank static (compiled once per (source ranks, target rank) signature): LoRA params through
``lora.change_rank`` (``squeeze_lora``, ``config.squeeze.method``, scale folded) and the optimizer state:

* ``"fresh"`` (default): a new Adafactor state at the new rank (what a new LoRA run would start with).
* ``"carry"``: what survives a change of basis on the rank axis is carried: the step count (Adafactor's
  β2 schedule continues) and the second-moment statistics averaged over the rank axis, broadcast to the new
  rank. Adafactor factors a parameter only when its two largest dims are >= 128, so the state's *layout*
  changes at rank 128 (e.g. 128 → 64 turns ``v_row``/``v_col`` into a full ``v``): the carried statistics are
  rebuilt as full second-moment tensors first and re-encoded in the new layout (``carry_adafactor_state``).

Stage boundaries without stalls (``config.background_compile``, default on): the ladder's ranks are known
before training, so once a run's first stage has taken its first step, ``Trainer.precompile`` lowers every
coming boundary's programs (the rank change, then the train step at the new rank) from abstract shapes
with the live arguments' shardings and compiles them in one background thread, in ladder order, while the
stages train; a boundary then runs those executables instead of tracing and compiling in place. The
programs are the jitted ones (bit-identical results, tested, so the key is not a result setting); every
process of a multi-host run compiles the same programs from the same shapes. ``result.json["timing"]``
records each boundary (``boundary_seconds`` from the end of the last step before it to the end of the
first step after it, ``save_seconds``, ``change_seconds``, ``first_step_seconds``) and each background
compile (``background_compile``: seconds, start/end, how long the loop waited for it).

Checkpoints (orbax, ``workdir/checkpoints``): every ``config.checkpoint_every`` steps, at each stage's end
and right after each rank change. orbax step ids are ``2·global_step + phase`` (phase 1 = "just changed
rank"), so the end of a stage and the start of the next one (same global step) are distinct checkpoints.
Saves are synchronous and atomic (orbax writes a temporary directory and renames it), so a run killed at any
point restarts from the last complete checkpoint and, on CPU, ends bit-identical to an uninterrupted run:
everything random is a function of (seed, stage) or lives in the checkpoint (data iterator position).
A finished workdir (``result.json`` present) does no work when run again.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_squeeze import fileio
from lora_squeeze import rank_rules
from lora_squeeze import lora as lora_lib
from lora_squeeze import schedules
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import squeeze as squeeze_lib
from lora_squeeze import workdir as workdir_lib

MODES = ("direct", "post_squeeze", "cont_squeeze", "in_squeeze", "zero_shot")
OPTIMIZER_STATE_MODES = ("fresh", "carry")
RESULT_NAME = "result.json"
METRICS_NAME = "metrics.jsonl"
ADAPTER_DIR = "adapter"

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
# Loss with logits only at answer positions.
# --------------------------------------------------------------------------------------------------------


def answer_loss(
    hidden: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    embedding: jax.Array,
    *,
    max_targets: int,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of the answer tokens, projecting only the hidden states that predict them.

  Token t is predicted from the hidden state at t-1; ``loss_mask[b, t] = 1`` marks the targets (position 0
  never is). The (at most ``max_targets``, static) predicting positions of the whole batch are gathered
  with ``jnp.nonzero(size=...)``, projected onto the vocabulary in one GEMM, and scored. The caller checks
  on the host that no batch has more targets than ``max_targets`` (``check_target_budget``): extra ones
  would be dropped. The projection costs ``max_targets`` rows whatever the batch holds, so keep
  ``config.data.max_target_tokens`` near the task's answer length. (Measured alternative: projecting in
  64-row chunks under ``lax.cond`` to skip empty chunks, with rematerialisation, made the real-270M step
  1.3x slower at 128 targets and 3.5x slower at 1016 on XLA:CPU; not used.)

  Returns (mean loss over target tokens, number of target tokens).
  """
  b, t, d = hidden.shape
  mask = loss_mask.astype(jnp.bool_).at[:, 0].set(False).reshape(-1)
  (target_idx,) = jnp.nonzero(mask, size=max_targets, fill_value=0)
  count = jnp.minimum(mask.sum(), max_targets)
  valid = jnp.arange(max_targets) < count
  h = hidden.reshape(b * t, d)[jnp.maximum(target_idx - 1, 0)]
  logits = lora_lib.logits_at(h, embedding, softcap=softcap)
  targets = tokens.reshape(-1)[target_idx]
  # -log p(target) = logsumexp(logits) - logit(target), the target's logit from its own embedding row: no
  # (targets x vocab) log-probabilities are kept, and the gradient has no dense one-hot (take_along_axis's
  # wrote a zero (targets x 262k) array and scattered into it: ~80 ms of a real-270M step on XLA:CPU).
  target_logit = lora_lib.target_logits(h, embedding, targets, softcap=softcap)
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  loss = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)
  return loss, count


def check_target_budget(batch: Mapping[str, np.ndarray], max_targets: int) -> None:
  """Host-side check that a batch's answer tokens fit the static gather size of the train step."""
  mask = np.asarray(batch["loss_mask"])
  n = int(mask[:, 1:].sum())
  if n > max_targets:
    per_row = int(mask[:, 1:].sum(axis=1).max())
    raise ValueError(
        f"train batch has {n} answer tokens (up to {per_row} in one row) but the train step "
        f"gathers at most {max_targets} = config.data.batch_size x config.data.max_target_tokens; raise "
        "config.data.max_target_tokens"
    )


# --------------------------------------------------------------------------------------------------------
# Optimizer state across a rank change.
# --------------------------------------------------------------------------------------------------------


def make_optimizer() -> optax.GradientTransformation:
  """Adafactor with optax's defaults and no learning rate (applied by the train step, see module doc)."""
  return optax.adafactor(learning_rate=None)


def _factored_dims(shape, min_dim_size_to_factor: int = 128):
  # Same rule as optax._src.factorized._factored_dims (factored=True).
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])


def _full_second_moment(shape, v_row, v_col, v) -> jax.Array:
  """Adafactor's estimate of E[g²] with the parameter's shape, from either layout."""
  dims = _factored_dims(shape)
  if dims is None:
    return v
  d1, d0 = dims
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
  return jnp.expand_dims(v_row / row_mean, d0) * jnp.expand_dims(v_col, d1)


def _encode_second_moment(full: jax.Array, fresh_row, fresh_col, fresh_v):
  dims = _factored_dims(full.shape)
  if dims is None:
    return fresh_row, fresh_col, full.astype(fresh_v.dtype)
  d1, d0 = dims
  return (jnp.mean(full, axis=d0).astype(fresh_row.dtype), jnp.mean(full, axis=d1).astype(fresh_col.dtype), fresh_v)


def carry_adafactor_state(old_state, old_params, new_params, fresh_state):
  """The ``"carry"`` optimizer state for ``new_params`` (see the module doc): the count, and each LoRA
  factor's second moments averaged over its rank axis (a: last axis, b: first) and broadcast to the new rank,
  re-encoded in the new rank's (factored or full) layout. Other state leaves come from ``fresh_state``."""

  def is_factored_state(x):
    return isinstance(x, optax.FactoredState)

  old_fs = [s for s in jax.tree.leaves(old_state, is_leaf=is_factored_state) if is_factored_state(s)]
  new_fs = [s for s in jax.tree.leaves(fresh_state, is_leaf=is_factored_state) if is_factored_state(s)]
  if len(old_fs) != 1 or len(new_fs) != 1:
    raise ValueError("carry_adafactor_state: expected exactly one Adafactor FactoredState in the state")
  old_fs, new_fs = old_fs[0], new_fs[0]

  def carry_leaf(path, old_p, new_p, o_row, o_col, o_v, f_row, f_col, f_v):
    full = _full_second_moment(old_p.shape, o_row, o_col, o_v)
    rank_axis = 0 if path[-1].key == "b" else full.ndim - 1
    mean = jnp.mean(full, axis=rank_axis, keepdims=True)
    new_full = jnp.broadcast_to(mean, new_p.shape)
    return _encode_second_moment(new_full, f_row, f_col, f_v)

  carried = jax.tree_util.tree_map_with_path(
      carry_leaf, old_params, new_params, old_fs.v_row, old_fs.v_col, old_fs.v, new_fs.v_row, new_fs.v_col, new_fs.v
  )
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and not isinstance(x, optax.FactoredState)
  v_row = jax.tree.map(lambda t: t[0], carried, is_leaf=is_triple)
  v_col = jax.tree.map(lambda t: t[1], carried, is_leaf=is_triple)
  v = jax.tree.map(lambda t: t[2], carried, is_leaf=is_triple)
  replacement = optax.FactoredState(count=old_fs.count, v_row=v_row, v_col=v_col, v=v)
  return jax.tree.map(lambda s: replacement if is_factored_state(s) else s, fresh_state, is_leaf=is_factored_state)


# --------------------------------------------------------------------------------------------------------
# The trainer: jitted steps for one model / LoRA layout.
# --------------------------------------------------------------------------------------------------------


class Trainer:
  """The jitted train step and rank-change step for one model and LoRA configuration.

  Attributes:
    traces: {"train_step": n, "change_rank": n}: how often each was traced (compiled). The train step traces
      once per distinct rank, the rank change once per (source ranks, target rank) signature; a retrace for
      the same shapes would show here (tests assert it). Programs compiled ahead (``precompile``) count
      their one trace too.
    precompiler: the ``Precompiler`` started by ``precompile`` (None before): its ``log`` says what was
      compiled in the background, when, and how long the loop waited for it.
  """

  def __init__(
      self,
      model,
      lora_config: lora_lib.LoRAConfig,
      *,
      max_targets: int,
      squeeze_method: str = "efficient",
      optimizer_state: str = "fresh",
      mesh=None,
      shard_lora: bool = False,
      remat: bool = False,
  ):
    if optimizer_state not in OPTIMIZER_STATE_MODES:
      raise ValueError(
          f"config.squeeze.optimizer_state={optimizer_state!r}: expected one of " f"{OPTIMIZER_STATE_MODES}"
      )
    squeeze_lib.check_method(squeeze_method)
    self.model = model
    self.lora_config = lora_config
    self.module = lora_lib.LoRA(model=model.transformer, config=lora_config)
    self.optimizer = make_optimizer()
    self.max_targets = int(max_targets)
    self.squeeze_method = squeeze_method
    self.optimizer_state = optimizer_state
    self.softcap = getattr(model.config, "final_logit_softcap", None)
    self.traces = {"train_step": 0, "change_rank": 0, "loss": 0}
    # Sharded mode (``mesh`` given, see sharding.py): the same jitted functions; their impls pin the
    # state's shardings with ``with_sharding_constraint`` (a rule of the shapes, so it also covers the new
    # rank's shapes in the rank change) and the host-side inputs (batch, keys, lr) become global arrays.
    # ``mesh=None`` (one device) leaves every program exactly as it was.
    self.mesh = mesh
    self.shard_lora = bool(shard_lora)
    self.remat = bool(remat)  # rematerialise each block in the train step's backward (config.remat)
    self._train_step = jax.jit(self._train_step_impl, donate_argnums=(0,))
    self._eval_loss = jax.jit(self._eval_loss_impl)
    # Not donated: the outputs have other shapes (new rank), so XLA could not reuse the buffers anyway.
    self._change = jax.jit(self._change_impl, static_argnames=("rank",))
    self.precompiler: Precompiler | None = None

  # --- state ---
  def init_state(self, key: jax.Array, rank: int) -> dict:
    cfg = dataclasses.replace(self.lora_config, rank=int(rank))
    if self.mesh is not None:
      # Created in place with its shardings (``jax.jit(init, out_shardings=...)``), never on one device first.
      init = lambda key_data: self._state_from_params_impl(
          lora_lib.init_lora(jax.random.wrap_key_data(key_data), self.model.config, cfg)
      )
      key_data = self._host_key(key)
      out = self.state_shardings(jax.eval_shape(init, key_data))
      return jax.jit(init, out_shardings=out)(key_data)
    params = lora_lib.init_lora(key, self.model.config, cfg)
    return self.state_from_params(params)

  def _state_from_params_impl(self, params) -> dict:
    return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

  def state_from_params(self, params) -> dict:
    if self.mesh is not None:
      params = sharding_lib.put(params, self.state_shardings(params))
      out = self.state_shardings(jax.eval_shape(self._state_from_params_impl, params))
      return jax.jit(self._state_from_params_impl, out_shardings=out)(params)
    # Committed to the default device, like the train step's outputs: an uncommitted first state lowers the
    # step with unspecified input shardings, its (committed) output with SingleDeviceShardings, so the
    # second step compiled the whole program again (7-15 s per run on the real 270M on CPU).
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.device_put(self._state_from_params_impl(params), single)

  def state_shardings(self, tree) -> Any:
    """NamedShardings of a state-like tree (arrays or ShapeDtypeStructs) under the mesh (sharding.py)."""
    return sharding_lib.state_shardings(tree, self.mesh, shard_lora=self.shard_lora)

  def _constrain(self, tree):
    return tree if self.mesh is None else jax.lax.with_sharding_constraint(tree, self.state_shardings(tree))

  def _host_key(self, key: jax.Array) -> np.ndarray:
    # Keys cross into sharded programs as host uint32 data: a single-device key array cannot be an input of
    # a program spanning other processes' devices.
    return np.asarray(jax.random.key_data(key))

  def _global_batch(self, batch):
    return sharding_lib.global_batch(batch, self.mesh)

  def _check_budget(self, batch) -> None:
    # Sharded: each process checks its own rows against its share of the static gather size (sufficient
    # for the global bound; identical to the one-process check when a process holds the whole batch).
    check_target_budget(batch, self.max_targets // jax.process_count())

  def abstract_state(self, ranks: int | Mapping[str, int]) -> Any:
    cfg = dataclasses.replace(self.lora_config, rank=ranks)
    shapes = lora_lib.lora_shapes(self.model.config, cfg)
    params = traverse_util.unflatten_dict(
        {
            f"{p}/{n}": jax.ShapeDtypeStruct(s, jnp.float32)
            for p, (a, b) in shapes.items()
            for n, s in (("a", a), ("b", b))
        },
        sep="/",
    )
    abstract = jax.eval_shape(self._state_from_params_impl, params)
    if self.mesh is None:
      return abstract
    # With shardings, so orbax restores every array straight onto its devices.
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, self.state_shardings(abstract)
    )

  # --- loss ---
  def _hidden(self, lora_params, base_params, batch):
    params = lora_lib.merge_params(base_params, lora_params)
    # Vision-language batches carry "images" (data.pipeline): the frozen vision tower fills the image's soft
    # tokens, which attend to each other both ways (as in gemma). Text batches run exactly as before.
    images = batch.get("images")
    mask = lora_lib.attention_mask_from_segments(
        batch["segment_ids"], tokens=None if images is None else batch["tokens"]
    )
    return self.module.apply(
        {"params": params},
        batch["tokens"],
        positions=batch["positions"],
        attention_mask=mask,
        images=images,
        remat=self.remat,
        method=self.module.hidden_states,
    )

  def _loss(self, lora_params, base_params, batch):
    hidden = self._hidden(lora_params, base_params, batch)
    embedding = base_params["embedder"]["input_embedding"]
    return answer_loss(
        hidden, batch["tokens"], batch["loss_mask"], embedding, max_targets=self.max_targets, softcap=self.softcap
    )

  def _train_step_impl(self, state, base_params, batch, learning_rate):
    self.traces["train_step"] += 1
    (loss, count), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], base_params, batch)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    params = optax.apply_updates(state["params"], updates)
    # The loss is that of the params before the update; the new params are checked too, so a divergent
    # update is never checkpointed (the run loop stops before saving such a state).
    metrics = {
        "loss": loss,
        "targets": count,
        "grad_norm": optax.global_norm(grads),
        "params_finite": jnp.isfinite(optax.global_norm(params)),
    }
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if self.mesh is not None:  # the state keeps its layout; metrics replicated (every process reads them)
      new_state = self._constrain(new_state)
      metrics = jax.lax.with_sharding_constraint(
          metrics, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      )
    return new_state, metrics

  def _train_step_args(self, state, base_params, batch, learning_rate: float):
    if self.mesh is not None:
      self._check_budget(batch)
      return state, base_params, self._global_batch(batch), np.float32(learning_rate)
    check_target_budget(batch, self.max_targets)
    return state, base_params, batch, jnp.float32(learning_rate)

  def train_step(self, state, base_params, batch, learning_rate: float):
    """One optimizer step; ``state`` is donated (do not reuse it). Returns (new state, device metrics).

    ``batch``: host numpy, the whole batch, or under a mesh this process's rows of the global batch. A step
    at ranks that ``precompile`` compiled ahead runs that executable (waiting for its compile if it is still
    running); otherwise the jitted step (compiled on its first call at these shapes)."""
    args = self._train_step_args(state, base_params, batch, learning_rate)
    compiled = self._ahead(("train_step", rank_signature(state["params"])))
    return (compiled or self._train_step)(*args)

  def _eval_loss_impl(self, lora_params, base_params, batch):
    self.traces["loss"] += 1
    return self._loss(lora_params, base_params, batch)

  def eval_loss(self, lora_params, base_params, batch):
    if self.mesh is not None:
      self._check_budget(batch)
      return self._eval_loss(lora_params, base_params, self._global_batch(batch))
    check_target_budget(batch, self.max_targets)
    return self._eval_loss(lora_params, base_params, batch)

  # --- rank change ---
  def _change_impl(self, state, key, *, rank: int):
    self.traces["change_rank"] += 1
    if self.mesh is not None:
      key = jax.random.wrap_key_data(key)
    params, _ = lora_lib.change_rank(state["params"], rank, self.lora_config, method=self.squeeze_method, key=key)
    fresh = self.optimizer.init(params)
    if self.optimizer_state == "carry":
      opt_state = carry_adafactor_state(state["opt_state"], state["params"], params, fresh)
    else:
      opt_state = fresh
    # Sharded: squeeze_lora ran on the state's (replicated or fsdp-sharded) factors; the new rank's state
    # gets its shardings from the same rule.
    return self._constrain({"params": params, "opt_state": opt_state, "step": state["step"]})

  def _change_key(self, key: jax.Array):
    # The jitted impl takes a typed key on one device, raw key data (host uint32) on a mesh.
    return key if self.mesh is None else self._host_key(key)

  def change_rank(self, state, rank: int, key: jax.Array):
    """The state at a new rank (params squeezed, optimizer state fresh or carried).

    ONE jitted program for the whole tree (every module's squeeze side by side, the optimizer state, the
    shardings), compiled once per (source ranks, target rank) signature, on one device as on a mesh. (Until
    issue 19 one device ran it module by module, outside jit, after XLA:CPU wedged on batched squeezes with
    jaxlib 0.10.0; ``experiments/xla_cpu_hang_check.py`` no longer reproduces that with the pinned stack,
    and the whole-tree program's compile, 20-40 s cold on the 270M, is what ``precompile`` takes off the
    critical path.) A change that ``precompile`` compiled ahead runs that executable."""
    compiled = self._ahead(("change_rank", rank_signature(state["params"]), int(rank)))
    key = self._change_key(key)
    if compiled is not None:
      return compiled(state, key)
    return self._change(state, key, rank=int(rank))

  # --- programs compiled ahead of time ---
  def _ahead(self, signature):
    return None if self.precompiler is None else self.precompiler.get(signature)

  def _struct(self, x) -> jax.ShapeDtypeStruct:
    """The abstract value of an argument as a call passes it: a committed jax Array with its sharding; an
    uncommitted one or a host array without one (jax places it, as it does for the jitted call). Anything
    else lowers to another program text, which also misses the persistent compile cache (tested)."""
    if isinstance(x, jax.Array) and x.committed:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  def abstract_call_state(self, ranks) -> Any:
    """``abstract_state(ranks)`` with the shardings a live state has: the mesh's, or (one device) committed
    to the default device like ``state_from_params``'s and every step's outputs."""
    abstract = self.abstract_state(ranks)
    if self.mesh is not None:
      return abstract
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract)

  def precompile(self, ladder, *, base_params, batch, key: jax.Array) -> "Precompiler":
    """Compiles, in one background thread and in order, the programs the coming stage boundaries need.

    ``ladder``: [(ranks before, ranks after), ...], one per coming rank change, in the order they happen;
    for each, the rank change (before -> after) and then the train step at ``after`` are lowered from
    abstract shapes (``jax.ShapeDtypeStruct``s with the shardings the live arguments have: the base's and
    the batch's taken from ``base_params`` and ``batch``, one example of each; the state's from the same
    rule the live state follows) and compiled (``jax.jit(...).lower(...).compile()``, which also reads and
    fills the persistent compile cache). ``train_step`` and ``change_rank`` then run those executables at
    those signatures. The programs are the jitted ones' (same function, same abstract inputs): the results
    are bit-identical (tested). Every process of a multi-host run compiles the same programs in the same
    order from the same shapes (nothing in it depends on the process).
    """
    if self.precompiler is None:
      self.precompiler = Precompiler()
    step_args = self._train_step_args(None, base_params, batch, 0.0)
    base_s, batch_s, lr_s = (jax.tree.map(self._struct, a) for a in step_args[1:])
    key_s = jax.tree.map(self._struct, self._change_key(key))
    for before, after in ladder:
      before_s, after_s = self.abstract_call_state(before), self.abstract_call_state(after)
      self.precompiler.submit(
          ("change_rank", rank_signature(before_s["params"]), int(after)),
          f"change_rank r{before} -> r{after}",
          lambda b=before_s, a=after: self._change.lower(b, key_s, rank=int(a)).compile(),
      )
      self.precompiler.submit(
          ("train_step", rank_signature(after_s["params"])),
          f"train_step r{after}",
          lambda a=after_s: self._train_step.lower(a, base_s, batch_s, lr_s).compile(),
      )
    return self.precompiler

  def close(self) -> None:
    """Stops the background compiles (a running one finishes; queued ones are dropped)."""
    if self.precompiler is not None:
      self.precompiler.close()


def rank_signature(params) -> tuple:
  """What a compiled program of the LoRA params depends on: every leaf's shape, in tree order."""
  return tuple(tuple(x.shape) for x in jax.tree.leaves(params))


class Precompiler:
  """Programs compiled in one background thread, in the order submitted; ``get`` waits for one.

  ``log``: one entry per program: its name, the seconds its compile took (``seconds``; it shares the CPUs
  with the train loop), when it started and ended (``start``/``end``, seconds on ``time.time()``'s clock),
  how long the train loop waited for it (``waited``), and its error if it failed (the loop then falls back
  to the jitted call, which compiles in place; the error is printed once).
  """

  def __init__(self):
    import concurrent.futures  # pylint: disable=g-import-not-at-top

    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_squeeze_compile")
    self._futures: dict[Any, Any] = {}
    self._entries: dict[Any, dict[str, Any]] = {}
    self.log: list[dict[str, Any]] = []

  def submit(self, signature, name: str, compile_fn: Callable[[], Any]) -> None:
    if signature in self._futures:
      return
    entry = {"program": name, "seconds": None, "start": None, "end": None, "waited": 0.0, "error": None}

    def work():
      entry["start"] = time.time()
      try:
        return compile_fn()
      finally:
        entry["end"] = time.time()
        entry["seconds"] = entry["end"] - entry["start"]

    self._entries[signature] = entry
    self.log.append(entry)
    self._futures[signature] = self._pool.submit(work)

  def get(self, signature):
    """The compiled program for ``signature`` (waiting for it), or None if none was submitted or it failed."""
    future = self._futures.get(signature)
    if future is None:
      return None
    entry = self._entries[signature]
    t = time.time()
    try:
      compiled = future.result()
    except Exception as e:  # pylint: disable=broad-except
      if entry["error"] is None:
        entry["error"] = f"{type(e).__name__}: {e}"
        print(
            f"[lora_squeeze] background compile of {entry['program']} failed ({entry['error']}); compiling it in place"
        )
      compiled = None
    entry["waited"] += time.time() - t
    return compiled

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------
# Checkpoints, metadata, results.
# --------------------------------------------------------------------------------------------------------


def _encode_data_state(state: Any) -> Any:
  if isinstance(state, bytes):
    return {"bytes_b64": base64.b64encode(state).decode("ascii")}
  return {"json": state}


def _decode_data_state(encoded: Mapping[str, Any]) -> Any:
  if "bytes_b64" in encoded:
    return base64.b64decode(encoded["bytes_b64"])
  return encoded["json"]


class Checkpoints:
  """orbax CheckpointManager around {state, meta}; ids are 2·global_step + phase (see module doc)."""

  SKIPPED_DIR = "skipped_checkpoints"

  def __init__(self, directory: Path, *, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  @staticmethod
  def describe(ckpt_id: int) -> str:
    return f"step {ckpt_id // 2}" + (" (just after a rank change)" if ckpt_id % 2 else "")

  def save(self, state, meta: Mapping[str, Any]) -> None:
    ckpt_id = 2 * int(meta["global_step"]) + (1 if meta["phase"] == "changed" else 0)
    if ckpt_id in self.manager.all_steps():
      return
    self.manager.save(
        ckpt_id,
        args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(dict(meta))
        ),
    )
    self.manager.wait_until_finished()

  def latest(self) -> int | None:
    """The newest checkpoint's id (None: none)."""
    return self.manager.latest_step()

  def latest_meta(self) -> dict | None:
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore_latest(self, abstract_state: Callable[[Any], Any]) -> tuple[dict, Any] | None:
    """(meta, state) of the newest checkpoint that restores (None: there is none).

    ``abstract_state(ranks)``: the state's abstract tree for the ranks the meta records. A newer checkpoint
    that does not restore (a truncated array file, missing metadata, ...) is skipped with one line saying
    which and why, and moved to ``skipped_checkpoints/`` beside the checkpoint directory, so that the run
    can save that step again. If none restores: ``workdir.UserError``.
    """
    args = self._ocp.args
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for ckpt_id in steps:
      try:
        meta = dict(self.manager.restore(ckpt_id, args=args.Composite(meta=args.JsonRestore()))["meta"])
        state = self.manager.restore(
            ckpt_id, args=args.Composite(state=args.StandardRestore(abstract_state(meta["ranks"])))
        )["state"]
      except Exception as e:  # pylint: disable=broad-except  (any failure to restore: try an older one)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(
            f"[lora_squeeze] checkpoint {self.describe(ckpt_id)} in {self.directory} does not restore, "
            f"skipped: {reason}"
        )
        bad.append(ckpt_id)
        continue
      self._set_aside(bad)
      return meta, state
    if steps:
      raise workdir_lib.UserError(
          f"none of the {len(steps)} checkpoints in {self.directory} restores (newest: "
          f"{self.describe(steps[0])}); add --fresh to start the run afresh (the old files are kept aside)"
      )
    return None

  def discard_from(self, global_step: int, *, why: str) -> None:
    """Sets aside every checkpoint at ``global_step`` or later (a state that led to a non-finite loss)."""
    bad = [i for i in self.manager.all_steps() if i // 2 >= global_step]
    for ckpt_id in bad:
      print(f"[lora_squeeze] checkpoint {self.describe(ckpt_id)} set aside: {why}")
    self._set_aside(bad)

  def _set_aside(self, ckpt_ids) -> None:
    if not ckpt_ids:
      return
    if jax.process_index() == 0:
      dest = self.directory.parent / self.SKIPPED_DIR
      dest.mkdir(exist_ok=True)
      for ckpt_id in ckpt_ids:
        src = self.directory / str(ckpt_id)
        if src.exists():
          os.replace(src, dest / f"{ckpt_id}.{int(time.time())}")
    sharding_lib.sync(f"checkpoints:{self.directory}:set_aside")
    self.manager.reload()

  def close(self):
    self.manager.close()


def save_adapter(directory: Path, lora_params, lora_config: lora_lib.LoRAConfig, *, extra=None) -> None:
  """The final LoRA params as an orbax checkpoint plus ``lora_config.json``, written atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = Path(directory).absolute()
  # Several processes: all of them call orbax's save (it synchronises them) on ONE temporary path, and only
  # process 0 touches the filesystem around it, between barriers.
  multi = jax.process_count() > 1
  primary = jax.process_index() == 0
  tmp = directory.with_name(f".{directory.name}.tmp" + ("" if multi else str(os.getpid())))
  if primary:
    if tmp.exists():
      import shutil  # pylint: disable=g-import-not-at-top

      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
  sharding_lib.sync(f"save_adapter:{directory}:tmp")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / "params", lora_params)
    ckptr.wait_until_finished()
  ranks = lora_lib.lora_ranks(lora_params)
  meta = {
      "rank": lora_lib.describe_ranks(ranks),
      "alpha": lora_config.alpha,
      "targets": list(lora_config.targets),
      "joint_kv": lora_config.joint_kv,
      "joint_gate_up": lora_config.joint_gate_up,
      **(extra or {}),
  }
  if primary:
    (tmp / "lora_config.json").write_text(json.dumps(meta, indent=2))
    if directory.exists():
      import shutil  # pylint: disable=g-import-not-at-top

      shutil.rmtree(directory)
    os.replace(tmp, directory)
  sharding_lib.sync(f"save_adapter:{directory}:done")


def load_adapter(directory: Path) -> tuple[dict, lora_lib.LoRAConfig, dict]:
  """(LoRA params, LoRAConfig, the json metadata) of an adapter written by ``save_adapter``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = Path(directory).absolute()
  meta_path = directory / "lora_config.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"no adapter at {directory} (missing lora_config.json); is the source run " "finished?")
  meta = json.loads(meta_path.read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / "params")
  params = jax.tree.map(jnp.asarray, params)
  config = lora_lib.LoRAConfig(
      rank=meta["rank"],
      alpha=meta["alpha"],
      targets=tuple(meta["targets"]),
      joint_kv=meta["joint_kv"],
      joint_gate_up=meta["joint_gate_up"],
  )
  return params, config, meta


# --------------------------------------------------------------------------------------------------------
# Running a config.
# --------------------------------------------------------------------------------------------------------


def lora_config_from(config) -> lora_lib.LoRAConfig:
  c = config.lora
  rank = int(c.rank) if config.mode == "direct" else int(_cfg(config, "source_rank", c.rank))
  return lora_lib.LoRAConfig(
      rank=rank,
      alpha=c.get("alpha", None),
      targets=tuple(c.targets),
      joint_kv=bool(c.joint_kv),
      joint_gate_up=bool(c.joint_gate_up),
  )


def load_model(config, *, mesh=None):
  """``models.load`` of ``config.model``. With a ``mesh``, a checkpoint is restored straight onto the fsdp
  rule's shardings: gemma's default restores it REPLICATED, a whole copy of the base on every device (12B in
  bfloat16: 24 GB per device) before the train loop splits it."""
  from lora_squeeze import models  # pylint: disable=g-import-not-at-top

  options = dict(config.get("model_options", {}) or {})
  if mesh is not None and options.get("checkpoint"):
    options["sharding"] = lambda abstract: sharding_lib.base_shardings(abstract, mesh)
  return models.load(config.model, **options)


def _image_spec(model):
  """The model's ``data.pipeline.ImageSpec`` (None for a text-only model)."""
  from lora_squeeze import models  # pylint: disable=g-import-not-at-top

  return models.image_spec(model)


def make_train_iterator(config, tokenizer, *, shard: tuple[int, int] = (0, 1), image_spec=None):
  """The training batch iterator named by ``config.data`` (batch contract of ``lora_squeeze.data``).

  ``shard=(index, count)``: this process's block of rows of every global batch
  (``sharding.process_batch_shard``); the iterator state stays that of the global stream, so a run can
  resume on another number of processes. ``image_spec``: the model's (``models.image_spec``), so that
  vision-language tasks' batches carry their images."""
  d = config.data
  seed = int(config.seed)
  if d.source == "synthetic":
    from lora_squeeze.data import synthetic  # pylint: disable=g-import-not-at-top

    return synthetic.SyntheticIterator(
        tokenizer, batch_size=int(d.batch_size), max_len=int(d.max_len), seed=seed, shard=shard
    )
  from lora_squeeze import data  # pylint: disable=g-import-not-at-top

  return data.train_iterator_from_config(config, tokenizer, shard=shard, image_spec=image_spec)


def _stage_key(seed: int, stage: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), 1000 + stage)


class _Metrics:
  """metrics.jsonl, appended by process 0; on resume lines past the restored step are dropped."""

  def __init__(self, path: Path, *, resume_step: int, primary: bool):
    self.path = path
    self.primary = primary
    if primary and path.exists():
      keep = [
          line
          for line in path.read_text().splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]
      fileio.atomic_write_text(path, "".join(line + "\n" for line in keep))

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _fault_point(name: str) -> None:
  """Fault injection for the kill/resume tests: ``LORA_SQUEEZE_FAULT=name`` SIGKILLs this process here."""
  if os.environ.get("LORA_SQUEEZE_FAULT") == name:
    os.kill(os.getpid(), signal.SIGKILL)


def run(config, workdir: str | os.PathLike, *, evaluate_fn: Callable | None = None, fresh: bool = False) -> dict:
  """Run (or resume, or skip if finished) the config in ``workdir``; returns the result dict.

  ``evaluate_fn(model, lora_params, lora_config) -> dict`` computes final metrics; by default
  ``evaluate.evaluate_config`` when ``config.eval.enabled``.

  The workdir guarantees of ``lora_squeeze.workdir`` hold: the config is checked before anything is
  created (``config_lib.check_run_config``); one process writes a workdir at a time (``workdir.Lock``); a
  workdir holding a run with other result-determining settings is refused (``workdir.SettingsMismatch``),
  unless ``fresh``, which moves the old run to ``workdir/superseded/`` and starts afresh.
  """
  from lora_squeeze import config_lib  # pylint: disable=g-import-not-at-top

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
  result_path = workdir / RESULT_NAME
  if result_path.exists():
    result = json.loads(result_path.read_text())
    print(f"[lora_squeeze] {workdir} is finished ({RESULT_NAME} exists): nothing to do")
    return result
  primary = jax.process_index() == 0
  if config.mode == "post_squeeze":
    return _run_post_squeeze(config, workdir, evaluate_fn=evaluate_fn)
  if config.mode == "zero_shot":
    return _run_zero_shot(config, workdir, evaluate_fn=evaluate_fn)

  t_start = time.time()
  stages = plan_stages(config)
  lora_config = lora_config_from(config)
  max_targets = int(config.data.batch_size) * int(config.data.max_target_tokens)
  # Several devices (or processes): the (data, fsdp) mesh of config.mesh (sharding.py). One device: no
  # mesh, exactly the single-device programs.
  mesh, shard = None, (0, 1)
  if jax.device_count() > 1:
    mesh = sharding_lib.mesh_from_config(config)
    shard = sharding_lib.process_batch_shard(mesh, int(config.data.batch_size))
  model = load_model(config, mesh=mesh)
  trainer = Trainer(
      model,
      lora_config,
      max_targets=max_targets,
      squeeze_method=config.squeeze.method,
      optimizer_state=config.squeeze.optimizer_state,
      mesh=mesh,
      shard_lora=sharding_lib.shard_lora_enabled(config),
      remat=bool(config.remat),
  )
  ckpts = Checkpoints(workdir / "checkpoints", keep=int(config.keep_checkpoints))
  iterator = make_train_iterator(config, model.tokenizer, shard=shard, image_spec=_image_spec(model))
  seed = int(config.seed)

  restored = ckpts.restore_latest(trainer.abstract_state)
  stage_losses: dict[int, float] = {}
  if restored is not None:
    meta, state = restored
    stage_losses = {int(k): v for k, v in meta.get("stage_losses", {}).items()}
    iterator.set_state(_decode_data_state(meta["data_state"]))
    stage_idx, stage_step, phase = int(meta["stage"]), int(meta["stage_step"]), meta["phase"]
    wall_before = float(meta["wall_seconds"])
    print(
        f"[lora_squeeze] resuming {workdir} at step {meta['global_step']} (stage {stage_idx}, "
        f"{stage_step}/{stages[stage_idx].steps}, phase {phase})"
    )
  else:
    if stages[0].squeeze_first:
      source_params, source_cfg, _ = load_adapter(Path(config.source_workdir) / ADAPTER_DIR)
      _check_same_layout(source_cfg, lora_config, config.source_workdir)
      state = trainer.state_from_params(source_params)
    else:
      state = trainer.init_state(jax.random.fold_in(jax.random.key(seed), 0), stages[0].rank)
    stage_idx, stage_step, phase, wall_before = 0, 0, "trained", 0.0
  global_step = int(state["step"])
  metrics_log = _Metrics(workdir / METRICS_NAME, resume_step=global_step, primary=primary)
  base_params = model.params
  if mesh is not None:  # the frozen base split over fsdp (each device receives only its slices)
    base_params = sharding_lib.put(base_params, sharding_lib.base_shardings(base_params, mesh))

  def make_meta(stage_idx, stage_step, phase):
    return {
        "stage": stage_idx,
        "stage_step": stage_step,
        "phase": phase,
        "global_step": int(state["step"]),
        "ranks": lora_lib.describe_ranks(lora_lib.lora_ranks(state["params"])),
        "data_state": _encode_data_state(iterator.get_state()),
        "seed": seed,
        "stage_losses": {str(k): v for k, v in stage_losses.items()},
        "wall_seconds": wall_before + time.time() - t_start,
    }

  total_steps = sum(s.steps for s in stages)
  progress = _progress_bar(total_steps, global_step, enabled=bool(config.get("progress", True)) and primary)
  writer = _tensorboard_writer(workdir, enabled=bool(config.get("tensorboard", False)) and primary)
  timing: dict[int, dict[str, Any]] = {}
  log_every, checkpoint_every = int(config.log_every), int(config.checkpoint_every)
  background_compile = bool(config.get("background_compile", True))
  t_loop = time.time()
  t_last_step = None  # when the previous stage's last step ended (synced): a boundary's stall starts there
  end_save_seconds = 0.0  # the previous stage's end checkpoint
  try:
    for stage in stages[stage_idx:]:
      stage_time = timing.setdefault(
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
              "save_seconds": end_save_seconds if t_last_step is not None else 0.0,
          },
      )
      resumed_here = stage.index == stage_idx and (stage_step > 0 or phase == "changed")
      if (stage.index > 0 or stage.squeeze_first) and not resumed_here:
        t = time.time()
        state = jax.block_until_ready(trainer.change_rank(state, stage.rank, _stage_key(seed, stage.index)))
        stage_time["change_seconds"] = time.time() - t
        stage_step = 0
        _fault_point(f"after_change:{stage.index}")
        t = time.time()
        ckpts.save(state, make_meta(stage.index, 0, "changed"))
        stage_time["save_seconds"] += time.time() - t
        _fault_point(f"after_change_saved:{stage.index}")
      elif not resumed_here:
        stage_step = 0
      pending: list[tuple[int, int, float, int, Any]] = []
      clock = [time.time(), stage_step]

      def flush(stage=stage):
        if not pending:
          return
        fetched = jax.device_get([p[4] for p in pending])
        now = time.time()
        rate = (pending[-1][1] - clock[1]) / max(now - clock[0], 1e-9)
        tokens_rate = sum(p[3] for p in pending) / max(now - clock[0], 1e-9)
        for (g_step, s_step, s_lr, _, _), mv in zip(pending, fetched):
          loss = float(mv["loss"])
          if not math.isfinite(loss) or not bool(mv["params_finite"]):
            what = f"loss {loss}" if not math.isfinite(loss) else "parameters after the update"
            if not math.isfinite(loss):  # the state this loss was computed on (step g - 1) is not good either
              ckpts.discard_from(g_step - 1, why=f"its loss at step {g_step} is {loss}")
            kept = ckpts.latest()
            kept = (
                f"the newest checkpoint, {Checkpoints.describe(kept)}, stays in {workdir / 'checkpoints'}"
                if kept is not None
                else "no checkpoint was saved before it"
            )
            raise FloatingPointError(
                f"non-finite {what} at step {g_step} (stage {stage.index}, rank {stage.rank}, learning rate "
                f"{s_lr:g}); stopped without saving that state: {kept}. Lower config.learning_rate / "
                "config.lr_by_rank and rerun with --fresh."
            )
          record = {
              "step": g_step,
              "stage": stage.index,
              "rank": stage.rank,
              "stage_step": s_step,
              "lr": s_lr,
              "loss": loss,
              "targets": int(mv["targets"]),
              "grad_norm": float(mv["grad_norm"]),
              "steps_per_s": rate,
              "tokens_per_s": tokens_rate,
          }
          metrics_log.write(record)
          if writer is not None:
            writer.write_scalars(
                g_step, {k: record[k] for k in ("loss", "lr", "rank", "grad_norm", "steps_per_s", "tokens_per_s")}
            )
        stage_losses[stage.index] = float(fetched[-1]["loss"])
        progress.update(len(pending))
        progress.set_postfix(
            stage=f"{stage.index + 1}/{len(stages)}",
            rank=stage.rank,
            loss=f"{float(fetched[-1]['loss']):.4f}",
            steps_s=f"{rate:.2f}",
            tok_s=f"{tokens_rate:,.0f}",
        )
        clock[:] = [now, pending[-1][1]]
        pending.clear()

      first = True
      start_step = stage_step
      while stage_step < stage.steps:
        lr = schedules.warmup_constant(stage_step, peak=stage.learning_rate, warmup_steps=stage.warmup_steps)
        batch = next(iterator)
        t = time.time()
        state, m = trainer.train_step(state, base_params, batch, lr)
        if first:  # the stage's compile (a new rank) + one step; one sync per stage
          jax.block_until_ready(m)
          stage_time["first_step_seconds"] = time.time() - t
          if t_last_step is not None:
            stage_time["boundary_seconds"] = time.time() - t_last_step
          clock[:] = [t, stage_step]  # the first flush reports this (compiling) step's own rate
          t_steady = time.time()
          if background_compile and trainer.precompiler is None and stage.index + 1 < len(stages):
            # This stage's program is compiled and running: the coming boundaries' programs compile beside it.
            trainer.precompile(
                [(stages[j - 1].rank, stages[j].rank) for j in range(stage.index + 1, len(stages))],
                base_params=base_params,
                batch=batch,
                key=_stage_key(seed, stage.index + 1),
            )
        stage_step += 1
        global_step += 1
        pending.append((global_step, stage_step, lr, int(np.asarray(batch["segment_ids"]).astype(bool).sum()), m))
        checkpoint_now = stage_step == stage.steps or global_step % checkpoint_every == 0
        if first:
          flush()
          first = False
        elif len(pending) >= log_every or checkpoint_now:
          flush()
        if checkpoint_now:
          if stage_step == stage.steps:  # steps after this stage's first, up to its end (flushed: synced)
            t_last_step = time.time()
            stage_time["steady_seconds"] = t_last_step - t_steady
            stage_time["steady_steps"] = stage.steps - start_step - 1
            stage_time["steady_window"] = [t_steady - t_loop, t_last_step - t_loop]
          t = time.time()
          ckpts.save(state, make_meta(stage.index, stage_step, "trained"))
          if stage_step == stage.steps:  # the stage-end checkpoint: part of the next boundary
            end_save_seconds = time.time() - t
          _fault_point(f"after_save:{global_step}")
      stage_idx, phase = stage.index, "trained"
  finally:
    progress.close()
    trainer.close()
    if writer is not None:
      writer.flush()
  train_seconds = time.time() - t_loop

  final_params = state["params"]
  if mesh is not None:  # evaluation and the adapter files are host-side: every process gets the whole LoRA
    final_params = sharding_lib.to_host(final_params)
  final_config = dataclasses.replace(lora_config, rank=lora_lib.describe_ranks(lora_lib.lora_ranks(final_params)))
  metrics = _evaluate(config, model, final_params, final_config, evaluate_fn)
  save_adapter(workdir / ADAPTER_DIR, final_params, final_config, extra={"mode": config.mode})
  ckpts.close()
  wall = wall_before + time.time() - t_start
  result = {
      "mode": config.mode,
      "model": config.model,
      "task": config.data.get("task", None),
      "seed": seed,
      "stages": [dataclasses.asdict(s) | {"final_loss": stage_losses.get(s.index)} for s in stages],
      "ranks_per_stage": [s.rank for s in stages],
      "final_rank": stages[-1].rank,
      "source_rank": _source_rank(config) if stages[0].squeeze_first else stages[0].rank,
      "learning_rate": stages[0].learning_rate,
      "scheme": str(config.scheme) if config.mode == "in_squeeze" else None,
      "squeeze_method": str(config.squeeze.method) if len(stages) > 1 or stages[0].squeeze_first else None,
      "optimizer_state": str(config.squeeze.optimizer_state) if len(stages) > 1 else None,
      "source_workdir": str(_cfg(config, "source_workdir", "") or "") or None,
      "steps": int(state["step"]),
      "wall_seconds": wall,
      "final_train_loss": stage_losses.get(stages[-1].index),
      "metrics": metrics,
      "timing": _timing_summary(timing, train_seconds, trainer.precompiler, t_loop),
  }
  if primary:
    fileio.atomic_write_text(result_path, json.dumps(result, indent=2))
  return result


def _timing_summary(
    timing: Mapping[int, Mapping[str, Any]], train_seconds: float, precompiler=None, t_loop: float = 0.0
) -> dict[str, Any]:
  """Where the train loop's time went (this process's run; a resumed run counts only its own part).

  ``background_compile``: the programs compiled ahead (``Trainer.precompile``), each with its compile
  seconds, its start/end in seconds since the loop started, and how long the loop waited for it; stages
  carry ``steady_window`` (the same clock), so a compile's overlap with steady steps can be measured."""
  stages = [dict(v, stage=k) for k, v in sorted(timing.items())]
  steady = [s["steady_seconds"] / s["steady_steps"] for s in stages if s.get("steady_steps", 0) > 0]
  compiles = []
  for e in precompiler.log if precompiler is not None else []:
    compiles.append(
        {
            "program": e["program"],
            "seconds": e["seconds"],
            "start": None if e["start"] is None else e["start"] - t_loop,
            "end": None if e["end"] is None else e["end"] - t_loop,
            "waited": e["waited"],
            "error": e["error"],
        }
    )
  return {
      "train_seconds": train_seconds,
      "stages": stages,
      "steady_step_seconds": float(np.median(steady)) if steady else None,
      "background_compile": compiles,
  }


def _tensorboard_writer(workdir: Path, *, enabled: bool):
  """clu's TensorBoard SummaryWriter on ``workdir/tensorboard`` (imports TensorFlow: only when enabled)."""
  if not enabled:
    return None
  from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top

  return summary_writer.SummaryWriter(os.fspath(Path(workdir) / "tensorboard"))


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


def _evaluate(config, model, lora_params, lora_config, evaluate_fn):
  if evaluate_fn is not None:
    return evaluate_fn(model, lora_params, lora_config)
  eval_cfg = config.get("eval", None)
  if not eval_cfg or not eval_cfg.get("enabled", False):
    return {}
  from lora_squeeze import evaluate  # pylint: disable=g-import-not-at-top

  return evaluate.evaluate_config(config, model, lora_params, lora_config)


def _run_post_squeeze(config, workdir: Path, *, evaluate_fn) -> dict:
  """Squeeze the source adapter to each target rank and evaluate; no training."""
  t_start = time.time()
  source_params, source_cfg, source_meta = load_adapter(Path(config.source_workdir) / ADAPTER_DIR)
  model = load_model(config)
  spectra = squeeze_lib.lora_spectra(source_params)
  per_rank = {}
  for i, r in enumerate(sorted({int(r) for r in config.target_ranks}, reverse=True)):
    params, new_cfg = lora_lib.change_rank(
        source_params, r, source_cfg, method=config.squeeze.method, key=_stage_key(int(config.seed), i)
    )
    retention = float(np.mean([float(rank_rules.retention(s, r)) for s in spectra.values()]))
    metrics = _evaluate(config, model, params, new_cfg, evaluate_fn)
    per_rank[str(r)] = {"rank": r, "retention_mean": retention, "metrics": metrics}
    if config.get("save_adapters", False):
      save_adapter(workdir / f"{ADAPTER_DIR}_r{r}", params, new_cfg, extra={"mode": "post_squeeze"})
  result = {
      "mode": "post_squeeze",
      "model": config.model,
      "task": config.data.get("task", None),
      "seed": int(config.seed),
      "source_workdir": str(config.source_workdir),
      "source_rank": lora_lib.describe_ranks(lora_lib.lora_ranks(source_params)),
      "targets": per_rank,
      "method": config.squeeze.method,
      "steps": 0,
      "wall_seconds": time.time() - t_start,
  }
  if jax.process_index() == 0:
    fileio.atomic_write_text(workdir / RESULT_NAME, json.dumps(result, indent=2))
  return result


def _source_rank(config):
  """The rank of ``config.source_workdir``'s adapter (from its result.json, else from the adapter)."""
  source = Path(config.source_workdir)
  if (source / RESULT_NAME).exists():
    return json.loads((source / RESULT_NAME).read_text()).get("final_rank")
  return lora_lib.describe_ranks(lora_lib.lora_ranks(load_adapter(source / ADAPTER_DIR)[0]))


def _run_zero_shot(config, workdir: Path, *, evaluate_fn) -> dict:
  """The base model without any adapter, evaluated (the paper's "0-S" column)."""
  t_start = time.time()
  model = load_model(config)
  metrics = _evaluate(config, model, None, None, evaluate_fn)
  result = {
      "mode": "zero_shot",
      "model": config.model,
      "task": config.data.get("task", None),
      "seed": int(config.seed),
      "final_rank": 0,
      "steps": 0,
      "metrics": metrics,
      "wall_seconds": time.time() - t_start,
  }
  if jax.process_index() == 0:
    fileio.atomic_write_text(workdir / RESULT_NAME, json.dumps(result, indent=2))
  return result


def _progress_bar(total: int, initial: int, *, enabled: bool):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top

  return tqdm.tqdm(
      total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=1.0, desc="train"
  )
