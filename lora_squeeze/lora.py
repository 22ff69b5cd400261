"""LoRA on Gemma 3's text projections: the config, the Flax wrapper, init, split/merge and rank changes.

Beside it: ``lora_layout.py`` (module names, shapes, parameter count), ``lora_matmul.py`` (the LoRA product
and its hand-written backward) and ``lora_fuse.py`` (fuse / unfuse into the base weights).

The model code stays the gemma library's own: ``LoRA(model=..., config=LoRAConfig(...))`` calls the wrapped
``gm.nn.Gemma3_*`` transformer under a flax ``nn.intercept_methods`` interceptor (as ``gm.nn.LoRA`` /
``peft.ModuleInterceptor`` do). The interceptor recognises the gemma ``Einsum`` calls of the text blocks'
projections and adds ``scale · (x @ a) @ b`` to their outputs; every other module (the SigLIP vision tower,
the multimodal projector, the embedder) runs untouched.

Parameter layout (a contract: squeeze.py, adapters/gemma_peft.py and trainer.py rely on it). Each LoRA pair is
``{"a": (*input_dims, r), "b": (r, *output_dims)}`` (a: the contracted input dims then r; b: r then the
output dims, as in gemma's own LoRA), so ``ΔW = a.reshape(-1, r) @ b.reshape(r, -1)``. Pairs are new children
of the attention / MLP modules, named after the projection (d = embed_dim, N = num_heads, K = num_kv_heads,
H = head_dim, F = hidden_dim)::

  layer_{i}/attn/q_lora        a (d, r)     b (r, N, H)
  layer_{i}/attn/k_lora        a (d, r)     b (r, K, H)       (joint_kv=False, default)
  layer_{i}/attn/v_lora        a (d, r)     b (r, K, H)       (joint_kv=False, default)
  layer_{i}/attn/kv_lora       a (d, r)     b (r, 2, K, H)    (joint_kv=True)
  layer_{i}/attn/o_lora        a (N, H, r)  b (r, d)
  layer_{i}/mlp/gate_lora      a (d, r)     b (r, F)          (joint_gate_up=False, default)
  layer_{i}/mlp/up_lora        a (d, r)     b (r, F)          (joint_gate_up=False, default)
  layer_{i}/mlp/gate_up_lora   a (d, r)     b (r, 2, F)       (joint_gate_up=True)
  layer_{i}/mlp/down_lora      a (F, r)     b (r, d)

gemma's own ``gm.nn.LoRA`` instead nests them under the weights (``attn/q_einsum/_LoRAEinsum_0/lora``,
``mlp/_LoRAEinsum_gating_einsum/lora``): our names say which projection a pair adapts, independent of how
gemma happens to stack its weights, and map one to one onto PEFT's ``q_proj`` ... ``down_proj``.

K/V and gate/up: separate or joint adapters? Gemma stores K and V in one ``kv_einsum`` weight (2, K, d, H) and
gate and up in one ``gating_einsum`` (2, F, d); ``gm.nn.LoRA`` therefore puts ONE adapter on each
(``joint_kv`` / ``joint_gate_up`` = True here), so K and V (gate and up) share one rank-r input subspace ``a``.
The LoRA-Squeeze paper does not say which convention it used; it trained with Google's stack, so most likely
the joint gemma one. Our default is separate adapters (Hugging Face / PEFT convention): each projection gets
its own rank-r ΔW, the same family of updates for every projection, and exports map one to one onto
PEFT / vLLM adapters (a joint K|V pair cannot be written as two rank-r PEFT pairs without doubling a rank).
Both are available; they are different parameterisations (joint: r·(d + 2KH) parameters, separate:
2r·(d + KH)).

Scale. ``alpha=None`` (default) means ΔW = a @ b with scale 1: the gemma library's setup and, we assume, the
paper's. A float gives PEFT's ``alpha / r`` (r of that module). ``change_rank`` folds the scale into the new
factors so ΔW is preserved exactly when the rank changes.

dtypes. LoRA params are float32 whatever the base dtype; the delta is computed in float32 and cast to the
activation dtype before it is added.

Vision-language (Gemma 3 4B/12B, the multimodal tiny model): LoRA stays on the language model's projections.
SigLIP is built from flax ``nn.Dense`` / ``nn.Conv`` / attention (never gemma's ``Einsum``) and the multimodal
projector (``embedder.mm_input_projection``) is an ``Einsum`` whose parent is the ``Embedder``: the interceptor
adapts neither, and both stay frozen (they are base params: never differentiated, never updated).
``hidden_states(..., images=...)`` takes token sequences in which the image's soft tokens are already laid out
as ``IMAGE_PLACEHOLDER`` ids (the host does it, ``data.pipeline.image_token_block``, exactly as gemma's
``add_extra_tokens_for_images`` would inside the model), so positions, masks and the answer loss see the
sequence the model runs; the embedding of the images and their merge use gemma's own code
(``Transformer._encode_vision``, ``merge_embeddings``).

Why the wrapper bypasses ``nn.jit``: gemma's ``Transformer.__call__`` is an ``nn.jit`` whose trace cache is
keyed on the transformer's fields and the input shapes only, not on the interceptor around it. Through it,
a second ``init`` with another rank returned the first rank's shapes (seen with gemma 3.3.0), and an ``apply`` with a new
``alpha`` but same-shaped params would silently reuse the old scale. ``LoRA`` therefore calls the
transformer's un-jitted method; jit the whole step yourself (one ``jax.jit`` around apply / the train step),
as you would anyway. ``init_lora`` (pure: shapes + initializers) is the preferred way to create LoRA params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import linen as nn
from flax import traverse_util
from gemma.gm.nn import _layers
from gemma.gm.nn import _modules
import jax
import jax.numpy as jnp
from kauldron import kontext
import numpy as np

from lora_squeeze import gemma_forward
from lora_squeeze import lora_layout
from lora_squeeze import lora_matmul
from lora_squeeze import squeeze

Array = jax.Array

# The soft image token placeholder (gemma's TOKEN_PLACEHOLDER, -2): a token sequence holds one per soft token of
# each image (``data.pipeline`` inserts them on the host); their embeddings are replaced by the image's.
IMAGE_PLACEHOLDER = gemma_forward.IMAGE_PLACEHOLDER

_LORA_KEY_RE = re.compile(r"^(q|k|v|kv|o|gate|up|gate_up|down)_lora$")


# --------------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LoRAConfig:
  """Which projections get LoRA, at which rank and scale.

  Attributes:
    rank: an int for every module, or a mapping from module path (``layer_3/attn/q_lora``) or fnmatch
      pattern (``*/mlp/*``) to rank; the first matching key wins (``squeeze.resolve_ranks``' rule). A key
      that matches no module, or a module that no key matches, raises (add a ``"*"`` key as a default).
    alpha: None = scale 1 (gemma library, paper); a float = PEFT scale ``alpha / r`` per module.
    targets: subset of ``lora_layout.TARGETS`` ("q", "k", "v", "o", "gate", "up", "down"); default all seven.
    joint_kv: one adapter on gemma's kv_einsum (``kv_lora``) instead of separate ``k_lora``/``v_lora``.
    joint_gate_up: one adapter on gating_einsum (``gate_up_lora``) instead of ``gate_lora``/``up_lora``.
  """

  rank: int | Mapping[str, int]
  alpha: float | None = None
  targets: Sequence[str] = lora_layout.TARGETS
  joint_kv: bool = False
  joint_gate_up: bool = False

  def __post_init__(self):
    targets = tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)
    bad = [t for t in targets if t not in lora_layout.TARGETS]
    if bad:
      raise ValueError(f"LoRAConfig.targets: unknown {bad}; expected a subset of {lora_layout.TARGETS}")
    if not targets:
      raise ValueError("LoRAConfig.targets is empty")
    # Canonical order, so equal sets compare equal.
    object.__setattr__(self, "targets", tuple(t for t in lora_layout.TARGETS if t in targets))
    for flag, pair in (("joint_kv", ("k", "v")), ("joint_gate_up", ("gate", "up"))):
      if getattr(self, flag) and (pair[0] in targets) != (pair[1] in targets):
        raise ValueError(
            f"LoRAConfig: {flag}=True puts one adapter on both {pair[0]!r} and {pair[1]!r}; "
            f"targets must contain both or neither, got {self.targets}"
        )
    if isinstance(self.rank, Mapping):
      if not self.rank:
        raise ValueError("LoRAConfig.rank: empty mapping")
      for k, r in self.rank.items():
        _check_rank(r, f"LoRAConfig.rank[{k!r}]")
      object.__setattr__(self, "rank", dict(self.rank))  # a private copy, insertion order kept
    else:
      _check_rank(self.rank, "LoRAConfig.rank")
      object.__setattr__(self, "rank", int(self.rank))
    if self.alpha is not None:
      if not (isinstance(self.alpha, (int, float, np.floating, np.integer)) and self.alpha > 0):
        raise ValueError(f"LoRAConfig.alpha must be None or a positive number, got {self.alpha!r}")
      object.__setattr__(self, "alpha", float(self.alpha))

  def _key(self):
    rank = tuple(self.rank.items()) if isinstance(self.rank, Mapping) else self.rank
    return (rank, self.alpha, self.targets, self.joint_kv, self.joint_gate_up)

  # Hashable (usable as a jit static argument); the rank mapping's order matters (first match wins).
  def __eq__(self, other):
    return isinstance(other, LoRAConfig) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def kinds(self) -> tuple[str, ...]:
    """Module kinds this config adapts, in path order (``kv`` / ``gate_up`` when joint)."""
    out = []
    for t in self.targets:
      if t in ("k", "v") and self.joint_kv:
        t = "kv"
      elif t in ("gate", "up") and self.joint_gate_up:
        t = "gate_up"
      if t not in out:
        out.append(t)
    return tuple(out)

  def scale(self, rank: int) -> float:
    """The factor ΔW = scale · a @ b for a module of rank ``rank``."""
    return 1.0 if self.alpha is None else self.alpha / rank


def _check_rank(r, what: str) -> None:
  if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
    raise ValueError(f"{what} must be an int >= 1, got {r!r}")


# --------------------------------------------------------------------------------------------------------
# Initialisation.
# --------------------------------------------------------------------------------------------------------


# float32 whatever dtype the caller (e.g. gemma's bfloat16 param-dtype context) asks for.
def _a_init(key, shape, dtype=None):
  del dtype
  return nn.initializers.kaiming_uniform()(key, shape, jnp.float32)


def _b_init(key, shape, dtype=None):
  del key, dtype
  return jnp.zeros(shape, jnp.float32)


def init_lora(key: Array, model_config, config: LoRAConfig) -> dict:
  """Fresh LoRA params (nested dicts, float32): a kaiming-uniform (as gemma), b zeros, so ΔW = 0.

  Built from ``lora_shapes`` and the initializers only, never through ``model.init``, so no trace cache can
  hand back another rank's shapes. One jitted program per set of shapes; works under ``jax.eval_shape`` (no
  allocation) and ``jax.jit``.
  """
  shapes = tuple((p, a, b) for p, (a, b) in lora_layout.lora_shapes(model_config, config).items())
  return _init_from_shapes(key, shapes)


@functools.partial(jax.jit, static_argnums=1)
def _init_from_shapes(key: Array, shapes: tuple) -> dict:
  # One uniform draw for all a's, sliced per module: a draw per module made XLA compile times grow with
  # the module count (seconds for a 2-layer model on CPU). kaiming_uniform: U(±√(6 / fan_in)), fan_in =
  # prod(input dims), as flax computes it for gemma's (*in, r) shapes.
  sizes = [math.prod(a_shape) for _, a_shape, _ in shapes]
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  flat, offset = {}, 0
  for (path, a_shape, b_shape), size in zip(shapes, sizes):
    bound = math.sqrt(6.0 / math.prod(a_shape[:-1]))
    flat[f"{path}/a"] = bound * u[offset : offset + size].reshape(a_shape)
    flat[f"{path}/b"] = jnp.zeros(b_shape, jnp.float32)
    offset += size
  return traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------------------------------------------
# The wrapper and its interceptor.
# --------------------------------------------------------------------------------------------------------


class LoRA(nn.Module):
  """Wraps a gemma Gemma 3 transformer so its text projections carry LoRA adapters.

  Mirrors ``gm.nn.LoRA``: shares the wrapped model's scope (base params keep their paths; LoRA pairs are
  added next to them, see the module docstring) and forwards attribute access to the model.

  ``apply({"params": merge_params(base, lora)}, tokens)`` runs the model with LoRA. The ranks come from the
  params' shapes; ``config.rank`` is only used when ``init`` creates missing LoRA params (prefer
  ``init_lora``). The call bypasses gemma's internal ``nn.jit`` (see the module docstring): jit it yourself.

  Attributes:
    model: the gemma transformer (e.g. ``gm.nn.Gemma3_1B()``).
    config: the LoRAConfig.
  """

  _: dataclasses.KW_ONLY
  model: nn.Module
  config: LoRAConfig

  def __post_init__(self):
    super().__post_init__()
    if self.scope is not None:
      nn.share_scope(self, self.model)

  @nn.compact
  def __call__(self, *args, **kwargs):
    cfg = lora_layout.text_config(self.model)
    if cfg.num_kv_heads == cfg.num_heads:
      # gemma then uses one qkv_einsum; no Gemma 3 size does, so that layout is not implemented.
      raise NotImplementedError(
          "LoRA: models with num_kv_heads == num_heads (gemma's qkv_einsum) are not "
          "supported; every Gemma 3 size uses grouped/multi-query attention"
      )
    shapes = lora_layout.lora_shapes(cfg, self.config)
    if not self.is_initializing():
      self._check_lora_params(shapes)
    with nn.intercept_methods(_Interceptor(config=self.config, shapes=shapes)):
      return _call_without_nn_jit(self.model, *args, **kwargs)

  @nn.compact
  def hidden_states(
      self,
      tokens: Array,
      *,
      positions: Array,
      attention_mask: Array,
      images: Array | None = None,
      image_embeddings: Array | None = None,
      remat: bool = False,
  ) -> Array:
    """The final-norm hidden states (B, T, D) with LoRA, without the vocabulary projection.

    Training and scoring need logits at a few positions only (answer / choice tokens); the 262k-vocab
    projection is most of a full forward on the small Gemmas, so callers gather the positions they need and
    project those (``gemma_forward.logits_at``). ``positions`` (B, T) and ``attention_mask`` (B, T, T) are given
    explicitly (see ``gemma_forward.attention_mask_from_segments``), which also makes packed sequences work.
    ``images`` (B, N, H, W, 3) uint8, or their ``encode_images`` output, fill the ``IMAGE_PLACEHOLDER``
    tokens (see ``gemma_forward.base_hidden_states``); the vision tower and projector run without LoRA.
    ``remat``: rematerialise each transformer block in the backward pass (see ``base_hidden_states``).
    """
    cfg = lora_layout.text_config(self.model)
    shapes = lora_layout.lora_shapes(cfg, self.config)
    if not self.is_initializing():
      self._check_lora_params(shapes)
    with nn.intercept_methods(_Interceptor(config=self.config, shapes=shapes)):
      return gemma_forward.base_hidden_states(
          self.model,
          tokens,
          positions=positions,
          attention_mask=attention_mask,
          images=images,
          image_embeddings=image_embeddings,
          remat=remat,
      )

  def _check_lora_params(self, shapes: Mapping[str, Any]) -> None:
    """The LoRA pairs in the params must be exactly the config's modules (ranks may differ): catches a
    joint/separate or targets mismatch, which would otherwise silently ignore some adapters."""
    present = set(squeeze.lora_pairs(split_params(self.scope.variables().get("params", {}))[1]))
    missing, extra = sorted(set(shapes) - present), sorted(present - set(shapes))
    if missing or extra:
      raise ValueError(
          f"LoRA params do not match {self.config}: missing {missing[:4]}"
          f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
          f"{' ...' if len(extra) > 4 else ''} (apply with merge_params(base, lora), lora from "
          "init_lora / change_rank for this config)"
      )

  def __kontext_keys__(self) -> dict[str, str]:
    return kontext.get_keypaths(self.model)

  def __getattr__(self, name: str) -> Any:
    if name in ("model", "config", "__setstate__") or name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.model, name)


def _call_without_nn_jit(model: nn.Module, *args, **kwargs):
  """model(*args, **kwargs), skipping an ``nn.jit`` on ``__call__`` (its cache ignores interceptors).

  flax's lifted jit keeps the state-managed (un-jitted) method as ``__wrapped__``; a plain method's
  ``__wrapped__`` is the raw function (no ``method_handler_wrapped`` flag), which we must not call.
  """
  method = type(model).__call__
  inner = getattr(method, "__wrapped__", None)
  if inner is not None and getattr(inner, "method_handler_wrapped", False):
    return inner(model, *args, **kwargs)
  return model(*args, **kwargs)


# Equations gemma 3.3.0 uses at each projection; a change in the library must fail loudly, not silently.
_ATTN_EQNS = {
    "q_einsum": ("BTD,NDH->BTNH",),
    "kv_einsum": ("BSD,CKDH->CBSKH",),
    "attn_vec_einsum": ("BTNH,NHD->BTD",),
}
_MLP_EQNS = {
    "gating_einsum": ("...F,NHF->...NH", "...F,NFH->...NH"),
    "linear": ("...H,HF->...F",),
}
# Where each kind's delta goes in the einsum output: an int indexes kv_einsum's leading axis C (k 0, v 1),
# "stack" means the kind covers that whole axis (joint kv), "gate"/"up" index the gating output's axis -2
# (..., 2, F), None adds to the whole output.
_SITES = {
    "q_einsum": {"q": None},
    "kv_einsum": {"k": 0, "v": 1, "kv": "stack"},
    "attn_vec_einsum": {"o": None},
    "gating_einsum": {"gate": "gate", "up": "up", "gate_up": None},
    "linear": {"down": None},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Interceptor:
  """Adds LoRA deltas to the outputs of the text blocks' projection einsums."""

  config: LoRAConfig
  shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _layers.Einsum):
      return next_fun(*args, **kwargs)
    site = _projection_site(module)
    if site is None:
      return next_fun(*args, **kwargs)
    block_name, owner, owner_scope, einsum = site
    kinds = [k for k in self.config.kinds() if k in _SITES[einsum]]
    if not kinds:
      return next_fun(*args, **kwargs)

    eqn, x = _einsum_args(args, kwargs)
    expected = (_ATTN_EQNS if owner == "attn" else _MLP_EQNS)[einsum]
    if eqn not in expected:
      raise NotImplementedError(
          f"LoRA: {block_name}/{owner} {einsum} is called with {eqn!r}; this module "
          f"knows {expected} (gemma 3.3.0). Update lora.py for this gemma version."
      )
    y = next_fun(*args, **kwargs)
    halves = {}  # separate k/v or gate/up deltas: stacked into one add (no scatter, no strided update)
    for kind in kinds:
      a, b = self._params(owner_scope, f"{block_name}/{owner}/{kind}_lora", kind)
      delta = lora_matmul.lora_delta(x, a, b, self.config.scale(a.shape[-1])).astype(y.dtype)
      where = _SITES[einsum][kind]
      if where is None:
        y = y + delta
      elif where == "stack":  # (..., 2, K, H) -> (2, ..., K, H)
        y = y + jnp.moveaxis(delta, -3, 0)
      else:
        halves[where] = delta
    if halves:
      if einsum == "kv_einsum":  # output (2, ..., K, H): k is [0], v is [1]
        y = y + jnp.stack([halves.get(i, jnp.zeros_like(y[0])) for i in (0, 1)], axis=0)
      else:  # gating output (..., 2, F): gate is [..., 0, :], up [..., 1, :]
        y = y + jnp.stack([halves.get(h, jnp.zeros_like(y[..., 0, :])) for h in ("gate", "up")], axis=-2)
    return y

  def _params(self, owner_scope, path: str, kind: str) -> tuple[Array, Array]:
    scope = owner_scope.push(f"{kind}_lora", reuse=True)
    a_shape, b_shape = self.shapes[path]
    if scope.has_variable("params", "a") and scope.has_variable("params", "b"):
      a, b = scope.get_variable("params", "a"), scope.get_variable("params", "b")
      # The rank is whatever the params have; the other dims must be the projection's.
      if (tuple(a.shape[:-1]), tuple(b.shape[1:])) != (a_shape[:-1], b_shape[1:]) or a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"LoRA params at {path}: a{tuple(a.shape)}, b{tuple(b.shape)} do not fit this "
            f"projection (expected a{a_shape[:-1] + ('r',)}, b{('r',) + b_shape[1:]})"
        )
      return a, b
    if not scope.is_mutable_collection("params"):
      raise ValueError(
          f"LoRA params missing at {path} (config {self.config}); apply with "
          "{'params': merge_params(base, lora)} where lora = init_lora(...) for the same config"
      )
    return scope.param("a", _a_init, a_shape), scope.param("b", _b_init, b_shape)


def _einsum_args(args, kwargs):
  names = ("eqn", "x")
  bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
  return bound["eqn"], bound["x"]


def _projection_site(module: nn.Module):
  """(block name, 'attn'|'mlp', owner scope, einsum name) for a text block's projection, else None.

  The attention einsums are setup children of gemma's ``Attention`` (their own scope, name ``q_einsum`` ...);
  the MLP einsums share ``FeedForward``'s scope and differ by ``weight_name`` (``gating_einsum``, ``linear``).
  Requiring the parent chain Einsum -> Attention|FeedForward -> Block keeps the vision tower, the multimodal
  projector (``embedder.mm_input_projection``) and anything else out.
  """
  parent = module.parent
  if not isinstance(parent, (_modules.Attention, _modules.FeedForward)):
    return None
  block = parent.parent
  if not isinstance(block, _modules.Block) or not re.fullmatch(r"layer_\d+", block.name or ""):
    return None
  if isinstance(parent, _modules.Attention):
    name = module.name
    return (block.name, "attn", parent.scope, name) if name in _ATTN_EQNS else None
  name = module.weight_name
  return (block.name, "mlp", parent.scope, name) if name in _MLP_EQNS else None


# --------------------------------------------------------------------------------------------------------
# Param trees: split / merge.
# --------------------------------------------------------------------------------------------------------


def _is_lora_entry(key: str, value: Any) -> bool:
  return bool(_LORA_KEY_RE.match(str(key))) and squeeze.is_lora_pair(value)


def split_params(params: Mapping) -> tuple[dict, dict]:
  """(base, lora): the same nesting, LoRA pairs (``*_lora`` children) moved to ``lora``.

  Neither tree keeps empty dicts (gemma's ``peft.split_params`` leaves some, which broke checkpoint loading,
  seen with gemma 3.3.0). Works with or without a top-level ``{"params": ...}``.
  """

  def split(node):
    base, lora = {}, {}
    for k, v in node.items():
      if _is_lora_entry(k, v):
        lora[k] = dict(v)
      elif isinstance(v, Mapping):
        b, l = split(v)
        if b:
          base[k] = b
        if l:
          lora[k] = l
      else:
        base[k] = v
    return base, lora

  return split(params)


def merge_params(base: Mapping, lora: Mapping) -> dict:
  """Deep union of two param trees, as plain dicts (a FrozenDict would change the pytree type); a path
  defined in both raises ValueError."""

  def merge(x, y, path):
    out = {k: merge(v, {}, f"{path}{k}/") if isinstance(v, Mapping) else v for k, v in x.items()}
    for k, v in y.items():
      if k not in out:
        out[k] = merge(v, {}, f"{path}{k}/") if isinstance(v, Mapping) else v
      elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
        out[k] = merge(out[k], v, f"{path}{k}/")
      else:
        raise ValueError(f"merge_params: {path}{k} is defined in both trees")
    return out

  return merge(base, lora, "")


# --------------------------------------------------------------------------------------------------------
# Rank changes (LoRA-Squeeze) with the scale folded in.
# --------------------------------------------------------------------------------------------------------


def change_rank(
    lora_params: Mapping,
    rank: int | Mapping[str, int],
    config: LoRAConfig,
    *,
    method: str = "efficient",
    key: Array | None = None,
) -> tuple[dict, LoRAConfig]:
  """Squeeze (or grow) every LoRA pair to ``rank`` and keep the effective update consistent.

  ``squeeze.squeeze_lora`` gives a'b' = the best rank-r_tgt approximation of a b (exact when
  r_tgt >= r_src). With PEFT scaling (alpha set) the model uses (alpha / r) · a b, so the new factors must
  satisfy (alpha / r_tgt) · a''b'' = (alpha / r_src) · a'b', i.e. a''b'' = (r_tgt / r_src) · a'b': we multiply
  a' and b' by sqrt(r_tgt / r_src) each (keeping the paper's even split of the singular values between them).
  With alpha None the scale is 1 and nothing is folded. Modules a rank mapping does not match keep their
  rank and factors. When growing, the fresh directions squeeze adds (new a columns, zero b rows) are
  scaled too; ΔW does not see them.

  Under ``jax.jit`` take ``change_rank(...)[0]``: the config is plain python, computed at trace time.

  Args:
    lora_params: LoRA tree (e.g. ``split_params(params)[1]`` or ``init_lora(...)``).
    rank: target rank: an int, or a mapping from module path / fnmatch pattern to rank.
    config: the LoRAConfig the params were trained with (its alpha decides the folding).
    method, key: as in ``squeeze.squeeze_lora``.

  Returns:
    (new LoRA params, new LoRAConfig): the config equals ``config`` with ``rank`` describing the new ranks
    (an int when all modules share one rank, else an exact {module path: rank} mapping), so
    ``lora_shapes(model, new_config)`` matches the new params' shapes.
  """
  pairs = squeeze.lora_pairs(lora_params)
  if not pairs:
    raise ValueError("change_rank: no LoRA pairs found")
  paths = sorted(pairs)
  targets = squeeze.resolve_ranks(paths, rank)
  new_params = squeeze.squeeze_lora(lora_params, rank, method=method, key=key)
  new_pairs = squeeze.lora_pairs(new_params)
  new_ranks = {}
  folded = {}
  for p in paths:
    r_src = int(pairs[p]["a"].shape[-1])
    r_tgt = targets[p]
    new_ranks[p] = r_src if r_tgt is None else int(r_tgt)
    if config.alpha is not None and r_tgt is not None and r_tgt != r_src:
      f = math.sqrt(r_tgt / r_src)
      pair = new_pairs[p]
      folded[p] = {**pair, "a": (pair["a"] * f).astype(pair["a"].dtype), "b": (pair["b"] * f).astype(pair["b"].dtype)}
  if folded:
    new_params = squeeze.replace_pairs(new_params, folded)
  return new_params, dataclasses.replace(config, rank=describe_ranks(new_ranks))


def describe_ranks(ranks: Mapping[str, int]) -> int | dict[str, int]:
  """One int when all equal, else {canonical module path: rank} (a LoRAConfig.rank; JSON-able)."""
  values = set(ranks.values())
  if len(values) == 1:
    return values.pop()
  out = {}
  for p, r in ranks.items():
    layer, kind = lora_layout.module_kind(p)
    out[lora_layout.module_path(layer, kind)] = r
  return out


def lora_ranks(lora_params: Mapping) -> dict[str, int]:
  """{module path: rank} read from the params' shapes."""
  return {p: int(pair["a"].shape[-1]) for p, pair in sorted(squeeze.lora_pairs(lora_params).items())}
