"""The optimizer, and its state across a rank change.

Optimizer: ``optax.adafactor`` with optax's defaults (factored second moments, update clipping 1.0,
multiply-by-parameter-scale, no momentum) and the learning rate applied outside it: Adafactor's chain is
linear after its RMS scaling, so ``lr · adafactor(None)`` equals ``adafactor(lr)`` and lets the rate change per
step without a schedule baked into the program. Schedule (paper): linear warmup over ``config.warmup_steps``
(1000) then constant; each later stage warms up again over ``config.rank_change_warmup`` steps.

At a rank change (``Trainer.change_rank``, ``config.squeeze.optimizer_state``):

* ``"fresh"`` (default): a new Adafactor state at the new rank (what a new LoRA run would start with).
* ``"carry"``: what survives a change of basis on the rank axis is carried: the step count (Adafactor's
  β2 schedule continues) and the second-moment statistics averaged over the rank axis, broadcast to the new
  rank. Adafactor factors a parameter only when its two largest dims are >= 128, so the state's *layout*
  changes at rank 128 (e.g. 128 → 64 turns ``v_row``/``v_col`` into a full ``v``): the carried statistics are
  rebuilt as full second-moment tensors first and re-encoded in the new layout (``carry_adafactor_state``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZER_STATE_MODES = ("fresh", "carry")


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
