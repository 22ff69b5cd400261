"""The jitted programs of a run, lowered and compiled ahead of time from abstract shapes: no weights.

Why: the paper's sizes (Gemma 3 1B / 4B / 12B at batch 8 x 1024) do not run on a CPU machine, but their
programs can be built here from shapes alone (``models.load(name, abstract=True)``): tracing, lowering and
XLA's compile find shape and sharding errors, and the compiled program states its memory per device and
its FLOPs. Every program is the project's own: ``trainer.Trainer``'s train step and rank change and
``evaluate``'s eval programs (``ChoiceScorer``'s scoring step; ``vl_decode_programs`` for vision-language
models), fed ``jax.ShapeDtypeStruct``s carrying the shardings a run would give them (``sharding.py``):

* one device: no shardings (what the single-device train loop runs);
* a mesh: the frozen base by the fsdp rule, the LoRA state replicated (or fsdp-split with ``shard_lora``),
  the batch split over (data, fsdp), as ``train.run`` places them. The eval programs get the fsdp-split base
  (``train.run`` evaluates with it) and host batches, which jax replicates.

  programs = aot.Programs(aot.abstract_model("gemma3_4b"), aot.Setting(), mesh=None)
  lowered = programs.lower("train_step", rank=128)
  info = aot.describe(lowered.compile())        # {"memory": {...}, "flops": ...}

``unsharded_base_inputs`` lists the base weights a program would hold whole on one device; with fsdp > 1 it
must be empty (the tests assert it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import evaluate
from lora_squeeze import lora as lora_lib
from lora_squeeze import lora_layout
from lora_squeeze import models
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import trainer as trainer_lib

PROGRAMS = ("train_step", "change_rank", "eval_step", "eval_images")


@dataclasses.dataclass(frozen=True)
class Setting:
  """The shapes of a run (defaults: the paper's: batch 8, length 1024, LoRA on all seven projections).

  Attributes:
    batch: the global batch (rows).
    max_len: tokens per row.
    max_target_tokens: answer tokens per row the train step gathers (``config.data.max_target_tokens``).
    eval_scored: scored positions per eval batch (``ChoiceScorer``'s projected rows).
    targets, joint_kv, joint_gate_up, alpha: the LoRAConfig.
    shard_lora: ``config.mesh.shard_lora``.
    squeeze_method, optimizer_state: ``config.squeeze``.
    remat: ``config.remat`` (rematerialise each block in the train step's backward).
  """

  batch: int = 8
  max_len: int = 1024
  max_target_tokens: int = 64
  eval_scored: int = 512
  targets: tuple[str, ...] = lora_layout.TARGETS
  joint_kv: bool = False
  joint_gate_up: bool = False
  alpha: float | None = None
  shard_lora: bool = False
  squeeze_method: str = "efficient"
  optimizer_state: str = "fresh"
  remat: bool = False

  def lora_config(self, rank: int) -> lora_lib.LoRAConfig:
    return lora_lib.LoRAConfig(
        rank=rank, alpha=self.alpha, targets=self.targets, joint_kv=self.joint_kv, joint_gate_up=self.joint_gate_up
    )


def setting_from_config(config) -> Setting:
  """The ``Setting`` of a run config (``config.data``, ``config.lora``, ``config.squeeze``, ``config.mesh``)."""
  lora_config = trainer_lib.lora_config_from(config)
  return Setting(
      batch=int(config.data.batch_size),
      max_len=int(config.data.max_len),
      max_target_tokens=int(config.data.max_target_tokens),
      eval_scored=int(config.data.batch_size) * int(config.data.max_target_tokens),
      targets=lora_config.targets,
      joint_kv=lora_config.joint_kv,
      joint_gate_up=lora_config.joint_gate_up,
      alpha=lora_config.alpha,
      shard_lora=sharding_lib.shard_lora_enabled(config),
      squeeze_method=str(config.squeeze.method),
      optimizer_state=str(config.squeeze.optimizer_state),
  )


def programs_for_config(config, *, dtype: Any = "bfloat16") -> "Programs":
  """The ``Programs`` a run of ``config`` compiles: its model (abstract, ``config.model_options.text_only``),
  its shapes and, with several devices, the mesh of ``config.mesh``."""
  options = dict(config.get("model_options", {}) or {})
  model = abstract_model(config.model, text_only=bool(options.get("text_only", True)), dtype=dtype)
  mesh = sharding_lib.mesh_from_config(config) if jax.device_count() > 1 else None
  return Programs(model, setting_from_config(config), mesh=mesh)


def abstract_model(name: str, *, text_only: bool = True, dtype: Any = "bfloat16", **options):
  """``models.load(name, abstract=True)``: the transformer and its params as ShapeDtypeStructs.

  ``dtype`` defaults to bfloat16, what a run on an accelerator uses (on CPU runs default to float32)."""
  return models.load(name, abstract=True, dtype=dtype, text_only=text_only, **options)


def _struct(x, sharding=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


class Programs:
  """A run's programs for one model, shapes and mesh, ready to lower.

  Args:
    model: a ``models.load`` result (abstract params are enough).
    setting: the shapes (``Setting``).
    mesh: a ``sharding.make_mesh`` mesh, or None for one device.
  """

  def __init__(self, model, setting: Setting = Setting(), *, mesh=None):
    self.model = model
    self.setting = setting
    self.mesh = mesh
    if mesh is not None:
      sharding_lib.check_batch_size(setting.batch, mesh)
    self.trainer = trainer_lib.Trainer(
        model,
        setting.lora_config(1),
        max_targets=setting.batch * setting.max_target_tokens,
        squeeze_method=setting.squeeze_method,
        optimizer_state=setting.optimizer_state,
        mesh=mesh,
        shard_lora=setting.shard_lora,
        remat=setting.remat,
    )
    self.vision = getattr(model.config, "vision_encoder", None) is not None

  # --- abstract inputs ---
  def base(self) -> Any:
    """The frozen base params: fsdp-split on a mesh (``sharding.base_shardings``)."""
    if self.mesh is None:
      return jax.tree.map(_struct, self.model.params)
    shardings = sharding_lib.base_shardings(self.model.params, self.mesh)
    return jax.tree.map(_struct, self.model.params, shardings)

  def state(self, rank: int) -> Any:
    """The train state (LoRA params, Adafactor state, step) at ``rank``, with the mesh's shardings."""
    return self.trainer.abstract_state(int(rank))

  def lora(self, rank: int) -> Any:
    """LoRA params as the eval programs get them: host arrays (replicated by jax on a mesh)."""
    return jax.tree.map(_struct, self.state(rank)["params"])

  def batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch (``data`` batch contract), split over (data, fsdp) on a mesh; VL models also get
    ``images`` (B, 1, H, W, 3) uint8."""
    b, t = self.setting.batch, self.setting.max_len
    sh = None if self.mesh is None else sharding_lib.batch_sharding(self.mesh)
    out = {
        k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)
        for k in ("tokens", "loss_mask", "segment_ids", "positions")
    }
    if self.vision:
      spec = models.image_spec(self.model)
      out["images"] = jax.ShapeDtypeStruct((b, 1, spec.height, spec.width, 3), jnp.uint8, sharding=sh)
    return out

  # --- programs ---
  def lower(self, program: str, *, rank: int = 128, target_rank: int = 64):
    """``jax.jit(...).lower(...)`` of one program on abstract inputs.

    Args:
      program: "train_step" (at ``rank``), "change_rank" (``rank`` -> ``target_rank``), "eval_step" (the
        scoring step of choice tasks; for a VL model the greedy decoding step with precomputed image
        embeddings) or "eval_images" (VL only: the vision tower's embedding of a batch's images).
      rank, target_rank: LoRA ranks; ``rank=0``: the eval programs without LoRA (zero-shot).
    """
    if program == "train_step":
      lr = jax.ShapeDtypeStruct((), jnp.float32)
      return self.trainer.train_step_program.lower(self.state(rank), self.base(), self.batch(), lr)
    if program == "change_rank":
      key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
      if self.mesh is None:  # the jitted impl takes a typed key on one device, raw key data on a mesh
        key = jax.eval_shape(lambda: jax.random.key(0))
      return self.trainer.change_rank_program.lower(self.state(rank), key, rank=int(target_rank))
    if program in ("eval_step", "eval_images"):
      return self._lower_eval(program, rank)
    raise ValueError(f"aot: program {program!r} is not one of {PROGRAMS}")

  def _lower_eval(self, program: str, rank: int):
    b, t = self.setting.batch, self.setting.max_len
    tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
    lora_config = self.setting.lora_config(rank) if rank else None
    lora = self.lora(rank) if rank else None
    if self.vision:
      embed_images, next_token = evaluate.vl_decode_programs(
          self.model, lora_params=lora, lora_config=lora_config, mesh=self.mesh
      )
      images = self.batch()["images"]
      images = jax.ShapeDtypeStruct(images.shape, images.dtype)  # host images, as generate_vl feeds them
      if program == "eval_images":
        return embed_images.lower(self.base(), images)
      emb = jax.eval_shape(embed_images, self.base(), images)
      last = jax.ShapeDtypeStruct((b,), jnp.int32)
      return next_token.lower(lora, self.base(), tok, tok, tok, last, _struct(emb))
    if program == "eval_images":
      raise ValueError("aot: eval_images needs a vision-language model (text_only=False)")
    scorer = evaluate.ChoiceScorer(self.model, lora, lora_config, max_len=t, batch_rows=b, mesh=self.mesh)
    scored = jax.ShapeDtypeStruct((self.setting.eval_scored,), jnp.int32)
    return scorer.score_program.lower(lora, self.base(), tok, tok, tok, scored, scored)


# --------------------------------------------------------------------------------------------------------
# What a compiled program says about itself.
# --------------------------------------------------------------------------------------------------------


def memory(compiled) -> dict[str, int]:
  """Bytes per device from XLA's memory analysis: arguments, outputs, temporaries, aliased (outputs that
  reuse donated arguments), generated code, and ``peak_estimate`` = arguments + outputs - aliased +
  temporaries (what the program needs resident at once, by XLA's buffer assignment)."""
  m = compiled.memory_analysis()
  out = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  out["peak_estimate"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def cost(compiled_or_lowered) -> dict[str, float]:
  """XLA's cost analysis: FLOPs, transcendentals and bytes accessed (per device for a partitioned
  program; a lowered program's are counted on its unoptimised HLO)."""
  c = compiled_or_lowered.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {k: float(c.get(k, 0.0)) for k in ("flops", "transcendentals", "bytes accessed")}


_COLLECTIVE_RE = re.compile(
    r"=\s*(\(?[a-z0-9]+\[[0-9,]*\][^=]*?)\s+(all-gather|all-gather-start|all-reduce|all-reduce-start|"
    r"reduce-scatter|all-to-all|collective-permute|collective-permute-start)\("
)
_SHAPE_RE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


def collectives(compiled) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes", "largest"}} of the collectives in the optimised HLO (result sizes per device;
  an async start's tuple counts its largest element)."""
  out: dict[str, dict[str, int]] = {}
  for m in _COLLECTIVE_RE.finditer(compiled.as_text()):
    shapes, kind = m.group(1), m.group(2).replace("-start", "")
    sizes = [
        math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dt, 4)
        for dt, dims in _SHAPE_RE.findall(shapes)
    ]
    size = max(sizes) if sizes else 0
    entry = out.setdefault(kind, {"count": 0, "bytes": 0, "largest": 0})
    entry["count"] += 1
    entry["bytes"] += size
    entry["largest"] = max(entry["largest"], size)
  return out


PRUNED = "pruned"


def input_shardings(lowered) -> list[Any]:
  """A lowered program's input shardings, one per flat argument in order: a ``Sharding``, None where the
  lowering left it unspecified (XLA chooses), or ``PRUNED`` for an argument the program does not read
  (jax drops it: it is never transferred to the devices)."""
  args = lowered._lowering.compile_args  # pylint: disable=protected-access
  out: list[Any] = [PRUNED] * len(jax.tree.leaves(lowered.in_avals))
  for i, s in zip(sorted(args["kept_var_idx"]), args["in_shardings"]):
    out[i] = s if isinstance(s, jax.sharding.Sharding) else None
  return out


def argument_bytes(lowered) -> int:
  """Bytes of a lowered program's inputs on one device, exact from their shardings (an unspecified sharding
  counts whole: host inputs are replicated; pruned inputs count nothing). Known before any compile."""
  total = 0
  for aval, sh in zip(jax.tree.leaves(lowered.in_avals), input_shardings(lowered)):
    if sh is PRUNED:
      continue
    shape = tuple(aval.shape) if sh is None else tuple(sh.shard_shape(tuple(aval.shape)))
    total += math.prod(shape) * _itemsize(aval.dtype)
  return int(total)


def _itemsize(dtype) -> int:
  try:
    return np.dtype(dtype).itemsize
  except TypeError:  # a typed PRNG key: its raw data (2 x uint32 for threefry)
    return 8


def unsharded_base_inputs(lowered, base: Any, *, min_elements: int = 1 << 20) -> list[str]:
  """Paths of the base weights that ``lowered`` takes WHOLE on one device: at least ``min_elements`` values
  and an input sharding that is unspecified or whose per-device shard is the full shape.

  ``base``: the abstract base tree the program was lowered with; its leaves are found among the program's
  flat inputs as the one contiguous run with their shapes, in order."""
  flat_in = input_shardings(lowered)
  arg_shapes = [tuple(a.shape) for a in jax.tree.leaves(lowered.in_avals)]
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(base)[0])
  shapes = [tuple(x.shape) for x in leaves]
  starts = [i for i in range(len(arg_shapes) - len(shapes) + 1) if arg_shapes[i : i + len(shapes)] == shapes]
  if len(starts) != 1:
    raise ValueError(
        f"unsharded_base_inputs: the base tree is {'not' if not starts else 'ambiguously'} "
        "among the program's inputs"
    )
  whole = []
  for path, shape, sh in zip(paths, shapes, flat_in[starts[0] : starts[0] + len(shapes)]):
    if math.prod(shape) < min_elements or sh is PRUNED:
      continue
    if sh is None or tuple(sh.shard_shape(shape)) == shape:
      whole.append(jax.tree_util.keystr(path))
  return whole


def describe(compiled) -> dict[str, Any]:
  """memory + cost + collectives of a compiled program (JSON-able)."""
  return {"memory": memory(compiled), "cost": cost(compiled), "collectives": collectives(compiled)}


def lora_bytes(model, rank: int, setting: Setting = Setting()) -> int:
  """float32 bytes of the LoRA params at ``rank`` (the optimizer state adds about as much again)."""
  return 4 * lora_layout.lora_param_count(model.config, setting.lora_config(rank))


def base_bytes(model) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(model.params)))


def residual_bytes(fn, primal, *args) -> int:
  """Bytes of the values a gradient of ``fn(primal, *args)`` with respect to ``primal`` keeps from the forward
  pass for the backward pass (``args`` are held fixed, as the frozen base and the batch of a train step).

  JAX's own accounting (the residuals of ``jax.vjp``, as ``jax.ad_checkpoint.print_saved_residuals`` lists
  them): computed values only, not the inputs or closed-over constants, each counted once. This is the
  activation memory of a train step that ``config.remat`` cuts and that a memory-aware scheduler (XLA:TPU,
  XLA:GPU) holds between the passes; XLA:CPU hoists the recomputation and its ``memory_analysis`` does not
  show the saving (experiments/remat_memory.py). Works on ``jax.ShapeDtypeStruct`` inputs (no weights).
  """
  leaves, tree = jax.tree.flatten((primal, args))

  def vjp(*xs):
    p, rest = jax.tree.unflatten(tree, xs)
    p_leaves, p_tree = jax.tree.flatten(p)
    return jax.vjp(lambda *pl: fn(jax.tree.unflatten(p_tree, pl), *rest), *p_leaves)

  closed, shapes = jax.make_jaxpr(vjp, return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  n_res = len(jax.tree.leaves(shapes[1]))
  inputs = {id(v) for v in list(jaxpr.invars) + list(jaxpr.constvars)}
  seen, total = set(), 0
  for v in jaxpr.outvars[len(jaxpr.outvars) - n_res :]:
    if hasattr(v, "val") or id(v) in inputs or id(v) in seen:  # a literal, an input, a constant, a repeat
      continue
    seen.add(id(v))
    total += int(np.prod(v.aval.shape)) * jnp.dtype(v.aval.dtype).itemsize
  return total
