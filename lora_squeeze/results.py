"""Results stores -> flat rows -> the paper's aggregates; the ``experiments/`` figure and table scripts build
on this module (tables, figures and the sweep report that render them: ``results_render.py``).

A results store is a sweep directory (``lora_squeeze.sweep``: ``DIR/results/NAME.json`` per cell), or a
single run's workdir holding a ``result.json``. ``load_rows`` turns every finished cell into one ``Row`` per
evaluated adapter (a Post-Squeeze cell gives one row per target rank), with the fields the paper's
artefacts group by:

  method         zero_shot | direct | post_squeeze | cont_squeeze | in_squeeze_standard | in_squeeze_min_steps,
                 and ``..._carry`` for an In-Squeeze run that carried its optimizer state across rank changes,
                 ``..._auto`` for one whose modules chose their ranks (``config.auto_rank``)
  rank           the evaluated adapter's rank (Post-Squeeze: r_tgt; In-/Cont-Squeeze: the final rank)
  source_rank    r_src of Post- / Cont- / In-Squeeze (None for direct and zero-shot)
  learning_rate  the first stage's rate (Post-Squeeze: its source run's)
  steps          optimizer steps that produced the adapter (Post-Squeeze: its source run's; Cont-Squeeze:
                 source steps + M; In-Squeeze: N + M)
  squeeze_method efficient | standard | full (Post-/Cont-/In-Squeeze)
  accuracy, ci95 the task metric (``evaluate``), retention = mean V_r over modules (Post-Squeeze)
  gold_nll       the gold choice's held-out NLL per token (choice tasks), per_example: its per-example values
                 and correctness (paired comparisons, ``paired``; experiments/claims.py)

The aggregates follow the paper: per task first, then the unweighted mean over tasks (``mean_over_tasks``
averages only over tasks present in every compared cell, and says how many).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

METHODS = ("zero_shot", "direct", "post_squeeze", "cont_squeeze", "in_squeeze_standard", "in_squeeze_min_steps")
# In-Squeeze variants beyond the paper carry a suffix: ``_carry`` (optimizer state carried), ``_auto`` (ranks
# chosen per module); e.g. in_squeeze_min_steps_carry.


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated adapter (or the base model, for zero-shot)."""

  store: str
  cell: str
  task: str
  model: str
  method: str
  rank: int
  source_rank: int | None
  learning_rate: float | None
  seed: int
  steps: int
  squeeze_method: str | None
  accuracy: float | None
  ci95: tuple[float, float] | None
  n: int | None
  retention: float | None = None
  gold_nll: float | None = None
  gold_nll_sem: float | None = None
  per_example: Mapping[str, Sequence[float]] | None = dataclasses.field(default=None, compare=False, repr=False)


def _int_rank(value) -> int | None:
  if value is None:
    return None
  if isinstance(value, Mapping):  # mixed per-module ranks: report the largest
    return max(int(v) for v in value.values())
  return int(value)


def _metrics(m: Mapping[str, Any] | None) -> tuple[float | None, tuple | None, int | None]:
  m = m or {}
  acc = m.get("accuracy", m.get("average_accuracy"))
  ci = m.get("ci95")
  return (None if acc is None else float(acc)), (tuple(ci) if ci else None), m.get("n")


def _nll(m: Mapping[str, Any] | None) -> dict[str, Any]:
  """The Row fields of a metrics dict's held-out NLL (absent in records made before it existed)."""
  m = m or {}
  return {
      "gold_nll": None if m.get("gold_nll") is None else float(m["gold_nll"]),
      "gold_nll_sem": None if m.get("gold_nll_sem") is None else float(m["gold_nll_sem"]),
      "per_example": m.get("per_example"),
  }


def _records(store: Path) -> list[tuple[str, dict]]:
  """(cell name, result) of every finished cell of a sweep directory or a run's workdir."""
  store = Path(store)
  if (store / "results").is_dir():
    out = []
    for p in sorted((store / "results").glob("*.json")):
      rec = json.loads(p.read_text())
      if rec.get("status") == "ok":
        out.append((rec.get("name", p.stem), rec["result"]))
    return out
  if (store / "result.json").exists():
    return [(store.name, json.loads((store / "result.json").read_text()))]
  raise FileNotFoundError(
      f"results: {store} is neither a sweep directory (no results/*.json) nor a run " f"workdir (no result.json)"
  )


def failed_cells(store: str | os.PathLike) -> dict[str, str]:
  """{cell: error} of a sweep directory's failed cells (the scripts print them: nothing is hidden)."""
  out = {}
  for p in sorted((Path(store) / "results").glob("*.json")):
    rec = json.loads(p.read_text())
    if rec.get("status") != "ok":
      out[rec.get("name", p.stem)] = str(rec.get("error", "?"))
  return out


def _source_result(res: Mapping[str, Any], store: str) -> dict:
  """The source run's result: its workdir's result.json, else its record in the same results store (a
  store copied without the cells' workdirs, like experiments/results/cpu_270m/store)."""
  src = res.get("source_workdir")
  if not src:
    return {}
  if (Path(src) / "result.json").exists():
    return json.loads((Path(src) / "result.json").read_text())
  record = Path(store) / "results" / f"{Path(src).name}.json"
  if record.exists():
    return json.loads(record.read_text()).get("result", {})
  return {}


def rows_from_result(store: str, cell: str, res: Mapping[str, Any]) -> list[Row]:
  """The rows of one run's ``result.json`` dict."""
  mode = res["mode"]
  common = dict(
      store=store, cell=cell, task=str(res.get("task")), model=str(res.get("model")), seed=int(res.get("seed", 0))
  )
  if mode == "post_squeeze":
    source = _source_result(res, store)
    out = []
    for r, t in res["targets"].items():
      acc, ci, n = _metrics(t.get("metrics"))
      out.append(
          Row(
              **common,
              method="post_squeeze",
              rank=int(r),
              source_rank=_int_rank(res["source_rank"]),
              learning_rate=source.get("learning_rate"),
              steps=int(source.get("steps", 0) or 0),
              squeeze_method=res.get("method"),
              accuracy=acc,
              ci95=ci,
              n=n,
              retention=t.get("retention_mean"),
              **_nll(t.get("metrics")),
          )
      )
    return out
  acc, ci, n = _metrics(res.get("metrics"))
  if mode == "zero_shot":
    return [
        Row(
            **common,
            method="zero_shot",
            rank=0,
            source_rank=None,
            learning_rate=None,
            steps=0,
            squeeze_method=None,
            accuracy=acc,
            ci95=ci,
            n=n,
            **_nll(res.get("metrics")),
        )
    ]
  stages = res.get("stages") or []
  lr = res.get("learning_rate", stages[0]["learning_rate"] if stages else None)
  steps = int(res.get("steps", 0) or 0)
  if mode == "direct":
    method, source_rank = "direct", None
  elif mode == "cont_squeeze":
    method, source_rank = "cont_squeeze", _int_rank(res.get("source_rank"))
    if stages and stages[0].get("squeeze_first"):  # trained from a source run: count the source's steps
      source = _source_result(res, store)
      steps += int(source.get("steps", 0) or 0)
      lr = source.get("learning_rate", lr)
  elif mode == "in_squeeze":
    method, source_rank = f"in_squeeze_{res.get('scheme') or 'standard'}", _int_rank(res["ranks_per_stage"][0])
    if res.get("optimizer_state") == "carry":
      method += "_carry"
    if res.get("auto_rank"):
      method += "_auto"
  else:
    raise ValueError(f"results: cell {cell!r} of {store} has an unknown mode {mode!r}")
  return [
      Row(
          **common,
          method=method,
          rank=_int_rank(res["final_rank"]),
          source_rank=source_rank,
          learning_rate=None if lr is None else float(lr),
          steps=steps,
          squeeze_method=res.get("squeeze_method"),
          accuracy=acc,
          ci95=ci,
          n=n,
          **_nll(res.get("metrics")),
      )
  ]


def load_rows(stores: Iterable[str | os.PathLike]) -> list[Row]:
  """Every row of every store (sweep directories or run workdirs); failed cells are skipped (see
  ``failed_cells``), cells without an evaluation keep ``accuracy=None``."""
  rows = []
  for store in stores:
    for cell, res in _records(Path(store)):
      rows.extend(rows_from_result(str(store), cell, res))
  return rows


# --------------------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
  return float(sum(values) / len(values)) if values else float("nan")


def sem(values: Sequence[float]) -> float:
  """Standard error of the mean (sample standard deviation / sqrt(n)); nan below two values."""
  n = len(values)
  if n < 2:
    return float("nan")
  m = mean(values)
  return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


@dataclasses.dataclass(frozen=True)
class Paired:
  """A − B over the examples both were evaluated on (same task, same held-out examples, same order).

  Attributes:
    n: distinct examples compared (summed over tasks).
    accuracy, accuracy_sem: mean difference of per-example correctness (points / 100) and its SEM.
    nll, nll_sem: mean difference of the gold choice's NLL per token (nats; negative = A fits better).
    tasks: the tasks compared.
    seeds: the training seeds compared, each seed of A against the same seed of B (empty when A and B share
      no seed, e.g. a training-free B: then each side's rows are averaged per example).
    per_seed: ((seed, nll, nll_sem, accuracy, accuracy_sem), ...) of each compared seed alone.
    comparisons: how many comparisons ``pooled`` averaged per example (1 for ``paired``).
  """

  n: int
  accuracy: float
  accuracy_sem: float
  nll: float
  nll_sem: float
  tasks: tuple[str, ...]
  seeds: tuple[int, ...] = ()
  per_seed: tuple[tuple[int, float, float, float, float], ...] = ()
  comparisons: int = 1


def paired(a_rows: Iterable[Row], b_rows: Iterable[Row]) -> Paired | None:
  """The paired difference A − B, pooled over the tasks where both have per-example results. None when no
  task has both.

  Seeds: on each task only the seeds that A and B both ran are compared, seed s of A against seed s of B
  (the rows of one seed averaged per example); a task where they share none compares each side's rows
  averaged per example. With one seed the SEM is the examples' SEM. With k > 1 seeds the estimate is the mean
  over seeds and examples, and its SEM adds the spread of the seeds' own mean differences to the examples'
  SEM: sqrt(SEM_examples² + var_seeds / k). A second seed is a second training run, not more examples: its
  difference can move by more than the examples' SEM (seed 42 vs 43 of the CPU campaign).
  """
  return pooled([(a_rows, b_rows)])


def pooled(comparisons: Sequence[tuple[Iterable[Row], Iterable[Row]]]) -> Paired | None:
  """Several paired comparisons A_i − B_i that reuse the same held-out examples (every (r_src, r_tgt) of
  Fig. 4 is evaluated on one task's examples), pooled so that each example counts ONCE: per task, seed and
  example, the mean difference over the comparisons that have it; then as ``paired``. Treating the
  comparisons' examples as separate ones would count 15 correlated uses of one example as 15 independent
  examples and shrink the SEM by up to sqrt(15). ``Paired.comparisons`` says how many were pooled."""
  merged: dict[str, dict[Any, list[tuple[list[float], list[float]]]]] = defaultdict(lambda: defaultdict(list))
  count = 0
  for a_rows, b_rows in comparisons:
    diffs = _differences(a_rows, b_rows)
    count += bool(diffs)
    for task, by_seed in diffs.items():
      for s, d in by_seed.items():
        merged[task][s].append(d)
  d_acc, d_nll, tasks = [], [], []
  seed_acc, seed_nll = defaultdict(list), defaultdict(list)
  for task in sorted(merged):
    task_acc, task_nll = [], []
    for s, ds in sorted(merged[task].items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
      if len({len(acc) for acc, _ in ds}) > 1:
        raise ValueError(
            f"results.pooled: task {task!r} was evaluated on {sorted({len(acc) for acc, _ in ds})} examples by the "
            "pooled comparisons; pooling needs the same held-out examples (config.eval.limit)"
        )
      acc = [mean(col) for col in zip(*(x for x, _ in ds))]  # per example, over the comparisons
      nll = [mean(col) for col in zip(*(y for _, y in ds))]
      task_acc.append(acc)
      task_nll.append(nll)
      if s is not None:
        seed_acc[s] += acc
        seed_nll[s] += nll
    if len({len(x) for x in task_nll}) > 1:
      raise ValueError(
          f"results.paired: task {task!r}'s seeds {sorted(k for k in merged[task] if k is not None)} were "
          f"evaluated on {[len(x) for x in task_nll]} examples; a paired comparison needs the same held-out "
          "examples (config.eval.limit)"
      )
    d_acc += [mean(col) for col in zip(*task_acc)]  # per example, the mean over the compared seeds
    d_nll += [mean(col) for col in zip(*task_nll)]
    tasks.append(task)
  if not tasks:
    return None
  seeds = tuple(sorted(seed_nll))
  per_seed = tuple((s, mean(seed_nll[s]), sem(seed_nll[s]), mean(seed_acc[s]), sem(seed_acc[s])) for s in seeds)

  def total_sem(examples_sem, seed_means):
    if len(seed_means) < 2:
      return examples_sem
    spread = sem(seed_means)  # sqrt(var_seeds / k)
    return math.sqrt(examples_sem**2 + spread**2)

  return Paired(
      n=len(d_acc),
      accuracy=mean(d_acc),
      accuracy_sem=total_sem(sem(d_acc), [p[3] for p in per_seed]),
      nll=mean(d_nll),
      nll_sem=total_sem(sem(d_nll), [p[1] for p in per_seed]),
      tasks=tuple(tasks),
      seeds=seeds,
      per_seed=per_seed,
      comparisons=count,
  )


def _differences(a_rows: Iterable[Row], b_rows: Iterable[Row]) -> dict[str, dict[Any, tuple[list, list]]]:
  """{task: {seed (None: no shared seed): (per-example Δ correctness, per-example Δ gold NLL)}} of A − B
  (``paired``'s seed rule)."""

  def by_task_seed(rows):
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
      if r.per_example and r.per_example.get("gold_nll"):
        out[r.task][r.seed].append(r.per_example)
    return out

  def avg(pes, key):  # per example, over rows
    n = min(len(p[key]) for p in pes)
    return [mean([float(p[key][i]) for p in pes]) for i in range(n)]

  a, b = by_task_seed(a_rows), by_task_seed(b_rows)
  out = {}
  for task in sorted(set(a) & set(b)):
    common = sorted(set(a[task]) & set(b[task]))
    if common:
      sides = [(a[task][s], b[task][s], s) for s in common]
    else:
      sides = [([p for v in a[task].values() for p in v], [p for v in b[task].values() for p in v], None)]
    out[task] = {}
    for pa, pb, s in sides:
      aa, bb, an, bn = avg(pa, "correct"), avg(pb, "correct"), avg(pa, "gold_nll"), avg(pb, "gold_nll")
      if len(aa) != len(bb):
        raise ValueError(
            f"results.paired: task {task!r} was evaluated on {len(aa)} vs {len(bb)} examples; "
            "a paired comparison needs the same held-out examples (config.eval.limit)"
        )
      out[task][s] = ([x - y for x, y in zip(aa, bb)], [x - y for x, y in zip(an, bn)])
  return out


def group(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
  out: dict[Any, list[Row]] = defaultdict(list)
  for r in rows:
    out[key(r)].append(r)
  return dict(out)


def per_task(rows: Iterable[Row], key: Callable[[Row], Any], value: str = "accuracy") -> dict[Any, dict[str, float]]:
  """{key: {task: the rows' ``value`` (a Row field: accuracy, gold_nll) averaged over the seeds of that task}}
  for rows that have it. Rows of one seed are averaged first, so a seed with two records of the same
  adapter (a Post-Squeeze to r in two sweeps' cells) does not count twice."""
  out: dict[Any, dict[str, dict[Any, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
  for r in rows:
    v = getattr(r, value)
    if v is not None:
      out[key(r)][r.task][r.seed].append(v)
  return {k: {t: mean([mean(v) for v in seeds.values()]) for t, seeds in tasks.items()} for k, tasks in out.items()}


def mean_over_tasks(by_task: Mapping[str, float], tasks: Iterable[str] | None = None) -> float:
  """The paper's unweighted task average; with ``tasks``, nan unless every one of them is present."""
  if tasks is not None:
    tasks = list(tasks)
    if any(t not in by_task for t in tasks):
      return float("nan")
    return mean([by_task[t] for t in tasks])
  return mean(list(by_task.values()))


# How a rank's own learning rate is chosen from direct runs: "accuracy", the paper's Table 2 rule (the highest
# task-averaged accuracy), or "nll", the lowest task-averaged held-out NLL (what the CPU campaign uses: at a
# few hundred examples the NLL separates rates that accuracy cannot, experiments/rank_pilot.py).
RATE_RULES = ("accuracy", "nll")


def best_direct_lr(rows: Iterable[Row], by: str = "accuracy") -> dict[int, float]:
  """{rank: the learning rate of direct training that is best by ``by`` (``RATE_RULES``), averaged over all
  tasks (seeds first); a rate missing a task is not a candidate."""
  if by not in RATE_RULES:
    raise ValueError(f"best_direct_lr: by={by!r}, expected one of {', '.join(RATE_RULES)}")
  value, sign = ("accuracy", 1.0) if by == "accuracy" else ("gold_nll", -1.0)
  table = per_task([r for r in rows if r.method == "direct"], lambda r: (r.rank, r.learning_rate), value)
  tasks = sorted({t for v in table.values() for t in v})
  best: dict[int, tuple[float, float]] = {}
  for (rank, lr), by_task in table.items():
    score = sign * mean_over_tasks(by_task, tasks)
    if math.isnan(score):
      continue
    if rank not in best or score > best[rank][0]:
      best[rank] = (score, lr)
  return {rank: lr for rank, (_, lr) in best.items()}


def rate_rule_text(by: str) -> str:
  """One sentence for a report: how each rank's learning rate was chosen."""
  if by == "accuracy":
    return "Each rank's learning rate: the one with the highest task-averaged accuracy (the paper's Table 2 rule)."
  return "Each rank's learning rate: the one with the lowest task-averaged held-out NLL (`--rate-rule nll`)."


def squeezed_from_best(rows: Sequence[Row], post: Sequence[Row], by: str = "accuracy") -> list[Row]:
  """The Post-Squeeze rows whose source run used, among the rates the store has Post-Squeezes from at that
  r_src, the one whose direct training scores best by ``by`` (the paper squeezes its tuned r_src adapters)."""
  used = {(r.source_rank, r.learning_rate) for r in post}
  candidates = [r for r in rows if r.method == "direct" and (r.rank, r.learning_rate) in used]
  best = best_direct_lr(candidates, by=by)
  return [r for r in post if best.get(r.source_rank, r.learning_rate) == r.learning_rate]


# --------------------------------------------------------------------------------------------------------
# Output: markdown and PNG, written atomically.
# --------------------------------------------------------------------------------------------------------
