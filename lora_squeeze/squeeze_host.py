"""The host route of the efficient squeeze: Alg. 2 in numpy with direct LAPACK calls, for concrete arrays.

``squeeze.squeeze_factors``, ``squeeze.singular_values`` and ``squeeze.squeeze_lora`` send concrete arrays
in host memory (numpy, or a jax.Array on one CPU device) here when the method is "efficient" (their
``route``, decided by ``use_host``); traced, accelerator and sharded arrays take squeeze.py's compiled XLA
route. Also here: ``host_map``, which runs modules side by side in threads (the ``lora-squeeze`` command's
file formats use it to squeeze while they write).

The results agree with the XLA route's (the same Cholesky-QR decisions, the same numerically-zero
threshold, the same fresh a-columns from ``hash_rng``), in float64 where the XLA route computes in float32.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg.lapack

try:
  from threadpoolctl import threadpool_limits
except ImportError:  # a core dependency, but optional here: one_blas_thread is then a no-op
  threadpool_limits = None

from lora_squeeze import hash_rng

Array = jax.Array

# Alg. 2 costs two Gram matrices, (m + n)·r_src² flops, and r_src×r_src factorisations: milliseconds per
# module. Through XLA:CPU each module also pays a dispatch, each distinct (shape, rank) a compile of seconds,
# and the Grams run as general GEMMs, twice the flops of BLAS syrk (which numpy's matmul calls for x.T @ x).
# So on the host the same algorithm runs in numpy with direct LAPACK calls, one module per
# call with no compile, and ``host_map`` runs modules side by side in threads (numpy and LAPACK release the
# GIL), BLAS on one thread each: the parallelism is across modules, which needs no synchronisation inside
# a factorisation and so degrades gently on a busy machine, where OpenBLAS's own threads collapsed.
#
# Precision: the Grams are accumulated in float64 (a float32 factor is converted a block of rows at a time)
# and every r_src×r_src step runs in float64; the two products that make the new factors, a @ x and yᵀ @ b,
# run in the input's precision, except for a rank-deficient factor (``_product64``: there they accumulate
# in float64). All-float32 arithmetic (the XLA route's) is exact to ~1e-6 when ΔW's singular
# values s_r and s_{r+1} are well apart, but the best rank-r approximation is ill-determined when they
# nearly coincide, and there float32 rounding of the Grams and the core SVD moved it by 1e-5 to 5e-5
# (measured, s_8/s_9 = 1.003-1.008 on Gemma-3-4B-shaped modules); with float64 accumulation the result is
# the float64 best approximation of the given factors to the output's rounding (~4e-7), for any gap.
# Costs: the Grams' flops at float64 speed (about 2x) plus one conversion pass per factor and product.
# The decisions are those of squeeze.py's XLA route (second Cholesky-QR pass, its shift, the zero-direction threshold in
# units of the input precision, the fresh a-columns from the same hash draws), with the second pass's
# trigger set for float64 Grams (``_HOST_SECOND_PASS_COND2``).

# CholeskyQR's loss of orthogonality is ~eps·cond²; with float64 Grams it stays below float32 rounding up to
# cond² = 1e8, so the host route's second pass runs only beyond that.
_HOST_SECOND_PASS_COND2 = 1e8
# Rows converted to float64 at a time for a Gram: ~1 MiB blocks, which stay in cache for their syrk.
_GRAM_BLOCK_BYTES = 1 << 20


def is_host_array(x) -> bool:
  """Whether ``x`` can take the host route: a numpy array, or a concrete single-device CPU jax.Array."""
  if isinstance(x, np.ndarray):
    return True
  if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
    return False
  devices = x.devices()
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _gram64(x: np.ndarray) -> np.ndarray:
  """xᵀx in float64 for an (m, r) x of any float dtype (BLAS syrk on blocks of rows converted to float64)."""
  if x.dtype == np.float64:
    return x.T @ x
  m, r = x.shape
  rows = max(1, _GRAM_BLOCK_BYTES // (8 * r))
  gram = np.zeros((r, r))
  for i in range(0, m, rows):
    block = x[i : i + rows].astype(np.float64)
    gram += block.T @ block
  return gram


def _host_cholesky_qr_r(x: np.ndarray, gram: np.ndarray) -> np.ndarray:
  """``cholesky_qr_r`` for one (m, r) ``x`` whose float64 Gram xᵀx is ``gram``: R in float64, the same
  passes and shifts (the second pass at ``_HOST_SECOND_PASS_COND2``)."""
  m, r = x.shape
  eps, tiny = float(np.finfo(np.float64).eps), float(np.finfo(np.float64).tiny)

  def chol(g, shift=0.0):  # upper R with g + shift·I = RᵀR, or None where Cholesky fails
    c, info = scipy.linalg.lapack.dpotrf(g + shift * np.eye(r) if shift else g, lower=False, clean=True)
    return c if info == 0 and np.isfinite(c).all() else None

  def shifted(g):
    return 10.0 * math.sqrt(m) * eps * float(np.trace(g)) / r + tiny

  r1 = chol(gram)
  if r1 is not None:
    d = np.abs(np.diagonal(r1))
    if d.max() ** 2 <= _HOST_SECOND_PASS_COND2 * d.min() ** 2:
      return r1
  r1 = chol(gram, shifted(gram))
  if r1 is None:  # the shift makes the Gram positive definite; only non-finite input gets here
    raise FloatingPointError("Cholesky-QR failed on a non-finite Gram matrix")
  inv, _ = scipy.linalg.lapack.dtrtri(r1, lower=False)
  q1 = x.astype(np.float64) @ inv
  g2 = q1.T @ q1
  r2 = chol(g2)
  if r2 is None:
    r2 = chol(g2, shifted(g2))
  return r2 @ r1


def _host_grams(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
  """aᵀa and b bᵀ in float64; ValueError naming the module when they are not finite.

  A NaN or Inf in a factor makes its Gram non-finite (its diagonal holds the columns' squared norms), so
  this checks the inputs without another pass over them; a finite factor whose Gram overflows is named
  as such."""
  with np.errstate(over="ignore", invalid="ignore"):  # judged below
    gram_a, gram_b = _gram64(a), _gram64(b.T)
  for name, x, g in (("a", a, gram_a), ("b", b, gram_b)):
    if not np.isfinite(g).all():
      loc = f" in LoRA module '{where}'" if where else ""
      if np.isfinite(x).all():
        raise ValueError(
            f"squeeze{loc}: factor {name}{tuple(x.shape)} is too large " f"(its Gram matrix overflows float64)"
        )
      raise ValueError(
          f"squeeze{loc}: factors a{tuple(a.shape)} / b{tuple(b.shape)} contain non-finite " "values (NaN or Inf)"
      )
  return gram_a, gram_b


def _host_core(a: np.ndarray, b: np.ndarray, where: str):
  """Alg. 2 steps 1-2 on the host: R_A, R_B, the core M = R_A R_Bᵀ (all float64), and the level at or
  below which a singular value is numerically zero: the XLA route's max(m, n)·eps·‖a‖_F‖b‖_F with the
  input precision's eps, each norm at least √tiny (the R that the shifted Cholesky gives a zero factor)."""
  gram_a, gram_b = _host_grams(a, b, where)
  r_a = _host_cholesky_qr_r(a, gram_a)
  r_b = _host_cholesky_qr_r(b.T, gram_b)
  finfo = np.finfo(a.dtype)
  floor = math.sqrt(float(finfo.tiny))
  zero = (
      max(a.shape[0], b.shape[1])
      * float(finfo.eps)
      * (math.sqrt(float(np.trace(gram_a))) + floor)
      * (math.sqrt(float(np.trace(gram_b))) + floor)
  )
  return r_a, r_b, r_a @ r_b.T, zero


def _core_values(s: np.ndarray, zero: float) -> np.ndarray:
  """The core's singular values as reported: float32, numerically zero ones exactly 0. (A zero factor
  leaves tiny values, which XLA:CPU flushes to 0 as denormals and float64 LAPACK keeps.)"""
  return np.where(s <= zero, 0.0, s).astype(np.float32)


def _host_compute(a, b) -> tuple[np.ndarray, np.ndarray, Any]:
  """a, b as numpy arrays of the compute dtype (no copy when they already are), and the input dtype."""
  dtype = a.dtype if a.dtype == b.dtype else jnp.result_type(a.dtype, b.dtype)  # (the latter: ~0.3 ms)
  ct = np.dtype(np.float64 if dtype == np.float64 else np.float32)
  return np.asarray(a, dtype=ct), np.asarray(b, dtype=ct), dtype


def _host_top_svd(core: np.ndarray, k: int, zero: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The r x r float64 core's top-k singular vectors U_k, V_k and all its singular values (descending).

  From the symmetric eigenproblem of M Mᵀ (LAPACK dsyevd, about half the time of dgesdd's full SVD, which
  was a third of a whole-adapter squeeze): s = √λ, U = its eigenvectors, V_k = Mᵀ U_k / s_k. Squaring
  costs relative accuracy only in values below about √eps64·s_1 (1.5e-8 s_1), far under the level
  ``zero`` (at least max(m, n)·eps32·s_1) below which a value is reported as 0 and its direction
  re-initialised; V's columns for such values are 0 here. gesdd (then gesvd) where the eigensolver fails.
  """
  g = core @ core.T
  lam, vecs, info = scipy.linalg.lapack.dsyevd(0.5 * (g + g.T), compute_v=1, lower=0)
  if info == 0 and np.isfinite(lam).all():
    s = np.sqrt(np.maximum(lam[::-1], 0.0))
    u_k = vecs[:, ::-1][:, :k]
    live = s[:k] > zero
    v_k = (core.T @ u_k) / np.where(live, s[:k], 1.0)
    v_k[:, ~live] = 0.0
    return u_k, s, v_k
  u_m, s, vt_m, info = scipy.linalg.lapack.dgesdd(core, compute_uv=1, full_matrices=0)
  if info != 0:  # gesdd did not converge: the slower, more robust gesvd
    u_m, s, vt_m, info = scipy.linalg.lapack.dgesvd(core, compute_uv=1, full_matrices=0)
  return u_m[:, :k], s, vt_m[:k].T


def _rank_deficient(r_f: np.ndarray, dtype) -> bool:
  """Whether the factor whose CholeskyQR R is ``r_f`` has a numerically zero pivot (lower rank than its r
  columns: always when r exceeds its other dimension, also with dependent columns)."""
  d = np.abs(np.diagonal(r_f))
  return bool(d.min() <= r_f.shape[0] * float(np.finfo(dtype).eps) * np.linalg.norm(r_f))


def _product64(f: np.ndarray, z: np.ndarray) -> np.ndarray:
  """f @ z for an (m, r) factor f and a float64 (r, k) z = R⁻¹(…), accumulated in float64 (f converted a
  block of rows at a time, as for the Grams), in f's dtype: the product for a rank-deficient factor.

  There the core's eigenvectors keep float64 rounding (~1e-16) in R's numerically zero rows, which R⁻¹
  multiplies by up to 1e22: z reaches 1e7, and f @ z cancels that back to O(1) only in float64. Rounded to
  float32 first and multiplied in float32, the new factors were off by up to 0.39 relative on 2% of fresh
  random 6 x 8 / 8 x 5 pairs squeezed to rank 5. A full-rank factor, however ill conditioned (cond 1e5
  measured), keeps the float32 product to ~2e-7: z's growth there is the true solution's; and that product
  is 1.3-1.7x faster."""
  if f.dtype == np.float64:
    return f @ z
  m, r = f.shape
  rows = max(1, _GRAM_BLOCK_BYTES // (8 * r))
  out = np.empty((m, z.shape[1]), f.dtype)
  for i in range(0, m, rows):
    out[i : i + rows] = f[i : i + rows].astype(np.float64) @ z
  return out


def squeeze(a, b, rank: int, key, where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The XLA route's "efficient" squeeze for one module on the host: (a', b', singular values).

  ``key``: a PRNG key, its raw uint32 data, None (key(0)) or a zero-argument callable giving one (called
  only when a direction is re-initialised)."""
  a, b, dtype = _host_compute(a, b)
  (m, r_src), n = a.shape, b.shape[1]
  r_a, r_b, core, zero = _host_core(a, b, where)
  k = min(rank, r_src)
  u_k, s, v_k = _host_top_svd(core, k, zero)
  half = np.sqrt(s[:k])
  # a' = Q_A U_r Σ^½ = a R_A⁻¹ (U_r Σ^½);  b' = Σ^½ V_rᵀ Q_Bᵀ = (R_B⁻¹ V_r Σ^½)ᵀ b.
  x, _ = scipy.linalg.lapack.dtrtrs(r_a, u_k * half, lower=False)
  y, _ = scipy.linalg.lapack.dtrtrs(r_b, v_k * half, lower=False)
  new_a = np.zeros((m, rank), a.dtype)
  new_b = np.zeros((rank, n), a.dtype)
  new_a[:, :k] = _product64(a, x) if _rank_deficient(r_a, a.dtype) else a @ x.astype(a.dtype)
  new_b[:k] = _product64(b.T, y).T if _rank_deficient(r_b, b.dtype) else y.T.astype(b.dtype) @ b
  # Energy-free directions (and those beyond r_src) get a fresh LoRA init, as on the XLA route.
  s_pad = np.zeros(rank)
  s_pad[:k] = s[:k]
  dead = s_pad <= zero
  if dead.any():
    fresh = hash_rng.np_kaiming_uniform(hash_rng.np_seed(hash_rng.key_data(key), 2), (m, rank), a.dtype)
    new_a[:, dead] = fresh[:, dead]
    new_b[dead] = 0.0
  return new_a.astype(dtype, copy=False), new_b.astype(dtype, copy=False), _core_values(s, zero)


def singular_values(a, b) -> np.ndarray:
  """All r_src singular values of ΔW = a @ b (descending, float32 numpy), without forming ΔW."""
  a, b, _ = _host_compute(a, b)
  _, _, core, zero = _host_core(a, b, "")
  s, info = scipy.linalg.lapack.dgesdd(core, compute_uv=0)[1::2]
  if info != 0:
    s = np.linalg.svd(core, compute_uv=False)
  return _core_values(s, zero)


def host_workers() -> int:
  """Threads ``host_map`` uses by default: the usable cores, at most 8 (one module in flight each)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  return max(1, min(cores, 8))


@contextlib.contextmanager
def one_blas_thread():
  """BLAS/LAPACK on one thread inside the block (numpy's and scipy's OpenBLAS; no-op without threadpoolctl)."""
  if threadpool_limits is None:
    yield
    return
  with threadpool_limits(limits=1, user_api="blas"):
    yield


def host_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int | None = None) -> Iterator[Any]:
  """``fn(item)`` for every item, yielded in order, computed in ``workers`` threads (default ``host_workers()``).

  Items are taken from ``items`` lazily: while the caller holds one result, ``workers`` items are being
  computed (or done and waiting), no more, so a streaming caller keeps ``workers + 1`` modules in memory
  and every thread busy while it writes. BLAS runs on one thread while the generator is alive (threads
  across modules, not inside one). An exception in ``fn`` is raised when its item's turn comes (the earlier
  items are yielded first); the pending ones are cancelled. ``workers=1`` runs everything in the caller's
  thread.
  """
  workers = host_workers() if workers is None else workers
  it = iter(items)
  if workers <= 1:
    with one_blas_thread():
      for item in it:
        yield fn(item)
    return
  with one_blas_thread(), concurrent.futures.ThreadPoolExecutor(workers, "lora_squeeze") as pool:
    pending = collections.deque()
    try:
      for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) > workers:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for f in pending:
        f.cancel()


ROUTES = ("auto", "host", "xla")


def use_host(method: str, route: str, a, b) -> bool:
  """Whether a squeeze takes the host route (see ``squeeze_factors``'s ``route``)."""
  if route not in ROUTES:
    raise ValueError(f"squeeze: unknown route {route!r}; expected one of {ROUTES}")
  if route == "xla" or method != "efficient":
    if route == "host":
      raise ValueError(f"squeeze: the host route runs method 'efficient' only, not {method!r}")
    return False
  on_host = is_host_array(a) and is_host_array(b)
  if route == "host" and not on_host:
    raise ValueError(
        "squeeze: the host route needs concrete numpy or single-device CPU arrays (not traced " "or accelerator arrays)"
    )
  return on_host


def squeeze_pairs(
    pairs: Mapping[str, Mapping], todo: list[tuple[int, str]], ranks: Mapping[str, int], key: Array
) -> dict[str, tuple]:
  """``squeeze.squeeze_lora``'s host route: every module through ``host_map`` (threads across modules), results back
  as arrays of the input's kind (jax Arrays in one device_put, numpy stays numpy)."""

  def one(job):
    i, p = job
    a, b = np.asarray(pairs[p]["a"]), np.asarray(pairs[p]["b"])
    # fold_in costs a dispatch (~0.1-0.6 ms): made only for a module that re-initialises directions.
    new_a, new_b, _ = squeeze(
        a.reshape(-1, a.shape[-1]),
        b.reshape(b.shape[0], -1),
        int(ranks[p]),
        functools.partial(jax.random.fold_in, key, i),
        p,
    )
    return new_a.reshape(*a.shape[:-1], -1), new_b.reshape(-1, *b.shape[1:])

  out = dict(zip((p for _, p in todo), host_map(one, todo)))
  to_device = [p for _, p in todo if isinstance(pairs[p]["a"], jax.Array) or isinstance(pairs[p]["b"], jax.Array)]
  out.update(zip(to_device, jax.device_put([out[p] for p in to_device])))
  return out
