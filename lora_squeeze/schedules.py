"""In-Squeeze rank ladders and step budgets, and the learning-rate warmup.

The paper (Sec. 4.1, "In-Squeeze Fine-Tuning Setup") anneals the rank 128 → 64 → … → 1 over a fixed total
budget of N + M steps, split among the stages by one of two schemes:

* ``"standard"``: steps ∝ rank (the rank-128 stage gets 128 / (128 + 64 + … + 1) of the total);
* ``"min_steps"``: every stage first gets ``min_steps`` (paper: 200), the rest is split ∝ rank.

Budgets are integers that sum *exactly* to the total: the real-valued shares are rounded down and the
left-over steps go to the stages with the largest remainders (largest-remainder / Hamilton rounding; ties
go to the earlier, higher-rank stage), so no stage is off by more than one step from its exact share.
"""

from __future__ import annotations

from collections.abc import Sequence

SCHEMES = ("standard", "min_steps")


def halving_ladder(source_rank: int, target_rank: int) -> list[int]:
  """[source, source/2, …, target]: the paper's ladder (128 → 64 → … → 1). Both must be powers-of-2 apart."""
  if source_rank < 1 or target_rank < 1:
    raise ValueError(f"halving_ladder: ranks must be >= 1, got {source_rank} -> {target_rank}")
  if target_rank > source_rank:
    raise ValueError(f"halving_ladder: target rank {target_rank} > source rank {source_rank}")
  ranks = [source_rank]
  while ranks[-1] > target_rank:
    if ranks[-1] % 2:
      raise ValueError(f"halving_ladder: {source_rank} -> {target_rank} is not a chain of halvings")
    ranks.append(ranks[-1] // 2)
  if ranks[-1] != target_rank:
    raise ValueError(f"halving_ladder: {source_rank} -> {target_rank} is not a chain of halvings")
  return ranks


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
  wsum = float(sum(weights))
  exact = [total * w / wsum for w in weights]
  floors = [int(x) for x in exact]
  left = total - sum(floors)
  order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
  for i in order[:left]:
    floors[i] += 1
  return floors


def in_squeeze_steps(
    ranks: Sequence[int], total_steps: int, *, scheme: str = "standard", min_steps: int = 200
) -> list[int]:
  """Steps per stage of an In-Squeeze ladder; integers summing exactly to ``total_steps``.

  Args:
    ranks: the rank of each stage, in order (e.g. ``halving_ladder(128, 1)``).
    total_steps: N + M, the whole budget.
    scheme: ``"standard"`` (∝ rank) or ``"min_steps"`` (``min_steps`` each, the rest ∝ rank).
    min_steps: the per-stage minimum of the ``"min_steps"`` scheme (paper: 200).
  """
  ranks = [int(r) for r in ranks]
  if not ranks:
    raise ValueError("in_squeeze_steps: no stages (ranks is empty)")
  if any(r < 1 for r in ranks):
    raise ValueError(f"in_squeeze_steps: ranks must be >= 1, got {ranks}")
  if total_steps < len(ranks):
    raise ValueError(
        f"in_squeeze_steps: total_steps={total_steps} < number of stages {len(ranks)}; every "
        "stage needs at least one step"
    )
  if scheme == "standard":
    steps = _largest_remainder(ranks, total_steps)
  elif scheme == "min_steps":
    if min_steps < 0:
      raise ValueError(f"in_squeeze_steps: min_steps must be >= 0, got {min_steps}")
    if min_steps * len(ranks) > total_steps:
      raise ValueError(
          f"in_squeeze_steps: min_steps={min_steps} x {len(ranks)} stages exceeds " f"total_steps={total_steps}"
      )
    rest = _largest_remainder(ranks, total_steps - min_steps * len(ranks))
    steps = [min_steps + s for s in rest]
  else:
    raise ValueError(f"in_squeeze_steps: unknown scheme {scheme!r}; expected one of {SCHEMES}")
  if any(s < 1 for s in steps):
    # Only possible in the standard scheme with tiny budgets: move single steps from the largest stage.
    for i, s in enumerate(steps):
      while steps[i] < 1:
        j = max(range(len(steps)), key=lambda k: steps[k])
        steps[j] -= 1
        steps[i] += 1
  assert sum(steps) == total_steps, (steps, total_steps)
  return steps


def warmup_constant(step: int, *, peak: float, warmup_steps: int) -> float:
  """Linear warmup from peak/warmup_steps to ``peak`` over ``warmup_steps`` steps, then constant (the paper:
  1000 warmup steps, no decay). ``step`` counts from 0 within the stage; step 0 already trains (lr > 0)."""
  if warmup_steps <= 0:
    return float(peak)
  return float(peak) * min(1.0, (step + 1) / warmup_steps)
