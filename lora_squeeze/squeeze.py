"""LoRA-Squeeze: change the rank of trained LoRA factors with (randomized) SVD.

Pure functions on arrays (JAX, no Flax), the heart of the project. Paper: "LoRA-Squeeze: Simple and Effective
Post-Tuning and In-Tuning Compression of LoRA Modules" (arXiv 2602.10993).

A LoRA pair is ``a`` (m, r_src) and ``b`` (r_src, n) with ΔW = a @ b. Squeezing to ``r_tgt`` keeps the top
``r_tgt`` singular triplets of ΔW (the optimal rank-r_tgt approximation, Eckart–Young) and splits the singular
values evenly: a' = U_r Σ_r^½, b' = Σ_r^½ V_rᵀ (Alg. 1, lines 17-19).

Methods (``squeeze_factors(..., method=...)``):

* ``"efficient"`` (Alg. 2, Appendix D): never forms the m×n ΔW. ΔW = Q_A (R_A R_Bᵀ) Q_Bᵀ, so the SVD of the
  r_src×r_src core M = R_A R_Bᵀ gives the SVD of ΔW. We get R_A, R_B from Gram matrices (Cholesky-QR) rather
  than Householder QR: one tall-skinny GEMM instead of a slow, sequential factorisation. A float32 Gram squares
  the condition number, so we (1) shift the first Cholesky (it never fails, also for b = 0 or repeated
  columns) and (2) re-orthogonalise with a second Cholesky-QR pass whenever the first pass's R is
  ill-conditioned (CholeskyQR2 / shifted CholeskyQR, Fukaya et al. 2020). The result has the accuracy of the
  Householder route; Q_A and Q_B are never materialised (a' = a @ R_A⁻¹ U_r Σ_r^½).
* ``"rsvd"``: forms ΔW and runs Algorithm 1 as written (oversampling k_o, k_q power iterations with QR
  re-orthogonalisation at each half step, Gaussian Ω from ``key``).
* ``"svd"``: forms ΔW and runs a full SVD (the reference, and what PEFT/kohya-style tools do).

Directions that carry no energy (singular value numerically zero, or the extra directions when
``rank > r_src``) are re-initialised as a fresh LoRA direction: a standard (kaiming-uniform) ``a`` column and a
zero ``b`` row. ΔW is unchanged and the direction stays trainable (with the even split both would be zero,
and a zero a-column with a zero b-row gets no gradient).

All computation is in float32 (float64 for float64 inputs) with HIGHEST matmul precision (TPUs and GPUs would
otherwise use bf16/tf32 passes); results are cast back to the input dtype. Singular values are float32.

Where "efficient" runs (``squeeze_factors``' ``route``): concrete arrays in host memory (numpy, or jax Arrays
on one CPU device) take the host route, the same algorithm in numpy with direct LAPACK calls, nothing
compiled, modules side by side in threads (``squeeze_host.py``); traced, accelerator and sharded arrays take the
compiled XLA route. The command (adapters/, lora_files.py, gguf_lora.py) and ``squeeze_lora`` both go through this.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_squeeze import hash_rng, squeeze_host

Array = jax.Array

METHODS = ("efficient", "rsvd", "svd")

# The first Cholesky-QR pass is trusted when cond(R)² (estimated from R's diagonal, an underestimate that
# is good enough here) stays below this: its loss of orthogonality, ~eps·cond², is then at the level of
# Householder QR in float32 (~1e-5). Otherwise a second pass runs.
_SECOND_PASS_COND2 = 30.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SqueezedFactors:
  """The result of ``squeeze_factors``.

  Attributes:
    a: (m, rank) new left factor, input dtype.
    b: (rank, n) new right factor, input dtype.
    singular_values: all singular values of ΔW that the method knows, descending, float32: r_src for
      "efficient", min(m, n) for "svd", r_tgt + k_o for "rsvd" (not padded for rank > r_src).
  """

  a: Array
  b: Array
  singular_values: Array


# --------------------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _mm(x: Array, y: Array) -> Array:
  return jnp.matmul(x, y, precision=lax.Precision.HIGHEST)


def _gram(x: Array) -> Array:
  """xᵀx for a (batch of) tall-skinny x (..., m, r)."""
  return jnp.einsum("...mi,...mj->...ij", x, x, precision=lax.Precision.HIGHEST)


def _t(x: Array) -> Array:
  return jnp.swapaxes(x, -1, -2)


def _check_factors(a, b, rank: int, *, where: str = "") -> None:
  """Raises ValueError naming the problem with the shapes, dtypes or rank (values: see _raise_if_not_finite)."""
  loc = f" in LoRA module '{where}'" if where else ""
  if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
    raise ValueError(
        f"squeeze{loc}: expected 2-D factors a (m, r_src) and b (r_src, n), got a{tuple(np.shape(a))} "
        f"and b{tuple(np.shape(b))}"
    )
  if a.shape[1] != b.shape[0]:
    raise ValueError(
        f"squeeze{loc}: inner dimensions differ: a{tuple(a.shape)} @ b{tuple(b.shape)} "
        f"(a has r_src={a.shape[1]}, b has r_src={b.shape[0]})"
    )
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"squeeze{loc}: target rank must be an int >= 1, got {rank!r}")
  if not (jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
    raise ValueError(f"squeeze{loc}: factors must be floating point, got a {a.dtype}, b {b.dtype}")


def _raise_if_not_finite(finite, where: str, a_shape, b_shape) -> None:
  """``finite``: the flag from ``_squeeze_xla``; raises naming the module when it is concrete and False."""
  if isinstance(finite, jax.core.Tracer):
    return  # under jit value checks are impossible; NaN in gives NaN out.
  if not bool(finite):
    loc = f" in LoRA module '{where}'" if where else ""
    raise ValueError(
        f"squeeze{loc}: factors a{tuple(a_shape)} / b{tuple(b_shape)} contain " "non-finite values (NaN or Inf)"
    )


# --------------------------------------------------------------------------------------------------------
# Decompositions.
# --------------------------------------------------------------------------------------------------------


def svd(w: Array) -> tuple[Array, Array, Array]:
  """Thin SVD of w (m, n): u (m, k), s (k,), vt (k, n) with k = min(m, n), s descending."""
  return jnp.linalg.svd(w, full_matrices=False)


def rsvd(w: Array, rank: int, *, key: Array, oversample: int = 10, power_iters: int = 2) -> tuple[Array, Array, Array]:
  """Randomized SVD, Algorithm 1 of the paper (Halko et al. 2011).

  Args:
    w: (m, n) matrix.
    rank: r; the sketch has r' = r + oversample columns (capped at min(m, n)).
    key: PRNG key for the Gaussian test matrix Ω (n, r'). Same key, same result. (Ω is drawn by a
      counter-based hash of the key, not by jax.random; see ``hash_rng``.)
    oversample: k_o (paper: 10).
    power_iters: k_q (paper: 2), each with QR re-orthogonalisation at both half steps (lines 5-8).

  Returns:
    u (m, r'), s (r',), vt (r', n): the r' approximate top singular triplets, s descending. Callers keep the
    first r (lines 14-16).
  """
  m, n = w.shape
  r_sketch = min(rank + oversample, m, n)
  omega = hash_rng.normal(hash_rng.seed(key, 1), (n, r_sketch), w.dtype)  # line 2 (hash_rng: no threefry)
  y = _mm(w, omega)  # line 3
  for _ in range(power_iters):  # lines 4-9
    q, _ = jnp.linalg.qr(y)
    q_star, _ = jnp.linalg.qr(_mm(w.T, q))
    y = _mm(w, q_star)
  q, _ = jnp.linalg.qr(y)  # line 10
  d = _mm(q.T, w)  # line 11: (r', n)
  u_tilde, s, vt = jnp.linalg.svd(d, full_matrices=False)  # line 12
  return _mm(q, u_tilde), s, vt  # line 13


def cholesky_qr_r(x: Array) -> Array:
  """R (r×r, upper triangular) with x = Q R and Q = x R⁻¹ orthonormal, from Gram matrices only.

  ``x`` is (m, r) or a batch (g, m, r) of same-shape factors (then R is (g, r, r)).

  Pass 1 is a plain Cholesky of xᵀx (exact to working precision when x is well conditioned). When it fails
  (rank-deficient or zero x) or R's diagonal says x is ill conditioned, pass 1 is redone with a small
  diagonal shift (so it cannot fail) and a second pass runs on Q₁ = x R₁⁻¹ (shifted CholeskyQR2, Fukaya et
  al. 2020). x = Q₁R₁ holds exactly whatever the shift; the second pass restores the orthogonality of Q.
  For a batch, the second pass runs for the whole batch when any member needs it (it is harmless for the
  others). Directions of x that are numerically zero end with a numerically zero row in R, so they
  contribute nothing downstream.
  """
  m, r = x.shape[-2:]
  eps, tiny = jnp.finfo(x.dtype).eps, jnp.finfo(x.dtype).tiny
  eye = jnp.eye(r, dtype=x.dtype)

  def chol(g, shift):
    return _t(jnp.linalg.cholesky(g + shift[..., None, None] * eye))  # upper

  def shifted(g):
    # ~ the rounding error of the Gram itself; never below `tiny` (x = 0 gives R = √tiny·I, not NaN).
    return 10.0 * math.sqrt(m) * eps * jnp.trace(g, axis1=-2, axis2=-1) / r + tiny

  def all_finite(y):  # per batch member
    return jnp.all(jnp.isfinite(y), axis=(-2, -1))

  gram = _gram(x)
  zero = jnp.zeros(gram.shape[:-2], gram.dtype)
  r1 = chol(gram, zero)
  d = jnp.abs(jnp.diagonal(r1, axis1=-2, axis2=-1))
  ill = ~all_finite(r1) | (jnp.max(d, -1) ** 2 > _SECOND_PASS_COND2 * jnp.min(d, -1) ** 2)

  def second_pass(_):
    r1 = chol(gram, shifted(gram))
    q1 = _mm(x, jax.scipy.linalg.solve_triangular(r1, jnp.broadcast_to(eye, r1.shape), lower=False))
    g2 = _gram(q1)
    # Q₁ is well conditioned now except in numerically-null directions of x, where a plain Cholesky can
    # meet a negative pivot: only then shift (the shift would otherwise cost ~√m·eps of accuracy).
    r2 = chol(g2, zero)
    r2 = jnp.where(all_finite(r2)[..., None, None], r2, chol(g2, shifted(g2)))
    return _mm(r2, r1)

  return lax.cond(jnp.any(ill), second_pass, lambda _: r1, None)


def _core_svd(a: Array, b: Array) -> tuple[Array, Array, Array, Array, Array]:
  """Alg. 2 steps 1-3: R_A, R_B and the SVD of the core M = R_A R_Bᵀ (ΔW's singular values)."""
  r_a = cholesky_qr_r(a)
  r_b = cholesky_qr_r(_t(b))
  u_m, s, vt_m = jnp.linalg.svd(_mm(r_a, _t(r_b)))
  return r_a, r_b, u_m, s, vt_m


@jax.jit
def _singular_values_xla(a: Array, b: Array) -> Array:
  ct = _compute_dtype(jnp.result_type(a, b))
  r_a = cholesky_qr_r(a.astype(ct))
  r_b = cholesky_qr_r(_t(b).astype(ct))
  return jnp.linalg.svd(_mm(r_a, _t(r_b)), compute_uv=False).astype(jnp.float32)


def singular_values(a: Array, b: Array, *, route: str = "auto") -> Array:
  """All r_src singular values of ΔW = a @ b (descending, float32), without forming ΔW.

  ``route`` as in ``squeeze_factors`` (the host route returns numpy)."""
  _check_factors(a, b, 1)
  if squeeze_host.use_host("efficient", route, a, b):
    return squeeze_host.singular_values(np.asarray(a), np.asarray(b))
  return _singular_values_xla(a, b)


# --------------------------------------------------------------------------------------------------------
# The squeeze.
# --------------------------------------------------------------------------------------------------------


def _squeeze_matrices(
    a: Array, b: Array, key: Array, *, rank: int, method: str, oversample: int, power_iters: int
) -> tuple[SqueezedFactors, Array]:
  """squeeze_factors' XLA route on one pair a (m, r_src), b (r_src, n).

  Also returns a flag: are all the inputs finite (checked by the callers when concrete).
  """
  dtype = jnp.result_type(a, b)
  ct = _compute_dtype(dtype)
  a, b = a.astype(ct), b.astype(ct)
  (m, r_src), n = a.shape, b.shape[-1]
  finite = jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))

  if method == "efficient":
    r_a, r_b, u_m, s, vt_m = _core_svd(a, b)
    k = min(rank, r_src)
    half = jnp.sqrt(s[:k])
    # a' = Q_A U_r Σ^½ = a R_A⁻¹ (U_r Σ^½);  b' = Σ^½ V_rᵀ Q_Bᵀ = (R_B⁻¹ V_r Σ^½)ᵀ b.
    x = jax.scipy.linalg.solve_triangular(r_a, u_m[:, :k] * half, lower=False)
    y = jax.scipy.linalg.solve_triangular(r_b, _t(vt_m[:k]) * half, lower=False)
    new_a, new_b = _mm(a, x), _mm(_t(y), b)
  else:
    delta_w = _mm(a, b)
    if method == "svd":
      u, s, vt = svd(delta_w)
    else:
      u, s, vt = rsvd(delta_w, rank, key=key, oversample=oversample, power_iters=power_iters)
    k = min(rank, s.shape[0])
    half = jnp.sqrt(s[:k])
    new_a, new_b = u[:, :k] * half, half[:, None] * vt[:k]

  # Pad to `rank` and give every energy-free direction a fresh LoRA init (see module docstring). "Zero" is
  # relative to what the factors can resolve: max(m, n)·eps·‖a‖_F‖b‖_F.
  pad = rank - k
  s_pad = jnp.pad(s[:k], (0, pad))
  new_a = jnp.pad(new_a, ((0, 0), (0, pad)))
  new_b = jnp.pad(new_b, ((0, pad), (0, 0)))
  scale = jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b))
  dead = s_pad <= max(m, n) * jnp.finfo(ct).eps * scale
  fresh = hash_rng.kaiming_uniform(hash_rng.seed(key, 2), (m, rank), ct)
  new_a = jnp.where(dead[None, :], fresh, new_a)
  new_b = jnp.where(dead[:, None], 0.0, new_b)
  out = SqueezedFactors(a=new_a.astype(dtype), b=new_b.astype(dtype), singular_values=s.astype(jnp.float32))
  return out, finite


@functools.partial(jax.jit, static_argnames=("rank", "method", "oversample", "power_iters"))
def _squeeze_xla(
    a: Array, b: Array, key: Array, *, rank: int, method: str, oversample: int, power_iters: int
) -> tuple[Array, Array, Array, Array]:
  """One einsum-shaped pair in, the new pair, its singular values and the finite flag out, as ONE compiled
  program per (shapes, rank): the matrix view and back happen inside jit.

  One module per program: batching same-shape modules into one program (vmapped, batch >= 2) wedged
  XLA:CPU with jaxlib 0.10.0 when first built; ``experiments/xla_cpu_hang_check.py`` re-checks it."""
  out, finite = _squeeze_matrices(
      a.reshape(-1, a.shape[-1]),
      b.reshape(b.shape[0], -1),
      key,
      rank=rank,
      method=method,
      oversample=oversample,
      power_iters=power_iters,
  )
  return out.a.reshape(*a.shape[:-1], rank), out.b.reshape(rank, *b.shape[1:]), out.singular_values, finite


def squeeze_factors(
    a: Array,
    b: Array,
    rank: int,
    *,
    method: str = "efficient",
    key: Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    where: str = "",
    route: str = "auto",
) -> SqueezedFactors:
  """Returns a rank-``rank`` LoRA (a', b') approximating ΔW = a @ b optimally.

  Args:
    a: (m, r_src) left factor.
    b: (r_src, n) right factor.
    rank: target rank r_tgt (static under jit). ``rank >= r_src`` reproduces ΔW exactly; the extra
      directions are fresh, trainable LoRA directions (random a columns, zero b rows).
    method: "efficient" (Alg. 2, never forms ΔW), "rsvd" (Alg. 1 on ΔW) or "svd" (full SVD of ΔW).
    key: PRNG key for "rsvd"'s Ω and for the a-columns of re-initialised directions, or its raw
      ``jax.random.key_data`` (uint32 numpy). None means ``jax.random.key(0)``; pass your own for
      independent draws. Both routes draw the same fresh columns from the same key.
    oversample, power_iters: k_o and k_q of Alg. 1 (paper: 10 and 2), used by "rsvd".
    where: a module path used in error messages.
    route: "auto" (default): "efficient" on concrete host arrays (numpy, or a jax.Array on one CPU
      device) runs on the host in numpy/LAPACK (no compile, BLAS syrk Grams; see ``squeeze_host``),
      anything else (traced, accelerator or sharded arrays; "svd", "rsvd") as one compiled XLA program.
      "host" or "xla" force one (tests compare them).

  Returns:
    SqueezedFactors(a (m, rank), b (rank, n), singular_values): numpy arrays for numpy inputs on the host
    route, jax Arrays otherwise.

  Raises:
    ValueError: unknown method or route, rank < 1, non-2-D factors, mismatched inner dimensions,
      non-integer rank, or (for concrete, non-traced inputs) non-finite values. Under jit, value checks
      are impossible; NaN inputs then give NaN outputs.
  """
  check_method(method)
  _check_factors(a, b, rank, where=where)
  if squeeze_host.use_host(method, route, a, b):
    new_a, new_b, values = squeeze_host.squeeze(np.asarray(a), np.asarray(b), int(rank), key, where)
    if isinstance(a, jax.Array) or isinstance(b, jax.Array):
      new_a, new_b, values = jax.device_put((new_a, new_b, values))
    return SqueezedFactors(a=new_a, b=new_b, singular_values=values)
  key = jax.random.key(0) if key is None else key
  if isinstance(key, np.ndarray) and key.dtype == np.uint32:
    key = jax.random.wrap_key_data(key)
  new_a, new_b, values, finite = _squeeze_xla(
      a, b, key, rank=int(rank), method=method, oversample=oversample, power_iters=power_iters
  )
  _raise_if_not_finite(finite, where, a.shape, b.shape)
  return SqueezedFactors(a=new_a, b=new_b, singular_values=values)


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"squeeze: unknown method {method!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------------------------------------
# Whole LoRA pytrees.
# --------------------------------------------------------------------------------------------------------


def is_lora_pair(node: Any) -> bool:
  """A LoRA pair is a mapping with array leaves 'a' (*in_dims, r) and 'b' (r, *out_dims)."""
  return isinstance(node, Mapping) and "a" in node and "b" in node and hasattr(node["a"], "shape")


def _check_matrix_view(a, b, where: str) -> None:
  """Raises ValueError unless einsum-shaped a (*in, r) and b (r, *out) have a matrix view."""
  if a.ndim < 2 or b.ndim < 2:
    raise ValueError(
        f"LoRA module '{where}': a{tuple(a.shape)} and b{tuple(b.shape)} need >= 2 dims "
        "(a: input dims then r, b: r then output dims)"
    )
  if a.shape[-1] != b.shape[0]:
    raise ValueError(
        f"LoRA module '{where}': rank mismatch, a{tuple(a.shape)} ends in r={a.shape[-1]} but "
        f"b{tuple(b.shape)} starts with r={b.shape[0]}"
    )


def to_matrices(a: Array, b: Array, *, where: str = "") -> tuple[Array, Array]:
  """Matrix view of einsum-shaped factors: a (*in, r) -> (prod(in), r); b (r, *out) -> (r, prod(out))."""
  _check_matrix_view(a, b, where)
  return a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)


def from_matrices(a2: Array, b2: Array, in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> tuple[Array, Array]:
  """Inverse of ``to_matrices`` for a (possibly new) rank."""
  rank = a2.shape[-1]
  return a2.reshape(*in_dims, rank), b2.reshape(rank, *out_dims)


def lora_pairs(tree: Any, prefix: str = "") -> dict[str, Mapping]:
  """{module path: pair} for every LoRA pair in a nested-mapping pytree; paths join keys with '/'."""
  found = {}
  if is_lora_pair(tree):
    found[prefix] = tree
  elif isinstance(tree, Mapping):
    for k, v in tree.items():
      found.update(lora_pairs(v, f"{prefix}/{k}" if prefix else str(k)))
  return found


def replace_pairs(tree: Any, replacements: Mapping[str, Mapping]) -> Any:
  """``tree`` with the LoRA pair at each path of ``replacements`` (paths as ``lora_pairs`` names them)
  replaced by the given pair; the mappings along the way become plain dicts, other pairs and leaves are kept
  as they are."""

  def visit(node, prefix):
    if is_lora_pair(node):
      return replacements.get(prefix, node)
    if isinstance(node, Mapping):
      return {k: visit(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
    return node

  return visit(tree, "")


def resolve_ranks(paths, rank: int | Mapping[str, int]) -> dict[str, int | None]:
  """Per-module target ranks. A mapping may use exact paths or fnmatch patterns ('*/attn/*'); the first
  matching key wins; modules it does not match keep their rank (None). A key that matches nothing raises."""
  paths = list(paths)
  if not isinstance(rank, Mapping):
    return {p: rank for p in paths}
  out = {}
  for p in paths:
    out[p] = next((r for pat, r in rank.items() if p == pat or fnmatch.fnmatchcase(p, pat)), None)
  for pat in rank:
    if not any(p == pat or fnmatch.fnmatchcase(p, pat) for p in paths):
      raise ValueError(
          f"squeeze_lora: rank mapping key {pat!r} matches no LoRA module; modules are e.g. " f"{paths[:4]}"
      )
  return out


def squeeze_lora(
    lora_params: Any,
    rank: int | Mapping[str, int],
    *,
    method: str = "efficient",
    key: Array | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    route: str = "auto",
) -> Any:
  """Every LoRA pair in ``lora_params`` at its new rank.

  Args:
    lora_params: nested mappings whose LoRA pairs are {'a': (*in, r), 'b': (r, *out), ...} (the gemma
      library's layout: a has the contracted input dims then r, b has r then the output dims). Other keys
      and leaves pass through unchanged.
    rank: an int for every module, or a mapping from module path (or fnmatch pattern) to rank.
    method, key, oversample, power_iters: as in ``squeeze_factors``; module i (in sorted path order) uses
      ``fold_in(key, i)``.
    route: as in ``squeeze_factors``, for every module ("auto": the host route when all of them can take it).

  Returns:
    The same structure with new a/b (plain dicts), arrays of the input's kind. Jit-compilable with
    ``rank`` static. "efficient" on concrete host arrays (numpy, or jax Arrays on one CPU device) takes
    the host route (``squeeze_factors``'s ``route``): numpy/LAPACK, modules side by side in ``squeeze_host.host_map``'s
    threads, nothing compiled. Otherwise each distinct (shape, rank) compiles once (7 programs for
    Gemma 3) and the calls are per module (see the note in the body).
  """
  check_method(method)
  key = jax.random.key(0) if key is None else key
  pairs = lora_pairs(lora_params)
  paths = sorted(pairs)
  if not paths:
    raise ValueError("squeeze_lora: no LoRA pairs ({'a': ..., 'b': ...}) found in the given tree")
  ranks = resolve_ranks(paths, rank)

  todo = [(i, p) for i, p in enumerate(paths) if ranks[p] is not None]
  for _, p in todo:  # all shape checks before any work (on shapes only: no tracing, no dispatch)
    a, b = pairs[p]["a"], pairs[p]["b"]
    _check_matrix_view(a, b, p)
    _check_factors(
        jax.ShapeDtypeStruct((math.prod(a.shape[:-1]), a.shape[-1]), a.dtype),
        jax.ShapeDtypeStruct((b.shape[0], math.prod(b.shape[1:])), b.dtype),
        ranks[p],
        where=p,
    )

  if all(squeeze_host.use_host(method, route, pairs[p]["a"], pairs[p]["b"]) for _, p in todo):
    new_pairs = squeeze_host.squeeze_pairs(pairs, todo, ranks, key)
  else:
    # One module per compiled call (compiled once per (shape, rank): 7 programs for Gemma 3; see
    # _squeeze_xla for why same-shape modules are not batched into one program).
    new_pairs = {}
    for i, p in todo:
      a, b = pairs[p]["a"], pairs[p]["b"]
      new_a, new_b, _, finite = _squeeze_xla(
          a,
          b,
          jax.random.fold_in(key, i),
          rank=int(ranks[p]),
          method=method,
          oversample=oversample,
          power_iters=power_iters,
      )
      _raise_if_not_finite(finite, p, a.shape, b.shape)
      new_pairs[p] = (new_a, new_b)

  return replace_pairs(lora_params, {p: {**pairs[p], "a": a, "b": b} for p, (a, b) in new_pairs.items()})


def lora_spectra(lora_params: Any) -> dict[str, np.ndarray]:
  """{module path: all singular values of its ΔW} for every LoRA pair (efficient route, host numpy)."""
  return {
      p: np.asarray(singular_values(*to_matrices(pair["a"], pair["b"], where=p)))
      for p, pair in sorted(lora_pairs(lora_params).items())
  }


# --------------------------------------------------------------------------------------------------------
# Appendix E: coarse FLOP counts.
# --------------------------------------------------------------------------------------------------------


def paper_flops(m: int, n: int, r_src: int, r_tgt: int, oversample: int = 10) -> dict[str, int]:
  """Appendix E's coarse FLOP estimates: full SVD m·n·min(m, n); RSVD m·n·(r_tgt + k_o); efficient
  (m + n)·r_src². ``form_delta_w`` (m·n·r_src) is the extra cost of forming ΔW for the first two."""
  return {
      "svd": m * n * min(m, n),
      "rsvd": m * n * (r_tgt + oversample),
      "efficient": (m + n) * r_src * r_src,
      "form_delta_w": m * n * r_src,
  }
