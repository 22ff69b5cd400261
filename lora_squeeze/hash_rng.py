"""Counter-based hash random draws for the squeeze: the same bits in JAX (compiled) and in numpy (host).

The squeeze needs random numbers in two places: RSVD's Gaussian test matrix Ω and the a-columns of
re-initialised LoRA directions (a fresh kaiming-uniform draw). Both come from a PRNG key through a
counter-based integer hash (lowbias32), not through jax.random (threefry), for two reasons:

* the compiled XLA route (``squeeze.py``) and the numpy/LAPACK host route (``squeeze_host.py``) draw the
  same fresh columns, bit for bit, from the same key (the numpy twins here reproduce the JAX functions);
* on XLA:CPU (jaxlib 0.10.0) an executable that mixed threefry with the LAPACK custom calls of the small
  factorisations was seen to wedge on its second run (all workers idle, the caller blocked forever).
  ``experiments/xla_cpu_hang_check.py`` re-checks that case under a timeout.

Changing any constant here changes every squeeze's fresh directions (and so the results of runs that
grow a rank): the draws are part of the results' reproducibility.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# --------------------------------------------------------------------------------------------------------
# JAX (traceable; used inside the compiled squeeze).
# --------------------------------------------------------------------------------------------------------


def seed(key: Array, stream: int) -> Array:
  """A uint32 seed from a PRNG key (or a batch of keys) and a stream id, without running threefry."""
  data = jax.random.key_data(key).astype(jnp.uint32)
  s = data[..., 0] * jnp.uint32(0x9E3779B9) ^ data[..., -1]
  return mix(s ^ jnp.uint32((stream * 0x85EBCA6B) & 0xFFFFFFFF))


def mix(x: Array) -> Array:
  """lowbias32 (Wellons): a fast uint32 -> uint32 bijection with good avalanche."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform(s: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """U[0, 1) of ``shape`` from a uint32 seed (scalar or batch matching shape's leading dims)."""
  counter = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
  s = jnp.asarray(s, jnp.uint32).reshape(jnp.shape(s) + (1,) * (len(shape) - jnp.ndim(s)))
  bits = mix(mix(counter ^ s) + s)
  return (bits >> 8).astype(dtype) * (1.0 / (1 << 24))


def normal(s: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Standard normal of ``shape`` (Box–Muller on two hashed uniform streams)."""
  u1 = uniform(mix(s ^ jnp.uint32(0x68E31DA4)), shape, dtype)
  u2 = uniform(mix(s ^ jnp.uint32(0xB5297A4D)), shape, dtype)
  return jnp.sqrt(-2.0 * jnp.log1p(-u1)) * jnp.cos((2 * math.pi) * u2)


def kaiming_uniform(s: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """The standard LoRA ``a`` init of (..., m, k): U(-√(6/m), √(6/m)), as flax/gemma kaiming_uniform."""
  bound = math.sqrt(6.0 / shape[-2])
  return (2.0 * uniform(s, shape, dtype) - 1.0) * bound


# --------------------------------------------------------------------------------------------------------
# numpy twins (the host route): bit for bit the draws above.
# --------------------------------------------------------------------------------------------------------


def _np_mix(x: np.ndarray) -> np.ndarray:
  """``mix`` on uint32 numpy arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def np_seed(key_data: np.ndarray, stream: int) -> np.ndarray:
  """``seed`` from a key's raw uint32 data: the same seed, so the same draws as the JAX functions."""
  data = np.asarray(key_data).astype(np.uint32)
  with np.errstate(over="ignore"):
    s = data[..., 0] * np.uint32(0x9E3779B9) ^ data[..., -1]
    return _np_mix(s ^ np.uint32((stream * 0x85EBCA6B) & 0xFFFFFFFF))


def np_kaiming_uniform(s: np.ndarray, shape: tuple[int, int], dtype) -> np.ndarray:
  """``kaiming_uniform`` for one member on the host: bit for bit the JAX draws."""
  counter = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
  with np.errstate(over="ignore"):
    bits = _np_mix(_np_mix(counter ^ s) + s)
  u = (bits >> np.uint32(8)).astype(dtype) * (1.0 / (1 << 24))
  return (2.0 * u - 1.0) * math.sqrt(6.0 / shape[-2])


def key_data(key) -> np.ndarray:
  """Raw uint32 data of a PRNG key given as a key, its data, None (key(0)) or a zero-argument callable."""
  if callable(key):
    key = key()
  if key is None:
    key = jax.random.key(0)
  if isinstance(key, np.ndarray) and key.dtype == np.uint32:
    return key
  return np.asarray(jax.random.key_data(key))
