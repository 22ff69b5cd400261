"""Results stores -> flat rows -> the paper's aggregates; the ``experiments/`` figure and table scripts build
on this module.

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

from lora_squeeze import fileio

METHODS = (
    "zero_shot",
    "direct",
    "post_squeeze",
    "cont_squeeze",
    "in_squeeze_standard",
    "in_squeeze_min_steps",
    "in_squeeze_standard_carry",
    "in_squeeze_min_steps_carry",
    "in_squeeze_standard_auto",
    "in_squeeze_min_steps_auto",
)


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
    n: examples compared (summed over tasks).
    accuracy, accuracy_sem: mean difference of per-example correctness (points / 100) and its SEM.
    nll, nll_sem: mean difference of the gold choice's NLL per token (nats; negative = A fits better).
    tasks: the tasks compared.
  """

  n: int
  accuracy: float
  accuracy_sem: float
  nll: float
  nll_sem: float
  tasks: tuple[str, ...]


def paired(a_rows: Iterable[Row], b_rows: Iterable[Row]) -> Paired | None:
  """The paired difference A − B, pooled over the tasks where both have per-example results (seeds: the
  rows of one task are averaged per example first). None when no task has both."""

  def by_task(rows):
    out = defaultdict(list)
    for r in rows:
      if r.per_example and r.per_example.get("gold_nll"):
        out[r.task].append(r.per_example)
    return out

  def avg(pes, key):  # per example, over the rows (seeds) of one task
    n = min(len(p[key]) for p in pes)
    return [mean([float(p[key][i]) for p in pes]) for i in range(n)]

  a, b = by_task(a_rows), by_task(b_rows)
  d_acc, d_nll, tasks = [], [], []
  for task in sorted(set(a) & set(b)):
    aa, bb = avg(a[task], "correct"), avg(b[task], "correct")
    an, bn = avg(a[task], "gold_nll"), avg(b[task], "gold_nll")
    if len(aa) != len(bb):
      raise ValueError(
          f"results.paired: task {task!r} was evaluated on {len(aa)} vs {len(bb)} examples; "
          "a paired comparison needs the same held-out examples (config.eval.limit)"
      )
    d_acc += [x - y for x, y in zip(aa, bb)]
    d_nll += [x - y for x, y in zip(an, bn)]
    tasks.append(task)
  if not tasks:
    return None
  return Paired(
      n=len(d_acc),
      accuracy=mean(d_acc),
      accuracy_sem=sem(d_acc),
      nll=mean(d_nll),
      nll_sem=sem(d_nll),
      tasks=tuple(tasks),
  )


def group(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
  out: dict[Any, list[Row]] = defaultdict(list)
  for r in rows:
    out[key(r)].append(r)
  return dict(out)


def per_task(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, dict[str, float]]:
  """{key: {task: accuracy averaged over the rows (seeds) of that task}} for rows with an accuracy."""
  out: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for r in rows:
    if r.accuracy is not None:
      out[key(r)][r.task].append(r.accuracy)
  return {k: {t: mean(v) for t, v in tasks.items()} for k, tasks in out.items()}


def mean_over_tasks(by_task: Mapping[str, float], tasks: Iterable[str] | None = None) -> float:
  """The paper's unweighted task average; with ``tasks``, nan unless every one of them is present."""
  if tasks is not None:
    tasks = list(tasks)
    if any(t not in by_task for t in tasks):
      return float("nan")
    return mean([by_task[t] for t in tasks])
  return mean(list(by_task.values()))


def best_direct_lr(rows: Iterable[Row]) -> dict[int, float]:
  """{rank: the learning rate of direct training with the best task-averaged accuracy} (Table 2's rule:
  the rate that maximises the average over all tasks; seeds averaged first)."""
  table = per_task([r for r in rows if r.method == "direct"], lambda r: (r.rank, r.learning_rate))
  tasks = sorted({t for v in table.values() for t in v})
  best: dict[int, tuple[float, float]] = {}
  for (rank, lr), by_task in table.items():
    score = mean_over_tasks(by_task, tasks)
    if math.isnan(score):
      continue
    if rank not in best or score > best[rank][0]:
      best[rank] = (score, lr)
  return {rank: lr for rank, (_, lr) in best.items()}


def squeezed_from_best(rows: Sequence[Row], post: Sequence[Row]) -> list[Row]:
  """The Post-Squeeze rows whose source run used, among the rates the store has Post-Squeezes from at that
  r_src, the one whose direct training scores best (the paper squeezes its tuned r_src adapters)."""
  used = {(r.source_rank, r.learning_rate) for r in post}
  candidates = [r for r in rows if r.method == "direct" and (r.rank, r.learning_rate) in used]
  best = best_direct_lr(candidates)
  return [r for r in post if best.get(r.source_rank, r.learning_rate) == r.learning_rate]


# --------------------------------------------------------------------------------------------------------
# Output: markdown and PNG, written atomically.
# --------------------------------------------------------------------------------------------------------


def fmt_pct(value: float | None, digits: int = 1) -> str:
  return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str | None = None) -> str:
  align = align or ("l" + "r" * (len(header) - 1))
  sep = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def bold_best(values: Sequence[float | None], fmt: Callable[[float | None], str] = fmt_pct) -> list[str]:
  """Formatted cells with the largest value(s) in bold (the paper's tables)."""
  finite = [v for v in values if v is not None and not math.isnan(v)]
  top = max(finite) if finite else None
  return [f"**{fmt(v)}**" if top is not None and v is not None and fmt(v) == fmt(top) else fmt(v) for v in values]


def write_text(path: str | os.PathLike, text: str) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(path, text)
  return path


def finish(out: str | os.PathLike, name: str, md: Sequence[str], png: Path) -> int:
  """The experiments scripts' last step: write ``out/NAME.md`` atomically, print it and where both files
  are; returns the exit status 0."""
  text = "".join(md)
  path = write_text(Path(out) / f"{name}.md", text)
  print(text)
  print(f"wrote {path} and {png}")
  return 0


def save_figure(fig, path: str | os.PathLike, dpi: int = 130) -> Path:
  """Save a matplotlib figure atomically (temp file, then rename) and close it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  path = Path(path)
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi)
  finally:
    plt.close(fig)
  return path


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def heatmap_panel(
    fig,
    ax,
    values,
    *,
    row_labels,
    col_labels,
    title: str = "",
    cbar_label: str = "",
    min_span: float = 1.0,
    cell_fmt: str = "{:+.1f}",
    texts=None,
):
  """One diverging heatmap panel centred on 0 on ``ax`` (``RdBu_r``: red = positive, blue = negative, as the
  paper's Fig. 4): each finite cell labelled with ``cell_fmt`` (or ``texts[i][j]``), nan cells grey."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  plt = pyplot()
  grid = np.asarray(values, dtype=float)
  finite = np.isfinite(grid)
  span = max(float(np.nanmax(np.abs(grid))) if finite.any() else 0.0, min_span)
  cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
  im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-span, vmax=span, aspect="auto")
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      text = texts[i][j] if texts is not None else (cell_fmt.format(grid[i, j]) if finite[i, j] else None)
      if text:
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(col_labels)), col_labels)
  ax.set_yticks(range(len(row_labels)), row_labels)
  ax.set_title(title, fontsize=8 if "\n" in title else 9)
  fig.colorbar(im, ax=ax, label=cbar_label)


def heatmap(
    values,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    cbar_label: str,
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    min_span: float = 1.0,
    cell_fmt: str = "{:+.1f}",
) -> Path:
  """A one-panel ``heatmap_panel`` figure written to ``path``."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(1.4 + 0.75 * len(col_labels), 1.2 + 0.55 * len(row_labels)))
  heatmap_panel(
      fig,
      ax,
      values,
      row_labels=row_labels,
      col_labels=col_labels,
      title=title,
      cbar_label=cbar_label,
      min_span=min_span,
      cell_fmt=cell_fmt,
  )
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  fig.tight_layout()
  return save_figure(fig, path)


def provenance(stores: Sequence[str | os.PathLike], rows: Sequence[Row]) -> str:
  """A markdown footer: which stores, models and tasks the artefact was computed from, and failed cells."""
  models = sorted({r.model for r in rows})
  tasks = sorted({r.task for r in rows})
  lines = [
      f"Computed from {len(rows)} evaluated adapters in: " + ", ".join(f"`{s}`" for s in stores) + ".",
      f"Models: {', '.join(models) or '—'}. Tasks: {', '.join(tasks) or '—'}.",
  ]
  for s in stores:
    if (Path(s) / "results").is_dir():
      for cell, err in failed_cells(s).items():
        lines.append(f"- failed cell `{cell}` of `{s}`: {err[:160]}")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# The experiments/ scripts' shared command line.
# --------------------------------------------------------------------------------------------------------


def script_args(doc: str, argv=None, *, extra: Callable | None = None):
  """``--results DIR [DIR ...]`` (sweep directories or run workdirs), ``--out DIR`` (default
  experiments/results/paper), plus the script's own options (``extra(parser)``)."""
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", nargs="+", required=True, help="sweep directories or run workdirs")
  p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "experiments" / "results" / "paper"))
  p.add_argument("--title", default="", help="prefix of the figure titles (e.g. the model and scale)")
  if extra is not None:
    extra(p)
  args = p.parse_args(argv)
  rows = load_rows(args.results)
  if not rows:
    raise SystemExit(f"no finished cells in {args.results}")
  return args, rows


def require(rows: Sequence[Row], what: str, **where) -> list[Row]:
  """The rows matching ``where`` (field=value); a clear error naming the missing cells if there are none."""
  out = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
  if not out:
    have = sorted({(r.method, r.rank) for r in rows})
    raise SystemExit(f"{what}: no results with {where}; the stores hold (method, rank) {have}")
  return out


# --------------------------------------------------------------------------------------------------------
# A sweep's summary report (what ``lora_squeeze.sweep`` writes when a config has a ``report``).
# --------------------------------------------------------------------------------------------------------


def _label(row: Row) -> str:
  return row.method if row.source_rank is None else f"{row.method} from r={row.source_rank}"


def _report_lines(records: Mapping[str, Mapping[str, Any]], store: str) -> list[tuple[str, Row | None, Mapping]]:
  """(cell, row or None for a failed cell, record) for every record of the sweep directory ``store``, rows
  as ``rows_from_result`` gives them (largest rank first)."""
  out = []
  for name, rec in records.items():
    if rec.get("status") != "ok":
      out.append((name, None, rec))
      continue
    rows = rows_from_result(store, name, rec["result"])
    out.extend((name, row, rec) for row in sorted(rows, key=lambda r: -r.rank))
  return out


def _nll_text(row: Row) -> str:
  if row.gold_nll is None:
    return ""
  return f"{row.gold_nll:.4f}" + ("" if row.gold_nll_sem is None else f" ± {row.gold_nll_sem:.4f}")


def _accuracy_text(row: Row) -> str:
  if row.accuracy is None:
    return "—"
  text = f"{100 * row.accuracy:.1f}%"
  if row.ci95:
    text += f" ({100 * row.ci95[0]:.1f}–{100 * row.ci95[1]:.1f})"
  if row.retention is not None:
    text += f", V_r {row.retention:.3f}"
  return text


def sweep_table(records: Mapping[str, Mapping[str, Any]], store: str | os.PathLike = ".") -> str:
  """The sweep's markdown table: one line per evaluated adapter (a failed cell: its error)."""
  lines = []
  for name, row, rec in _report_lines(records, str(store)):
    secs = "" if rec.get("seconds") is None else f"{rec['seconds']:.0f}"
    if row is None:
      lines.append([name, "FAILED", "", "", f"error: {str(rec.get('error', ''))[:80]}", "", secs])
    else:
      lines.append([name, _label(row), row.rank, row.steps, _accuracy_text(row), _nll_text(row), secs])
  header = ["cell", "method", "final rank", "steps", "accuracy (95% CI)", "held-out NLL (nats/token)", "seconds"]
  return markdown_table(header, lines, align="llrrlrr")


# The report heatmap's panels: (Row field, scale, label, sign: +1 when larger is better, value format).
_PANELS = (
    ("accuracy", 100.0, "accuracy %\n(± points vs direct at that rank)", 1.0, "{:.1f}"),
    ("gold_nll", 1.0, "held-out NLL, nats/token\n(± improvement over direct at that rank)", -1.0, "{:.3f}"),
)


def method_rank_heatmap(
    records: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str, store: str | os.PathLike = "."
) -> Path:
  """Accuracy (and, where the records have it, the held-out gold-choice NLL) per (method, final rank),
  coloured by the difference to direct training at that rank (red = better, as the paper's Fig. 4)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = [row for _, row, _ in _report_lines(records, str(store)) if row is not None and row.accuracy is not None]
  panels = [p for p in _PANELS if any(getattr(r, p[0]) is not None for r in rows)] or list(_PANELS[:1])
  # One row of the grid per (task, method); the task is shown only when the records hold several.
  keys = list(dict.fromkeys((r.task, _label(r)) for r in sorted(rows, key=lambda r: r.task)))
  many = len({task for task, _ in keys}) > 1
  methods = [f"{task}: {label}" if many else label for task, label in keys]
  direct = {task: i for i, (task, label) in enumerate(keys) if label == "direct"}
  ranks = sorted({r.rank for r in rows}, reverse=True)
  plt = pyplot()
  fig, axes = plt.subplots(
      1, len(panels), squeeze=False, figsize=(len(panels) * (1.6 + 1.3 * len(ranks)) + 1.5, 1.2 + 0.55 * len(methods))
  )
  for ax, (key, scale, label, sign, fmt) in zip(axes[0], panels):
    grid = np.full((len(keys), len(ranks)), np.nan)
    for r in rows:
      if getattr(r, key) is not None:
        grid[keys.index((r.task, _label(r))), ranks.index(r.rank)] = scale * getattr(r, key)
    none = np.full(len(ranks), np.nan)
    base = np.stack([grid[direct[task]] if task in direct else none for task, _ in keys])
    delta = sign * (grid - base) + 0.0  # + 0.0: no "-0.000"
    texts = [
        [
            None
            if not np.isfinite(grid[i, j])
            else fmt.format(grid[i, j])
            + (f"\n({delta[i, j]:+{fmt[2:-1]}})" if np.isfinite(delta[i, j]) else "\n(no direct)")
            for j in range(len(ranks))
        ]
        for i in range(len(methods))
    ]
    heatmap_panel(
        fig,
        ax,
        np.where(np.isfinite(grid), np.nan_to_num(delta), np.nan),
        row_labels=methods if ax is axes[0][0] else [""] * len(methods),
        col_labels=[f"r={r}" for r in ranks],
        title=label,
        min_span=1.0 if key == "accuracy" else 1e-3,  # accuracy: at least ±1 point, so ties stay pale
        texts=texts,
    )
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return save_figure(fig, path, dpi=120)


def write_report(report: Mapping[str, Any], sweep_dir: str | os.PathLike, records) -> None:
  """Print the sweep's table and write ``NAME.md`` and ``NAME.png`` (``method_rank_heatmap``) into the
  sweep directory."""
  sweep_dir = Path(sweep_dir)
  name = report.get("name", "report")
  title = report.get("title", name)
  table = sweep_table(records, sweep_dir)
  write_text(sweep_dir / f"{name}.md", f"# {title}\n\n{table}")
  png = method_rank_heatmap(records, sweep_dir / f"{name}.png", title, sweep_dir)
  print(table)
  print(f"[lora_squeeze] {name}: {sweep_dir / f'{name}.md'} and {png}")
