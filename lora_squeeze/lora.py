"""LoRA on Gemma 3's text projections: Flax wrappers, parameter layout, fuse/unfuse and rank changes.

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
from jax import lax
import numpy as np

from lora_squeeze import gemma_forward
from lora_squeeze import squeeze

Array = jax.Array

# The soft image token placeholder (gemma's TOKEN_PLACEHOLDER, -2): a token sequence holds one per soft token of
# each image (``data.pipeline`` inserts them on the host); their embeddings are replaced by the image's.
IMAGE_PLACEHOLDER = gemma_forward.IMAGE_PLACEHOLDER

# All text projections, in the order used for paths and counts.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Every module kind a LoRA path can have (joint_kv -> "kv", joint_gate_up -> "gate_up").
KINDS = ("q", "k", "v", "kv", "o", "gate", "up", "gate_up", "down")
_OWNER = {
    "q": "attn",
    "k": "attn",
    "v": "attn",
    "kv": "attn",
    "o": "attn",
    "gate": "mlp",
    "up": "mlp",
    "gate_up": "mlp",
    "down": "mlp",
}
_PATH_RE = re.compile(r"(?:^|/)layer_(\d+)/(attn|mlp)/(q|k|v|kv|o|gate|up|gate_up|down)_lora(?:/[ab])?$")
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
    targets: subset of ``TARGETS`` ("q", "k", "v", "o", "gate", "up", "down"); default all seven.
    joint_kv: one adapter on gemma's kv_einsum (``kv_lora``) instead of separate ``k_lora``/``v_lora``.
    joint_gate_up: one adapter on gating_einsum (``gate_up_lora``) instead of ``gate_lora``/``up_lora``.
  """

  rank: int | Mapping[str, int]
  alpha: float | None = None
  targets: Sequence[str] = TARGETS
  joint_kv: bool = False
  joint_gate_up: bool = False

  def __post_init__(self):
    targets = tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
      raise ValueError(f"LoRAConfig.targets: unknown {bad}; expected a subset of {TARGETS}")
    if not targets:
      raise ValueError("LoRAConfig.targets is empty")
    # Canonical order, so equal sets compare equal.
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
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
# Paths and shapes (pure python).
# --------------------------------------------------------------------------------------------------------


def module_kind(path: str) -> tuple[int, str]:
  """(layer index, kind) of a LoRA module path, e.g. ``'layer_3/mlp/gate_up_lora'`` -> (3, 'gate_up').

  Accepts a prefix (``params/layer_3/...``) and a trailing ``/a`` or ``/b``. Raises ValueError otherwise.
  """
  m = _PATH_RE.search(path)
  if m is None or _OWNER[m.group(3)] != m.group(2):
    raise ValueError(
        f"not a LoRA module path: {path!r} (expected e.g. 'layer_0/attn/q_lora', "
        f"'layer_0/mlp/down_lora'; kinds {KINDS})"
    )
  return int(m.group(1)), m.group(3)


def module_path(layer: int, kind: str) -> str:
  """The canonical path of a LoRA module: ``layer_{layer}/{attn|mlp}/{kind}_lora``."""
  return f"layer_{layer}/{_OWNER[kind]}/{kind}_lora"


def text_config(model_config):
  """A gemma TransformerConfig from a config or from a transformer module holding one."""
  cfg = getattr(model_config, "config", model_config)
  for field in ("embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim", "attention_types"):
    if not hasattr(cfg, field):
      raise TypeError(f"expected a gemma TransformerConfig (or a model with .config), got {type(cfg)}")
  return cfg


def _io_dims(cfg, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  d, f = cfg.embed_dim, cfg.hidden_dim
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return {
      "q": ((d,), (n, h)),
      "k": ((d,), (k, h)),
      "v": ((d,), (k, h)),
      "kv": ((d,), (2, k, h)),
      "o": ((n, h), (d,)),
      "gate": ((d,), (f,)),
      "up": ((d,), (f,)),
      "gate_up": ((d,), (2, f)),
      "down": ((f,), (d,)),
  }[kind]


def resolve_module_ranks(paths: Sequence[str], rank: int | Mapping[str, int]) -> dict[str, int]:
  """{path: rank} for every path; a mapping must cover every path and every key must match one."""
  paths = list(paths)
  try:
    ranks = squeeze.resolve_ranks(paths, rank)
  except ValueError as e:
    raise ValueError(f"LoRAConfig.rank: {e}") from None
  missing = [p for p, r in ranks.items() if r is None]
  if missing:
    raise ValueError(
        f"LoRAConfig.rank: no rank for LoRA module {missing[0]!r} ({len(missing)} modules "
        f"unmatched); add a key for it or a '*' default, keys are {list(rank)}"
    )
  return ranks


def lora_shapes(model_config, config: LoRAConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{path: (a_shape, b_shape)} of every LoRA module (layer order, then ``config.kinds()`` order).

  ``model_config``: a gemma ``TransformerConfig`` or a transformer module (its ``.config``). Pure python.
  """
  cfg = text_config(model_config)
  paths = [module_path(i, kind) for i in range(cfg.num_layers) for kind in config.kinds()]
  ranks = resolve_module_ranks(paths, config.rank)
  out = {}
  for p in paths:
    _, kind = module_kind(p)
    in_dims, out_dims = _io_dims(cfg, kind)
    out[p] = ((*in_dims, ranks[p]), (ranks[p], *out_dims))
  return out


def lora_param_count(model_config, config: LoRAConfig) -> int:
  """Σ over modules of r · (prod(in_dims) + prod(out_dims))."""
  return sum(math.prod(a) + math.prod(b) for a, b in lora_shapes(model_config, config).values())


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
  shapes = tuple((p, a, b) for p, (a, b) in lora_shapes(model_config, config).items())
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
    cfg = text_config(self.model)
    if cfg.num_kv_heads == cfg.num_heads:
      # gemma then uses one qkv_einsum; no Gemma 3 size does, so that layout is not implemented.
      raise NotImplementedError(
          "LoRA: models with num_kv_heads == num_heads (gemma's qkv_einsum) are not "
          "supported; every Gemma 3 size uses grouped/multi-query attention"
      )
    shapes = lora_shapes(cfg, self.config)
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
    cfg = text_config(self.model)
    shapes = lora_shapes(cfg, self.config)
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
    from kauldron import kontext  # pylint: disable=g-import-not-at-top

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


# The hand-written backward of the LoRA product (``_lora_matmul``); False falls back to autodiff, which
# experiments/model_speed.py times side by side and tests/test_lora.py checks against.
HAND_BACKWARD = True


def _lora_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
  """scale · (x @ a) @ b in float32; x (..., *in), a (*in, r), b (r, *out) -> (..., *out)."""
  n_in = a.ndim - 1
  if not HAND_BACKWARD:
    xa = jnp.tensordot(x.astype(jnp.float32), a.astype(jnp.float32), axes=n_in)
    return jnp.tensordot(xa * scale, b.astype(jnp.float32), axes=1)
  lead, in_dims, out_dims = x.shape[: x.ndim - n_in], a.shape[:-1], b.shape[1:]
  x2 = x.astype(jnp.float32).reshape(-1, math.prod(in_dims))
  a2 = a.astype(jnp.float32).reshape(-1, a.shape[-1])
  b2 = b.astype(jnp.float32).reshape(b.shape[0], -1)
  return _lora_matmul(x2, a2, b2, float(scale)).reshape(*lead, *out_dims)


# The contraction over tokens: dot_general(u (T, m), v (T, n)) -> (m, n), no transposed copy of u or v.
_TOKENS = (((0,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_matmul(x: Array, a: Array, b: Array, scale: float) -> Array:
  """scale · (x @ a) @ b for 2-D x (T, m), a (m, r), b (r, n), with a hand-written backward.

  Why not autodiff: on XLA:CPU the transposed GEMMs autodiff emits for the factor gradients (a's (m, r) =
  xᵀ · g_xa and b's (r, n) = (xa)ᵀ · g) were laid out by copying the LARGE operand (x or the (T, n)
  cotangent) into transposed form, up to 18 ms per projection on the real 270M: with the other copies
  of that kind a quarter of a train step (experiments/model_speed.py). Here every token contraction is
  written as (big, small) -> (m, r) or (n, r), which XLA runs on the untransposed big operand; only
  (T, r) and (r, n) things get transposed. Same math, checked against autodiff in float64
  (tests/test_lora.py).
  """
  return jnp.dot(jnp.dot(x, a) * scale, b)


def _lora_matmul_fwd(x, a, b, scale):
  xa = jnp.dot(x, a)
  return jnp.dot(xa * scale, b), (x, a, b, xa)


def _lora_matmul_bwd(scale, res, g):
  x, a, b, xa = res
  g_xa = lax.dot_general(g, b, (((1,), (1,)), ((), ()))) * scale  # (T, r) = g · bᵀ
  grad_b = (lax.dot_general(g, xa, _TOKENS) * scale).T  # (r, n) = ((g)ᵀ · xa)ᵀ
  grad_a = lax.dot_general(x, g_xa, _TOKENS)  # (m, r) = xᵀ · g_xa
  grad_x = lax.dot_general(g_xa, a, (((1,), (1,)), ((), ())))  # (T, m) = g_xa · aᵀ
  return grad_x, grad_a, grad_b


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


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
      delta = _lora_delta(x, a, b, self.config.scale(a.shape[-1])).astype(y.dtype)
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
# Fuse / unfuse: W' = W ± scale · ΔW in the einsum layout of the base weight.
# --------------------------------------------------------------------------------------------------------


def _get(tree: Mapping, path: Sequence[str]):
  node = tree
  for k in path:
    if not isinstance(node, Mapping) or k not in node:
      raise KeyError("/".join(path))
    node = node[k]
  return node


def _set(tree: Mapping, path: Sequence[str], value) -> dict:
  """A copy of ``tree`` (dicts along ``path`` copied) with ``value`` at ``path``."""
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = value
  else:
    out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def _delta_w_updates(kind: str, a: Array, b: Array, attn_or_mlp: Mapping, transpose_gating: bool | None):
  """[(weight key path inside the attn/mlp dict, index, ΔW in that slot's layout)] for one LoRA pair."""
  hi = lax.Precision.HIGHEST
  ein = lambda eq: jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32), precision=hi)
  if kind == "o":
    return [(("attn_vec_einsum", "w"), None, ein("nhr,rd->nhd"))]
  if kind == "down":
    return [(("linear",), None, ein("fr,rd->fd"))]
  if kind in ("gate", "up", "gate_up"):
    w = attn_or_mlp["gating_einsum"]
    if transpose_gating is None:
      d, f = a.shape[0], b.shape[-1]
      if d == f:
        raise ValueError(
            f"fuse: cannot tell gemma's gating_einsum layout when embed_dim == hidden_dim " f"({d}); pass model_config="
        )
      transpose_gating = tuple(w.shape[1:]) == (f, d)
    if kind == "gate_up":
      return [(("gating_einsum",), None, ein("dr,rcf->cfd" if transpose_gating else "dr,rcf->cdf"))]
    dw = ein("dr,rf->fd" if transpose_gating else "dr,rf->df")
    return [(("gating_einsum",), 0 if kind == "gate" else 1, dw)]
  # Attention: q_einsum (N, d, H), kv_einsum (2, K, d, H) (Gemma 3 always has num_kv_heads < num_heads).
  if "qkv_einsum" in attn_or_mlp:
    raise NotImplementedError("fuse: gemma's qkv_einsum (num_kv_heads == num_heads) is not supported")
  if kind == "kv":
    return [(("kv_einsum", "w"), None, ein("dr,rckh->ckdh"))]
  dw = ein("dr,rnh->ndh")
  if kind == "q":
    return [(("q_einsum", "w"), None, dw)]
  return [(("kv_einsum", "w"), 0 if kind == "k" else 1, dw)]


def _apply_lora_to_base(base: Mapping, lora: Mapping, config: LoRAConfig, sign: float, model_config):
  transpose_gating = None
  if model_config is not None:
    transpose_gating = bool(text_config(model_config).transpose_gating_einsum)
  pairs = squeeze.lora_pairs(lora)
  if not pairs:
    raise ValueError("fuse: no LoRA pairs found in the lora tree")
  # Only the attn / mlp dicts that carry adapted weights go through the jitted update.
  owners = {}
  for path in pairs:
    layer, kind = module_kind(path)
    owner_path = (*path.split("/")[:-3], f"layer_{layer}", _OWNER[kind])  # keeps a "params/" prefix
    try:
      owners["/".join(owner_path)] = _get(base, owner_path)
    except KeyError:
      raise ValueError(f"fuse: LoRA module {path} has no base module {'/'.join(owner_path)}") from None
  scales = {p: sign * config.scale(int(pair["a"].shape[-1])) for p, pair in pairs.items()}
  new_weights = _fused_weights(owners, pairs, scales, transpose_gating=transpose_gating)
  out = dict(base)
  for wpath, w in new_weights.items():
    out = _set(out, tuple(wpath.split("/")), w)
  return out


@functools.partial(jax.jit, static_argnames=("transpose_gating",))
def _fused_weights(owners, pairs, scales, *, transpose_gating):
  """{weight path: W ± scale·ΔW} for every base weight an adapter touches (one program for all)."""
  # Accumulate every pair's ΔW per weight in float32, then cast once (k and v share kv_einsum).
  updates: dict[tuple[str, ...], list] = {}
  for path, pair in pairs.items():
    layer, kind = module_kind(path)
    owner_key = "/".join((*path.split("/")[:-3], f"layer_{layer}", _OWNER[kind]))
    a, b = pair["a"], pair["b"]
    for wpath, index, dw in _delta_w_updates(kind, a, b, owners[owner_key], transpose_gating):
      updates.setdefault((owner_key, *wpath), []).append((index, scales[path] * dw))
  out = {}
  for (owner_key, *wpath), items in updates.items():
    try:
      w = _get(owners[owner_key], wpath)
    except KeyError:
      raise ValueError(f"fuse: base weight {owner_key}/{'/'.join(wpath)} not found") from None
    w32 = w.astype(jnp.float32)
    for index, dw in items:
      target_shape = w32.shape if index is None else w32[index].shape
      if tuple(dw.shape) != tuple(target_shape):
        raise ValueError(
            f"fuse: ΔW {tuple(dw.shape)} does not fit base weight {owner_key}/"
            f"{'/'.join(wpath)} {tuple(w.shape)} (slot {index})"
        )
      w32 = w32 + dw if index is None else w32.at[index].add(dw)
    out["/".join((owner_key, *wpath))] = w32.astype(w.dtype)
  return out


def fuse(base: Mapping, lora: Mapping, config: LoRAConfig, *, model_config=None) -> dict:
  """Base params with ``scale · a @ b`` added into each adapted weight (its einsum layout, its dtype).

  ``apply(fuse(base, lora, cfg))`` with the plain transformer equals the LoRA model's output (up to the
  rounding of the base dtype). ``model_config`` is only needed to tell the gating_einsum layout apart when
  embed_dim == hidden_dim (never for Gemma 3). Jit-compilable.
  """
  return _apply_lora_to_base(base, lora, config, 1.0, model_config)


def unfuse(fused: Mapping, lora: Mapping, config: LoRAConfig, *, model_config=None) -> dict:
  """Inverse of ``fuse``: subtracts ``scale · a @ b`` (exact up to the base dtype's rounding)."""
  return _apply_lora_to_base(fused, lora, config, -1.0, model_config)


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
    new_params = _replace_pairs(new_params, folded)
  return new_params, dataclasses.replace(config, rank=describe_ranks(new_ranks))


def _replace_pairs(tree: Mapping, replacements: Mapping[str, Mapping], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if p in replacements:
      out[k] = replacements[p]
    elif isinstance(v, Mapping):
      out[k] = _replace_pairs(v, replacements, p)
    else:
      out[k] = v
  return out


def describe_ranks(ranks: Mapping[str, int]) -> int | dict[str, int]:
  """One int when all equal, else {canonical module path: rank} (a LoRAConfig.rank; JSON-able)."""
  values = set(ranks.values())
  if len(values) == 1:
    return values.pop()
  out = {}
  for p, r in ranks.items():
    layer, kind = module_kind(p)
    out[module_path(layer, kind)] = r
  return out


def lora_ranks(lora_params: Mapping) -> dict[str, int]:
  """{module path: rank} read from the params' shapes."""
  return {p: int(pair["a"].shape[-1]) for p, pair in sorted(squeeze.lora_pairs(lora_params).items())}
