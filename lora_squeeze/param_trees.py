"""Base-param trees of a gemma transformer: their abstract shapes, size, and a check against the model.

`abstract_params(transformer)` gives the tree a model expects (ShapeDtypeStructs, nothing allocated);
`check_params` compares a loaded tree (orbax checkpoint, converted GGUF) with it path by path, so that a
checkpoint for another size surfaces as a clear error instead of a shape error deep inside a jitted
forward. Used by `models` and `gemma_gguf`.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def count_params(tree: Any) -> int:
  """Total number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  leaves = jax.tree.leaves(tree)
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))


def flatten(tree: Any) -> dict[str, Any]:
  """{'layer_0/attn/q_einsum/w': leaf} for a nested params dict."""
  return traverse_util.flatten_dict(tree, sep='/')


def check_params(params: Any, expected: Any, *, what: str) -> None:
  """Raises ValueError unless `params` has exactly the paths/shapes expected.

  Why: a checkpoint or GGUF for another size, or a layout change, otherwise
  surfaces as a cryptic shape error deep inside a jitted forward.

  Args:
    params: nested dict of arrays.
    expected: nested dict of arrays or ShapeDtypeStructs (e.g. from
      `abstract_params`).
    what: a name for the error message (model and source).
  """
  got, want = flatten(params), flatten(expected)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = [
      f'{k}: got {tuple(got[k].shape)}, expected {tuple(want[k].shape)}'
      for k in sorted(set(got) & set(want))
      if tuple(got[k].shape) != tuple(want[k].shape)
  ]
  if missing or extra or wrong:
    raise ValueError(mismatch_message(what, missing, extra, wrong))


def mismatch_message(what: str, missing: list[str], extra: list[str], wrong: list[str]) -> str:
  def show(items):
    head = ', '.join(items[:8])
    return head + (f', ... ({len(items)} in all)' if len(items) > 8 else '')

  lines = [f'{what}: params do not match the model.']
  if missing:
    lines.append(f'  missing: {show(missing)}')
  if extra:
    lines.append(f'  unexpected: {show(extra)}')
  if wrong:
    lines.append(f'  wrong shape: {show(wrong)}')
  return '\n'.join(lines)


def abstract_params(transformer: Any) -> Any:
  """`jax.eval_shape` of `transformer.init`: params as ShapeDtypeStructs.

  No memory is allocated, so this works for 12B on a laptop.
  """
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = jax.eval_shape(transformer.init, jax.random.key(0), tokens)
  return shapes['params']
