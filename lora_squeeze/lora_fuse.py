"""Fuse and unfuse LoRA into the base weights: W' = W ± scale · ΔW, in the einsum layout of each weight.

``fuse(base, lora, config)`` gives base params in which every adapted gemma weight (``q_einsum``,
``kv_einsum``, ``attn_vec_einsum``, ``gating_einsum``, ``linear``) carries its adapter's ``scale · a @ b``,
so the plain transformer computes what the LoRA model computes; ``unfuse`` subtracts it again. ΔW is
accumulated in float32 (k and v share ``kv_einsum``, gate and up ``gating_einsum``) and cast once to the
weight's dtype; all weights are updated in one jitted program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lora_squeeze import lora as lora_lib
from lora_squeeze import lora_layout
from lora_squeeze import squeeze

Array = jax.Array


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


def _apply_lora_to_base(base: Mapping, lora: Mapping, config: lora_lib.LoRAConfig, sign: float, model_config):
  transpose_gating = None
  if model_config is not None:
    transpose_gating = bool(lora_layout.text_config(model_config).transpose_gating_einsum)
  pairs = squeeze.lora_pairs(lora)
  if not pairs:
    raise ValueError("fuse: no LoRA pairs found in the lora tree")
  # Only the attn / mlp dicts that carry adapted weights go through the jitted update.
  owners = {}
  for path in pairs:
    layer, kind = lora_layout.module_kind(path)
    owner_path = (*path.split("/")[:-3], f"layer_{layer}", lora_layout.OWNER[kind])  # keeps a "params/" prefix
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
    layer, kind = lora_layout.module_kind(path)
    owner_key = "/".join((*path.split("/")[:-3], f"layer_{layer}", lora_layout.OWNER[kind]))
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


def fuse(base: Mapping, lora: Mapping, config: lora_lib.LoRAConfig, *, model_config=None) -> dict:
  """Base params with ``scale · a @ b`` added into each adapted weight (its einsum layout, its dtype).

  ``apply(fuse(base, lora, cfg))`` with the plain transformer equals the LoRA model's output (up to the
  rounding of the base dtype). ``model_config`` is only needed to tell the gating_einsum layout apart when
  embed_dim == hidden_dim (never for Gemma 3). Jit-compilable.
  """
  return _apply_lora_to_base(base, lora, config, 1.0, model_config)


def unfuse(fused: Mapping, lora: Mapping, config: lora_lib.LoRAConfig, *, model_config=None) -> dict:
  """Inverse of ``fuse``: subtracts ``scale · a @ b`` (exact up to the base dtype's rounding)."""
  return _apply_lora_to_base(fused, lora, config, -1.0, model_config)
