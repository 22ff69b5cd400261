"""The trainer: the jitted train step and rank-change step for one model and LoRA layout.

Train step (``Trainer.train_step``): one ``jax.jit`` with the state donated; gradients for the LoRA params
only (the base params are an argument, never a baked-in constant, never differentiated); the loss is the
mean cross-entropy over answer tokens (``batch["loss_mask"]``), and vocabulary logits are computed only at
those positions (``gemma_forward.logits_at`` on gathered hidden states: the 262k-vocab projection is most of the
forward on the small Gemmas). The learning rate is a traced scalar argument, so warmups and per-stage rates
never recompile: the step compiles once per distinct rank (``Trainer.traces`` counts it). A vision-language
batch (``data.vqa`` tasks, a ``text_only=False`` model) also carries ``images``: the frozen SigLIP tower and
projector embed them inside the step; like every base param they are an argument, never differentiated.

Rank change (``Trainer.change_rank``): one jitted program for the whole tree, on one device as on a mesh,
with the target rank static (compiled once per (source ranks, target rank) signature): LoRA params through
``lora.change_rank`` (``squeeze_lora``, ``config.squeeze.method``, scale folded) and the optimizer state:
the optimizer state as ``config.squeeze.optimizer_state`` says (``optim.py``: a fresh Adafactor state, or the
carried second moments).

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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_squeeze import forward as forward_lib
from lora_squeeze import gemma_forward
from lora_squeeze import lora as lora_lib
from lora_squeeze import lora_layout
from lora_squeeze import models
from lora_squeeze import optim
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import squeeze as squeeze_lib

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
  logits = gemma_forward.logits_at(h, embedding, softcap=softcap)
  targets = tokens.reshape(-1)[target_idx]
  # -log p(target) = logsumexp(logits) - logit(target), the target's logit from its own embedding row: no
  # (targets x vocab) log-probabilities are kept, and the gradient has no dense one-hot (take_along_axis's
  # wrote a zero (targets x 262k) array and scattered into it: ~80 ms of a real-270M step on XLA:CPU).
  target_logit = gemma_forward.target_logits(h, embedding, targets, softcap=softcap)
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
    if optimizer_state not in optim.OPTIMIZER_STATE_MODES:
      raise ValueError(
          f"config.squeeze.optimizer_state={optimizer_state!r}: expected one of " f"{optim.OPTIMIZER_STATE_MODES}"
      )
    squeeze_lib.check_method(squeeze_method)
    self.model = model
    self.lora_config = lora_config
    self.forward = forward_lib.Forward(model, lora_config)
    self.optimizer = optim.make_optimizer()
    self.max_targets = int(max_targets)
    self.squeeze_method = squeeze_method
    self.optimizer_state = optimizer_state
    self.traces = {"train_step": 0, "change_rank": 0, "loss": 0}
    # Sharded mode (``mesh`` given, see sharding.py): the same jitted functions; their impls pin the
    # state's shardings with ``with_sharding_constraint`` (a rule of the shapes, so it also covers the new
    # rank's shapes in the rank change) and the host-side inputs (batch, keys, lr) become global arrays.
    # ``mesh=None`` (one device) leaves every program exactly as it was.
    self.mesh = mesh
    self.shard_lora = bool(shard_lora)
    self.remat = bool(remat)  # rematerialise each block in the train step's backward (config.remat)
    # The two jitted programs, public so that ``aot`` lowers exactly them from abstract shapes; ``train_step``
    # and ``change_rank`` call them (or their executables compiled ahead by ``precompile``).
    self.train_step_program = jax.jit(self._train_step_impl, donate_argnums=(0,))
    self._eval_loss = jax.jit(self._eval_loss_impl)
    # Not donated: the outputs have other shapes (new rank), so XLA could not reuse the buffers anyway.
    self.change_rank_program = jax.jit(self._change_rank_impl, static_argnames=("rank",))
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
    shapes = lora_layout.lora_shapes(self.model.config, cfg)
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
    # Vision-language batches carry "images" (data.pipeline): the frozen vision tower fills the image's soft
    # tokens, which attend to each other both ways (as in gemma). Text batches run exactly as before.
    images = batch.get("images")
    mask = gemma_forward.attention_mask_from_segments(
        batch["segment_ids"], tokens=None if images is None else batch["tokens"]
    )
    return self.forward.hidden(
        lora_params,
        base_params,
        batch["tokens"],
        positions=batch["positions"],
        attention_mask=mask,
        images=images,
        remat=self.remat,
    )

  def _loss(self, lora_params, base_params, batch):
    hidden = self._hidden(lora_params, base_params, batch)
    embedding = base_params["embedder"]["input_embedding"]
    return answer_loss(
        hidden,
        batch["tokens"],
        batch["loss_mask"],
        embedding,
        max_targets=self.max_targets,
        softcap=self.forward.softcap,
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
    return (compiled or self.train_step_program)(*args)

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
  def _change_rank_impl(self, state, key, *, rank: int):
    self.traces["change_rank"] += 1
    if self.mesh is not None:
      key = jax.random.wrap_key_data(key)
    rank = dict(rank) if isinstance(rank, tuple) else rank  # per-module ranks travel as a hashable tuple
    params, _ = lora_lib.change_rank(state["params"], rank, self.lora_config, method=self.squeeze_method, key=key)
    fresh = self.optimizer.init(params)
    if self.optimizer_state == "carry":
      opt_state = optim.carry_adafactor_state(state["opt_state"], state["params"], params, fresh)
    else:
      opt_state = fresh
    # Sharded: squeeze_lora ran on the state's (replicated or fsdp-sharded) factors; the new rank's state
    # gets its shardings from the same rule.
    return self._constrain({"params": params, "opt_state": opt_state, "step": state["step"]})

  def _change_key(self, key: jax.Array):
    # The jitted impl takes a typed key on one device, raw key data (host uint32) on a mesh.
    return key if self.mesh is None else self._host_key(key)

  def change_rank(self, state, rank: int | Mapping[str, int], key: jax.Array):
    """The state at a new rank (params squeezed, optimizer state fresh or carried); ``rank``: one rank for
    every module, or {module path: rank} (automatic per-module ranks; modules it leaves out keep theirs).

    ONE jitted program for the whole tree (every module's squeeze side by side, the optimizer state, the
    shardings), compiled once per (source ranks, target rank) signature, on one device as on a mesh. (Until
    issue 19 one device ran it module by module, outside jit, after XLA:CPU wedged on batched squeezes with
    jaxlib 0.10.0; ``experiments/xla_cpu_hang_check.py`` no longer reproduces that with the pinned stack,
    and the whole-tree program's compile, 20-40 s cold on the 270M, is what ``precompile`` takes off the
    critical path.) A change that ``precompile`` compiled ahead runs that executable."""
    static = _static_rank(rank)
    compiled = self._ahead(("change_rank", rank_signature(state["params"]), static))
    key = self._change_key(key)
    if compiled is not None:
      return compiled(state, key)
    return self.change_rank_program(state, key, rank=static)

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
          lambda b=before_s, a=after: self.change_rank_program.lower(b, key_s, rank=int(a)).compile(),
      )
      self.precompiler.submit(
          ("train_step", rank_signature(after_s["params"])),
          f"train_step r{after}",
          lambda a=after_s: self.train_step_program.lower(a, base_s, batch_s, lr_s).compile(),
      )
    return self.precompiler

  def close(self) -> None:
    """Stops the background compiles (a running one finishes; queued ones are dropped)."""
    if self.precompiler is not None:
      self.precompiler.close()


def _static_rank(rank: int | Mapping[str, int]) -> int | tuple:
  """A rank change's target as the jitted program's static argument: an int, or sorted (path, rank) pairs."""
  if isinstance(rank, Mapping):
    return tuple(sorted((str(p), int(r)) for p, r in rank.items()))
  return int(rank)


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
# The model, the LoRA layout and the RNG of a run's config.
# --------------------------------------------------------------------------------------------------------


def lora_config_from(config) -> lora_lib.LoRAConfig:
  c = config.lora
  rank = int(c.rank) if config.mode == "direct" else int(config.get("source_rank", c.rank))
  return lora_lib.LoRAConfig(
      rank=rank,
      alpha=c.get("alpha", None),
      targets=tuple(c.targets),
      joint_kv=bool(c.joint_kv),
      joint_gate_up=bool(c.joint_gate_up),
  )


def load_model(config, *, mesh=None):
  """``models.load`` of ``config.model``; with a ``mesh``, its frozen base split over it by the fsdp rule
  (``sharding.base_shardings``: each device holds only its slices). A checkpoint is restored straight onto
  those shardings: gemma's default restores it REPLICATED, a whole copy of the base on every device (12B in
  bfloat16: 24 GB per device) before it could be split."""
  options = dict(config.get("model_options", {}) or {})
  if mesh is not None and options.get("checkpoint"):
    options["sharding"] = lambda abstract: sharding_lib.base_shardings(abstract, mesh)
  model = models.load(config.model, **options)
  if mesh is not None:  # a random-init base (or one restored above: put is then a no-op) onto the fsdp split
    model = dataclasses.replace(
        model, params=sharding_lib.put(model.params, sharding_lib.base_shardings(model.params, mesh))
    )
  return model


def load_eval_model(config):
  """The model of a run that only evaluates (Post-Squeeze, zero-shot): on several devices split over
  ``config.mesh`` as a training run's is, so the evaluation runs on the mesh with each batch's rows split
  (``evaluate``); on one device, no mesh."""
  mesh = sharding_lib.mesh_from_config(config) if jax.device_count() > 1 else None
  return load_model(config, mesh=mesh)


def image_spec(model):
  """The model's ``data.pipeline.ImageSpec`` (None for a text-only model)."""
  return models.image_spec(model)


def stage_key(seed: int, stage: int) -> jax.Array:
  """The RNG key of stage ``stage`` of a run seeded ``seed`` (a rank change's random test matrices)."""
  return jax.random.fold_in(jax.random.key(seed), 1000 + stage)
