"""The cells of the paper's sweeps, from plain arguments: what ``configs/paper.py`` and ``configs/vl.py`` run.

Pure functions (no files read, nothing imported from the training stack): ``cells(artefacts, ...)`` gives the
list of ``{"name", "overrides"}`` cells that ``sweep.py`` runs, ``sweep_config(...)`` the whole sweep config
(the run settings of the scale plus the cells). A new artefact is one more ``_ARTEFACT_CELLS`` entry here (a
function adding one task's and seed's cells), a test in ``tests/test_paper_sweeps.py``, and a script in
``experiments/`` that reads its results store.

Artefacts (what each runs → which scripts read it):
  lr_grid  direct training at every (task, rank, learning rate of the grid, seed)
           → experiments/table2_lr_grid.py, table3_seeds.py (seeds=42+43+44), fig3_lr_transfer.py
  direct   direct training at every (task, rank) with that rank's own rate (``lr_from`` / ``lrs``), nothing
           else: "does rank matter here?" (experiments/rank_pilot.py)
  fig3     direct training at every rank with ONE rate (``lr``, tuned at r_src), and Post-Squeeze from r_src
           to every lower rank → experiments/fig3_lr_transfer.py (Fig. 3; Fig. 8 with VL tasks)
  heatmap  direct training at every rank with its own rate, and Post-Squeeze from every source rank to every
           target rank ≤ it, with the efficient method (Alg. 2) AND the standard one (Alg. 1, RSVD of ΔW:
           ``rsvd``) → fig4_heatmap.py (Fig. 4/9), fig5_efficient_vs_standard.py (Fig. 5), fig6_retention.py
  table1   per task: zero-shot; direct r_tgt for N and for N + M steps; direct r_src for N; Post-Squeeze
           r_src → r_tgt; Cont-Squeeze (+M) for each M; In-Squeeze standard and minimum-steps over N + M
           → table1_methods.py (Table 1; Table 7 with model=gemma3_1b; Table 8 with VL tasks); with
           optimizer_states=fresh+carry also In-Squeeze with the optimizer state carried across rank
           changes (cells ``..._optcarry``; beyond the paper) → claims.py
  table3   the seed study's cells (Table 3): direct r_tgt and r_src for N, Post-Squeeze r_src → r_tgt, direct
           r_tgt and In-Squeeze minimum-steps for N + M (a subset of table1's cells: run it with seeds=43+44
           next to table1 at seed 42) → table3_seeds.py, claims.py
  auto_rank  In-Squeeze r_src → auto_tgt with per-module ranks (``config.auto_rank.tau`` = tau), uniform
           In-Squeeze r_src → r for every ladder rank r <= auto_tgt, Post-Squeeze r_src → 1..auto_tgt (the
           automatic run's uniform budget r_eq is one of them) → experiments/auto_rank.py

Several artefacts at once run their union: cells are made task by task, seed by seed, artefact by artefact
(in ``ARTEFACTS`` order), and a cell two artefacts share (same name, same overrides) appears once.

Learning rates of "own rate" cells (direct, heatmap, table1): ``lrs`` ({rank: rate}) first, then ``lr_from``
(a finished lr_grid results store: its best task-averaged rate per rank, the paper's rule), then ``lr``. A
rate is named in its cell (``arc_e_s42_direct_r8_lr0.01``). An ``lr_from`` rate is not read here: the cell
holds a reference (``config_lib.best_lr_from(store, rank)``) that ``sweep.py`` resolves when the sweep runs
(an error then if the store has no finished direct run at that rank), and its name says ``lrbest``
(``arc_e_s42_direct_r8_lrbest``): the name does not depend on the store's contents, and the cell's
fingerprint (of the resolved rate) reruns it if the best rate changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from lora_squeeze import config_lib
from lora_squeeze import schedules
from lora_squeeze import squeeze
from lora_squeeze.data import tasks as tasks_lib
from lora_squeeze.workdir import UserError
from lora_squeeze.workdir import did_you_mean

ARTEFACTS = ("lr_grid", "direct", "fig3", "heatmap", "table1", "table3", "auto_rank")
SCALES = ("paper", "runlocal", "tiny")
SCHEMES = schedules.SCHEMES
OPTIMIZER_STATES = ("fresh", "carry")  # train.OPTIMIZER_STATE_MODES (not imported: it pulls in the training stack)

# The paper's text tasks (Table 4) in the registry's names.
TEXT_TASKS = (
    "anli_r2",
    "arc_c",
    "arc_e",
    "boolq",
    "drop",
    "goemotions",
    "hellaswag",
    "mmlu",
    "obqa",
    "paws",
    "piqa",
    "siqa",
    "winogrande",
)
# "10,000 steps on smaller datasets and 15,000 steps on larger datasets" (Sec. 4); the paper does not list
# which are larger: we read it as the training sets of 40k examples or more.
LARGER_TASKS = ("anli_r2", "drop", "goemotions", "hellaswag", "mmlu", "paws")

# The sweep arguments at paper scale (the defaults of configs/paper.py).
PAPER = dict(tasks=TEXT_TASKS, ranks=config_lib.PAPER_RANKS, extra=(200, 700), src=128, lr=0.01)

# CPU scale (``runlocal``): the real Gemma 3 270M on offline tasks whose examples fit length 64 (prompt cut
# from the left; every choice must fit whole: PIQA's solutions run to 228 tokens, so PIQA is not one of them),
# ranks 1…32, short runs. What experiments/results/cpu_270m/ was made with.
CPU = dict(
    tasks=("arc_e", "obqa", "siqa"),
    ranks=(1, 2, 4, 8, 16, 32),
    steps=32,
    extra=(16,),
    batch=4,
    max_len=64,
    max_target_tokens=16,
    eval_limit=100,
    warmup=8,
    change_warmup=4,
    min_steps=4,
    lr=0.1,
)

# ``tiny``: the tiny random model on the synthetic lookup task (the experiments tests: seconds per cell).
TINY = dict(tasks=("synthetic",), ranks=(4, 2, 1), extra=(4,), steps=12)


# ----------------------------------------------------------------------------------------------------------
# Checking the arguments.
# ----------------------------------------------------------------------------------------------------------


def _one_of(key: str, value, valid: Sequence[str], hint: str = "") -> None:
  if value not in valid:
    raise UserError(
        f"{key}={value!r} is not one of {tuple(valid)}{did_you_mean(str(value), valid)}" + (f" {hint}" if hint else "")
    )


def check_artefacts(artefacts: Iterable[str]) -> tuple[str, ...]:
  """The artefacts, checked: at least one, each in ``ARTEFACTS`` (an error names the nearest)."""
  artefacts = tuple(artefacts)
  if not artefacts:
    raise UserError(f"artefact is empty: give one of {ARTEFACTS} (several with '+')")
  for a in artefacts:
    _one_of("artefact", a, ARTEFACTS, "(several with '+': artefact=heatmap+table1 runs their union, shared cells once)")
  return artefacts


def parse_lrs(items: Iterable[Any]) -> dict[int, float]:
  """``("1:0.03", "8:0.01")`` (``lrs=1:0.03+8:0.01``) → {1: 0.03, 8: 0.01}."""
  out = {}
  for item in items:
    rank, _, lr = str(item).partition(":")
    try:
      out[int(rank)] = float(lr)
    except ValueError:
      raise UserError(f"lrs item {item!r} is not RANK:RATE (e.g. lrs=1:0.03+8:0.01)") from None
  return out


def _check(
    *,
    tasks,
    ranks,
    seeds,
    lr,
    lr_grid,
    lrs,
    src,
    tgt,
    sources,
    methods,
    schemes,
    optimizer_states,
    extra,
    steps,
    tau,
    auto_tgt,
) -> None:  # pylint: disable=unused-argument
  def positive_ints(key, values, minimum=1):
    for v in values:
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        raise UserError(f"{key}: {v!r} is not an integer >= {minimum}")

  def rates(key, values):
    for v in values:
      if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise UserError(f"{key}: {v!r} is not a learning rate (a finite number > 0)")

  if not ranks:
    raise UserError("ranks is empty: give the ranks to train (e.g. ranks=1+8+32)")
  if not tasks:
    raise UserError("tasks is empty: give the tasks to run (e.g. tasks=arc_e+siqa)")
  for t in tasks:
    try:
      tasks_lib.get_task(t)
    except ValueError:
      names = tasks_lib.ALL_TASK_NAMES
      raise UserError(f"tasks: {t!r} is not a task{did_you_mean(str(t), names)}; tasks: {', '.join(names)}") from None
  positive_ints("ranks", ranks)
  positive_ints("src", (src,))
  positive_ints("tgt", (tgt,))
  positive_ints("sources", sources)
  positive_ints("seeds", seeds, minimum=0)
  positive_ints("extra", extra)
  rates("lr", (lr,))
  rates("lr_grid", lr_grid)
  rates("lrs", lrs.values())
  positive_ints("lrs", lrs.keys())
  for m in methods:
    _one_of("methods", m, squeeze.METHODS)
  for s in schemes:
    _one_of("schemes", s, SCHEMES)
  positive_ints("auto_tgt", (auto_tgt,))
  if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0 < tau <= 1):
    raise UserError(f"tau: {tau!r} is not an energy share in (0, 1] (auto_rank's threshold V_r >= tau)")
  if not optimizer_states:
    raise UserError(f"optimizer_states is empty: give one or both of {OPTIMIZER_STATES}")
  for s in optimizer_states:
    _one_of("optimizer_states", s, OPTIMIZER_STATES)


# ----------------------------------------------------------------------------------------------------------
# The cells.
# ----------------------------------------------------------------------------------------------------------


def union(*cell_lists: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The cells of every list, in order, each name once; a name given twice with other overrides raises."""
  cells: dict[str, dict[str, Any]] = {}
  for cell_list in cell_lists:
    for cell in cell_list:
      name, overrides = cell["name"], cell["overrides"]
      if name in cells and cells[name]["overrides"] != overrides:
        raise UserError(f"cell {name!r} defined twice with different settings")
      cells[name] = {"name": name, "overrides": overrides}
  return list(cells.values())


class _Task:
  """The cells of one (task, seed): ``add`` keeps them in order, one per name."""

  def __init__(self, task: str, seed: int, n_steps: int, args: Mapping[str, Any]):
    self.tag = f"{task}_s{seed}"
    self.base = {"data.task": task, "seed": seed, "steps": n_steps}
    self.at = {"data.task": task, "seed": seed}
    self.n = n_steps
    self.args = args
    self.cells: list[dict[str, Any]] = []

  def add(self, name: str, **overrides) -> str:
    self.cells.append({"name": name, "overrides": overrides})
    return name

  def lr_of(self, rank: int) -> float | dict:
    """Rank ``rank``'s own rate: ``lrs``, else a reference into the ``lr_from`` store, else ``lr``."""
    if int(rank) in self.args["lrs"]:
      return self.args["lrs"][int(rank)]
    if self.args["lr_from"]:
      return config_lib.best_lr_from(self.args["lr_from"], rank, self.args["lr_rule"])
    return self.args["lr"]

  def direct(self, r: int, lr: float | dict, **extra_base) -> str:
    base = dict(self.base, **extra_base)
    suffix = f"_n{extra_base['steps']}" if "steps" in extra_base else ""
    name = "best" if config_lib.is_best_lr_from(lr) else f"{lr:g}"
    return self.add(
        f"{self.tag}_direct_r{r}_lr{name}{suffix}", mode="direct", **{"lora.rank": r, "learning_rate": lr}, **base
    )


def _lr_grid(t: _Task, a: Mapping[str, Any]) -> None:
  for r in a["ranks"]:
    for lr in a["lr_grid"]:
      t.direct(r, lr)


def _direct(t: _Task, a: Mapping[str, Any]) -> None:
  for r in a["ranks"]:
    t.direct(r, t.lr_of(r))


def _fig3(t: _Task, a: Mapping[str, Any]) -> None:
  lr, src = a["lr"], a["src"]
  for r in a["ranks"]:
    t.direct(r, lr)
  t.add(
      f"{t.tag}_post_from{src}_lr{lr:g}",
      mode="post_squeeze",
      source_workdir="@" + t.direct(src, lr),
      target_ranks=tuple(r for r in a["ranks"] if r < src),
      **t.at,
  )


def _heatmap(t: _Task, a: Mapping[str, Any]) -> None:
  for r in a["ranks"]:
    t.direct(r, t.lr_of(r))
  for s in a["sources"] or a["ranks"]:
    for method in a["methods"]:
      t.add(
          f"{t.tag}_post_from{s}_{method}",
          mode="post_squeeze",
          source_workdir="@" + t.direct(s, t.lr_of(s)),
          target_ranks=tuple(r for r in a["ranks"] if r <= s),
          **{"squeeze.method": method},
          **t.at,
      )


def _ladder_rates(t: _Task, a: Mapping[str, Any]) -> dict[str, float | dict]:
  """In-/Cont-Squeeze's ``lr_by_rank``: each rank of ``ranks`` at its own rate, then any other rank of the
  halving ladder r_src → r_tgt at its ``lrs`` rate, else at ``lr`` (not ``lr_from``: that store was swept over
  ``ranks``), so that no stage falls back to the base config's rate."""
  out = {f"r{r}": t.lr_of(r) for r in a["ranks"]}
  try:
    ladder = schedules.halving_ladder(a["src"], a["tgt"])
  except ValueError:  # not a chain of halvings: the run itself says so
    ladder = []
  for r in ladder:
    out.setdefault(f"r{r}", a["lrs"].get(int(r), a["lr"]))
  return out


def _in_squeeze(
    t: _Task, a: Mapping[str, Any], scheme: str, m: int, lrs: dict, optimizer_state: str, *, tgt: int = 0, tau=0.0
) -> str:
  src, tgt = a["src"], tgt or a["tgt"]
  extra = {} if optimizer_state == "fresh" else {"squeeze.optimizer_state": optimizer_state}
  if tau:
    extra["auto_rank.tau"] = tau
  return t.add(
      f"{t.tag}_in_{scheme}_{src}to{tgt}_m{m}"
      + ("" if optimizer_state == "fresh" else f"_opt{optimizer_state}")
      + (f"_auto{tau:g}" if tau else ""),
      mode="in_squeeze",
      source_rank=src,
      target_rank=tgt,
      scheme=scheme,
      extra_steps=m,
      lr_by_rank=lrs,
      **{"lora.rank": src},
      **extra,
      **t.base,
  )


def _table1(t: _Task, a: Mapping[str, Any]) -> None:
  src, tgt, n = a["src"], a["tgt"], t.n
  t.add(f"{t.tag}_zero_shot", mode="zero_shot", **t.at)
  source = t.direct(src, t.lr_of(src))
  t.direct(tgt, t.lr_of(tgt))
  t.add(f"{t.tag}_post_{src}to{tgt}", mode="post_squeeze", source_workdir=f"@{source}", target_ranks=(tgt,), **t.at)
  lrs = _ladder_rates(t, a)
  for m in a["extra"]:
    t.direct(tgt, t.lr_of(tgt), steps=n + m)
    t.add(
        f"{t.tag}_cont_{src}to{tgt}_m{m}",
        mode="cont_squeeze",
        source_workdir=f"@{source}",
        source_rank=src,
        target_rank=tgt,
        extra_steps=m,
        lr_by_rank=lrs,
        **t.base,
    )
    for optimizer_state in a["optimizer_states"]:
      for scheme in a["schemes"]:
        _in_squeeze(t, a, scheme, m, lrs, optimizer_state)


def _table3(t: _Task, a: Mapping[str, Any]) -> None:
  src, tgt = a["src"], a["tgt"]
  source = t.direct(src, t.lr_of(src))
  t.direct(tgt, t.lr_of(tgt))
  t.add(f"{t.tag}_post_{src}to{tgt}", mode="post_squeeze", source_workdir=f"@{source}", target_ranks=(tgt,), **t.at)
  lrs = _ladder_rates(t, a)
  for m in a["extra"]:
    t.direct(tgt, t.lr_of(tgt), steps=t.n + m)
    _in_squeeze(t, a, "min_steps", m, lrs, "fresh")


def _auto_rank(t: _Task, a: Mapping[str, Any]) -> None:
  """In-Squeeze r_src → auto_tgt with per-module ranks (V_r >= tau), and what it is compared with: uniform
  In-Squeeze r_src → r for every rank r of the halving ladder from auto_tgt down to r_tgt, and Post-Squeeze
  from direct r_src to every rank 1..auto_tgt (the automatic run's uniform budget r_eq, which need not be a
  power of 2, is one of them: on the real 270M at tau 0.9, 32 → 4 ended at r_eq ≈ 3.1)."""
  src, top = a["src"], a["auto_tgt"]
  ladder = [r for r in schedules.halving_ladder(src, a["tgt"]) if r <= top]
  source = t.direct(src, t.lr_of(src))
  t.add(
      f"{t.tag}_post_{src}to1-{top}",
      mode="post_squeeze",
      source_workdir=f"@{source}",
      target_ranks=tuple(range(top, 0, -1)),
      **t.at,
  )
  lrs = _ladder_rates(t, a)
  for m in a["extra"]:
    _in_squeeze(t, a, "standard", m, lrs, "fresh", tgt=top, tau=a["tau"])
    for r in ladder:
      _in_squeeze(t, a, "standard", m, lrs, "fresh", tgt=r)


_ARTEFACT_CELLS = {
    "lr_grid": _lr_grid,
    "direct": _direct,
    "fig3": _fig3,
    "heatmap": _heatmap,
    "table1": _table1,
    "table3": _table3,
    "auto_rank": _auto_rank,
}
assert tuple(_ARTEFACT_CELLS) == ARTEFACTS


def steps_per_task(tasks: Iterable[str], steps: int = 0) -> dict[str, int]:
  """N per task at paper scale: ``steps`` if given, else 10k (15k on the larger training sets)."""
  return {t: (15_000 if t in LARGER_TASKS and not steps else steps or 10_000) for t in tasks}


def cells(
    artefacts: Iterable[str],
    *,
    tasks: Sequence[str],
    ranks: Sequence[int],
    steps: int | Mapping[str, int],
    seeds: Sequence[int] = (42,),
    lr: float = 0.01,
    lr_grid: Sequence[float] = config_lib.LR_GRID,
    lrs: Mapping[int, float] | None = None,
    lr_from: str = "",
    lr_rule: str = "accuracy",
    src: int = 128,
    tgt: int = 1,
    sources: Sequence[int] = (),
    methods: Sequence[str] = ("efficient", "rsvd"),
    schemes: Sequence[str] = SCHEMES,
    optimizer_states: Sequence[str] = ("fresh",),
    extra: Sequence[int] = (200, 700),
    tau: float = 0.9,
    auto_tgt: int = 4,
) -> list[dict[str, Any]]:
  """The cells of ``artefacts`` (their union), task by task, seed by seed.

  Args:
    artefacts: names from ``ARTEFACTS``.
    tasks, ranks, seeds: the grid.
    steps: N, for every task (an int) or per task ({task: N}).
    lr: the one rate of fig3, and of any rank without its own rate.
    lr_grid: the lr_grid artefact's rates.
    lrs: {rank: rate}, the ranks' own rates (heatmap, table1, direct).
    lr_from: an lr_grid results store for the ranks ``lrs`` leaves out (resolved by sweep.py when it runs).
    lr_rule: how ``lr_from``'s best rate is chosen (``results.RATE_RULES``: accuracy, the paper's; nll).
    src, tgt: r_src and r_tgt (fig3: r_src; table1: both).
    sources: the heatmap's source ranks (default: ``ranks``).
    methods: the heatmap's squeeze methods; schemes: table1's In-Squeeze schemes; extra: table1's M values.
    optimizer_states: table1's In-Squeeze optimizer state at a rank change ("fresh": the paper's; "carry":
      the moments squeezed with the adapter, cells named ``..._optcarry``).
    tau, auto_tgt: auto_rank's energy threshold and the end of its ladder (each module's rank is at most
      auto_tgt; a ladder to 1 would end every module at rank 1).
  """
  artefacts = check_artefacts(artefacts)
  tasks, ranks, seeds, extra = tuple(tasks), tuple(ranks), tuple(seeds), tuple(extra)
  lrs = dict(lrs or {})
  a = dict(
      tasks=tasks,
      ranks=ranks,
      seeds=seeds,
      lr=lr,
      lr_grid=tuple(lr_grid),
      lrs=lrs,
      src=src,
      tgt=tgt,
      sources=tuple(int(s) for s in sources),
      methods=tuple(methods),
      schemes=tuple(schemes),
      optimizer_states=tuple(optimizer_states),
      extra=extra,
      steps=steps,
      tau=tau,
      auto_tgt=auto_tgt,
  )
  _check(**a)
  a["lr_from"] = str(lr_from)
  a["lr_rule"] = config_lib.check_rate_rule(lr_rule)
  steps_of = steps if isinstance(steps, Mapping) else {t: steps for t in tasks}
  out = []
  for task in tasks:
    for seed in seeds:
      t = _Task(task, seed, steps_of[task], a)
      for artefact in ARTEFACTS:
        if artefact in artefacts:
          _ARTEFACT_CELLS[artefact](t, a)
      out.append(t.cells)
  return union(*out)


# ----------------------------------------------------------------------------------------------------------
# The sweep config: the scale's run settings and the cells.
# ----------------------------------------------------------------------------------------------------------


def scale_args(scale: str, **args) -> dict[str, Any]:
  """The sweep arguments at ``scale``: an argument left at its paper default (``PAPER``) takes the scale's
  own default (``CPU`` / ``TINY``); an explicit one is kept. ``src`` left at 128 becomes max(ranks)."""
  _one_of("scale", scale, SCALES)
  if scale == "paper":
    return args
  preset = CPU if scale == "runlocal" else TINY
  out = dict(args)
  for key in ("tasks", "ranks", "extra"):
    if tuple(out[key]) == PAPER[key]:
      out[key] = preset[key]
  if scale == "tiny":
    out["tasks"] = TINY["tasks"]
  if out["src"] == PAPER["src"]:
    out["src"] = max(out["ranks"])
  if scale == "runlocal" and out["lr"] == PAPER["lr"]:
    out["lr"] = CPU["lr"]
  return out


def apply_scale(c: ml_collections.ConfigDict, scale: str, *, steps: int = 0) -> None:
  """The run settings of ``scale`` on the sweep's base config (``steps``: N if given)."""
  _one_of("scale", scale, SCALES)
  if scale == "runlocal":
    config_lib.runlocal(c, steps=steps or CPU["steps"])
    c.steps = steps or CPU["steps"]
    c.warmup_steps, c.rank_change_warmup, c.min_steps = CPU["warmup"], CPU["change_warmup"], CPU["min_steps"]
    c.data.update(batch_size=CPU["batch"], max_len=CPU["max_len"], max_target_tokens=CPU["max_target_tokens"])
    c.eval.update(limit=CPU["eval_limit"], batch_size=8)
    c.checkpoint_every = 1000
    c.tensorboard = False
  elif scale == "tiny":
    c.model = "tiny"
    c.steps = steps or TINY["steps"]
    c.warmup_steps, c.rank_change_warmup, c.min_steps = 2, 1, 2
    c.data.update(task="synthetic", source="synthetic", batch_size=4, max_len=16, max_target_tokens=4)
    c.eval.update(enabled=True, limit=32, batch_size=8)
    c.checkpoint_every = 1000
    c.tensorboard = False
    c.progress = False
    c.log_every = 4
  else:
    c.steps = steps or 10_000
    c.data.source = "tfds"


def sweep_config(
    artefacts: Iterable[str],
    *,
    scale: str = "paper",
    model: str = "gemma3_4b",
    checkpoint: str = "",
    steps: int = 0,
    tasks: Sequence[str] = TEXT_TASKS,
    ranks: Sequence[int] = config_lib.PAPER_RANKS,
    lr: float = 0.01,
    src: int = 128,
    extra: Sequence[int] = (200, 700),
    report_prefix: str = "paper",
    **cell_args,
) -> ml_collections.ConfigDict:
  """The config of a sweep over ``artefacts`` at ``scale`` (paper | runlocal | tiny): ``base_config`` with the
  scale's run settings, ``sweep`` = ``cells(...)``, ``report`` = its summary table. ``steps`` = 0: the scale's
  N (paper: 10k, 15k on ``LARGER_TASKS``). Other keyword arguments go to ``cells``."""
  artefacts = check_artefacts(artefacts)
  c = config_lib.base_config()
  c.model = model
  if checkpoint:
    c.model_options.checkpoint = checkpoint
  args = scale_args(scale, tasks=tuple(tasks), ranks=tuple(ranks), extra=tuple(extra), src=src, lr=lr)
  apply_scale(c, scale, steps=steps)
  n = steps_per_task(args["tasks"], steps) if scale == "paper" else c.steps
  c.sweep = cells(artefacts, steps=n, **args, **cell_args)
  name = "+".join(artefacts)
  c.report = {
      "name": f"{report_prefix}_{name.replace('+', '_')}",
      "title": f"{name} on {c.model}: {len(c.sweep)} cells",
  }
  return c
