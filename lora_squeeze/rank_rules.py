"""Rank-selection rules on a LoRA module's spectrum (the singular values of its ΔW).

* ``retention`` (V_r, Appendix F, Eq. 10): the fraction of ΔW's energy a rank keeps;
* ``choose_rank`` / ``choose_homogeneous_rank``: the smallest rank that keeps a given energy, for one
  module or one rank for many (the paper's "homogenising");
* ``rank_sv_ratio`` / ``rank_sv_fro`` / ``rank_sv_cumulative``: kohya sd-scripts' dynamic rules
  (``networks/resize_lora.py``), as the ``lora-squeeze`` command offers them.

Spectra come from ``squeeze.singular_values`` / ``squeeze.lora_spectra`` or a squeeze's
``singular_values``. Host-side numpy (``retention`` also takes JAX arrays); nothing here runs a
decomposition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def retention(singular_values, rank: int):
  """V_r = Σ_{i≤rank} s_i² / Σ_i s_i² (Appendix F, Eq. 10): the fraction of ΔW's energy a rank keeps.

  Works on numpy or JAX arrays, also batched over leading axes. An all-zero spectrum retains 1.0.
  """
  xp = jnp if isinstance(singular_values, jax.Array) else np
  s2 = xp.asarray(singular_values, dtype=xp.float32) ** 2
  total = s2.sum(-1)
  kept = s2[..., :rank].sum(-1)
  return xp.where(total > 0, kept / xp.where(total > 0, total, 1.0), 1.0)


def choose_rank(singular_values, energy: float) -> int:
  """The smallest rank r with retention V_r >= ``energy`` (0 < energy <= 1). Host-side (numpy)."""
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"choose_rank: energy must be in (0, 1], got {energy}")
  s2 = np.sort(np.asarray(singular_values, np.float64) ** 2)[::-1]
  total = s2.sum()
  if total == 0.0:
    return 1
  cumulative = np.cumsum(s2) / total
  # Tolerate float rounding at energy = 1.0.
  return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(s2)))


def choose_homogeneous_rank(spectra: Mapping[str, Any], energy: float) -> int:
  """One rank for many modules: the largest of the per-module ``choose_rank`` choices (Sec. "homogenising")."""
  if not spectra:
    raise ValueError("choose_homogeneous_rank: no modules given")
  return max(choose_rank(s, energy) for s in spectra.values())


def _descending(singular_values) -> np.ndarray:
  return np.sort(np.asarray(singular_values, np.float64))[::-1]


def rank_sv_ratio(singular_values, ratio: float) -> int:
  """kohya's ``sv_ratio``: the number of singular values with s_i > s_max / ``ratio`` (at least 1).

  As in sd-scripts' networks/resize_lora.py (``index_sv_ratio``): strictly greater, so ratio 1 keeps only
  the largest value(s) above s_max, i.e. rank 1. An all-zero spectrum gives 1.
  """
  if not ratio >= 1.0:
    raise ValueError(f"rank_sv_ratio: ratio must be >= 1, got {ratio}")
  s = _descending(singular_values)
  if s.size == 0 or s[0] <= 0.0:
    return 1
  return int(max(1, min(int(np.sum(s > s[0] / ratio)), len(s))))


def rank_sv_fro(singular_values, fraction: float) -> int:
  """kohya's ``sv_fro``: the smallest r with sqrt(Σ_{i≤r} s_i² / Σ_i s_i²) >= ``fraction`` (0 < F <= 1).

  resize_lora.py's ``index_sv_fro`` searches the cumulative squared sums for F² (searchsorted, left), which
  is this rule; it is ``choose_rank`` at energy F² (up to its 1e-12 rounding allowance at 1.0).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"rank_sv_fro: fraction must be in (0, 1], got {fraction}")
  s2 = _descending(singular_values) ** 2
  total = s2.sum()
  if total == 0.0:
    return 1
  return int(min(np.searchsorted(np.cumsum(s2) / total, fraction**2) + 1, len(s2)))


def rank_sv_cumulative(singular_values, fraction: float) -> int:
  """kohya's ``sv_cumulative``: the smallest r with Σ_{i≤r} s_i / Σ_i s_i >= ``fraction`` (0 < C <= 1).

  resize_lora.py's ``index_sv_cumulative``: searchsorted (left) on the cumulative sums of the values
  themselves, not their squares.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"rank_sv_cumulative: fraction must be in (0, 1], got {fraction}")
  s = _descending(singular_values)
  total = s.sum()
  if total == 0.0:
    return 1
  return int(min(np.searchsorted(np.cumsum(s) / total, fraction) + 1, len(s)))
