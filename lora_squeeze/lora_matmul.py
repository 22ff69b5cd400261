"""The LoRA product ``scale · (x @ a) @ b`` that the interceptor in ``lora.py`` adds to each projection.

``lora_delta`` takes einsum-shaped factors (a: (*in, r), b: (r, *out)) and computes the product in float32;
by default through ``lora_matmul``, a 2-D matmul with a hand-written backward (why: see its docstring).
``HAND_BACKWARD = False`` falls back to autodiff (experiments/model_speed.py times both; tests/test_lora.py
checks one against the other). Pure jax: imports nothing of the package.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# The hand-written backward of the LoRA product (``lora_matmul``); False falls back to autodiff, which
# experiments/model_speed.py times side by side and tests/test_lora.py checks against.
HAND_BACKWARD = True


def lora_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
  """scale · (x @ a) @ b in float32; x (..., *in), a (*in, r), b (r, *out) -> (..., *out)."""
  n_in = a.ndim - 1
  if not HAND_BACKWARD:
    xa = jnp.tensordot(x.astype(jnp.float32), a.astype(jnp.float32), axes=n_in)
    return jnp.tensordot(xa * scale, b.astype(jnp.float32), axes=1)
  lead, in_dims, out_dims = x.shape[: x.ndim - n_in], a.shape[:-1], b.shape[1:]
  x2 = x.astype(jnp.float32).reshape(-1, math.prod(in_dims))
  a2 = a.astype(jnp.float32).reshape(-1, a.shape[-1])
  b2 = b.astype(jnp.float32).reshape(b.shape[0], -1)
  return lora_matmul(x2, a2, b2, float(scale)).reshape(*lead, *out_dims)


# The contraction over tokens: dot_general(u (T, m), v (T, n)) -> (m, n), no transposed copy of u or v.
_TOKENS = (((0,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_matmul(x: Array, a: Array, b: Array, scale: float) -> Array:
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


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)
