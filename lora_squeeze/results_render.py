"""Rendering results: markdown tables, figures, the experiments' shared command line and a sweep's report.

``results.py`` turns results stores into rows and aggregates; this module turns those into what people
read: ``markdown_table`` / ``bold_best`` / ``fmt_pct``, figures (``pyplot``, ``heatmap_panel``,
``heatmap``, ``save_figure``, all written atomically), the markdown ``provenance`` footer, the command line
every ``experiments/`` script shares (``script_args``, ``require``, ``finish``), and the summary report a
sweep writes when its config has a ``report`` (``sweep_table``, ``method_rank_heatmap``, ``write_report``).
matplotlib is imported only inside the functions that draw.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_squeeze import fileio
from lora_squeeze import results


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
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (heavy: only to draw)

  path = Path(path)
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi)
  finally:
    plt.close(fig)
  return path


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top  (heavy: only to draw)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (heavy: only to draw)

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
  ax.set_title(fit_title(ax, title), fontsize=8 if "\n" in title else 9)
  fig.colorbar(im, ax=ax, label=cbar_label)


def fit_title(ax, title: str, fontsize: float = 9) -> str:
  """``title`` wrapped at word boundaries to about the width of ``ax`` (a title wider than its panel is cut
  at the figure's edges or runs into the next panel)."""
  inches = ax.get_position().width * ax.figure.get_figwidth() * 1.15  # a title may overhang its axes a little
  width = max(24, int(inches * 72 / (0.55 * fontsize)))  # ~0.55 em per character
  return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


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


def provenance(stores: Sequence[str | os.PathLike], rows: Sequence[results.Row]) -> str:
  """A markdown footer: which stores, models and tasks the artefact was computed from, and failed cells."""
  models = sorted({r.model for r in rows})
  tasks = sorted({r.task for r in rows})
  lines = [
      f"Computed from {len(rows)} evaluated adapters in: " + ", ".join(f"`{s}`" for s in stores) + ".",
      f"Models: {', '.join(models) or '—'}. Tasks: {', '.join(tasks) or '—'}.",
  ]
  for s in stores:
    if (Path(s) / "results").is_dir():
      for cell, err in results.failed_cells(s).items():
        lines.append(f"- failed cell `{cell}` of `{s}`: {err[:160]}")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# The experiments/ scripts' shared command line.
# --------------------------------------------------------------------------------------------------------


def script_args(doc: str, argv=None, *, extra: Callable | None = None):
  """``--results DIR [DIR ...]`` (sweep directories or run workdirs), ``--out DIR`` (default
  experiments/results/paper), ``--title``, ``--rate-rule`` (``results.RATE_RULES``), plus the script's own
  options (``extra(parser)``)."""
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", nargs="+", required=True, help="sweep directories or run workdirs")
  p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "experiments" / "results" / "paper"))
  p.add_argument("--title", default="", help="prefix of the figure titles (e.g. the model and scale)")
  p.add_argument(
      "--rate-rule",
      choices=results.RATE_RULES,
      default="accuracy",
      help="how each rank's learning rate is chosen from the store's direct runs: accuracy (the paper's "
      "Table 2 rule) or nll (lowest held-out NLL, what a campaign tuned with rank_pilot.py used)",
  )
  if extra is not None:
    extra(p)
  args = p.parse_args(argv)
  rows = results.load_rows(args.results)
  if not rows:
    raise SystemExit(f"no finished cells in {args.results}")
  return args, rows


def require(rows: Sequence[results.Row], what: str, **where) -> list[results.Row]:
  """The rows matching ``where`` (field=value); a clear error naming the missing cells if there are none."""
  out = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
  if not out:
    have = sorted({(r.method, r.rank) for r in rows})
    raise SystemExit(f"{what}: no results with {where}; the stores hold (method, rank) {have}")
  return out


# --------------------------------------------------------------------------------------------------------
# A sweep's summary report (what ``lora_squeeze.sweep`` writes when a config has a ``report``).
# --------------------------------------------------------------------------------------------------------


def _label(row: results.Row) -> str:
  return row.method if row.source_rank is None else f"{row.method} from r={row.source_rank}"


def _report_lines(
    records: Mapping[str, Mapping[str, Any]], store: str
) -> list[tuple[str, results.Row | None, Mapping]]:
  """(cell, row or None for a failed cell, record) for every record of the sweep directory ``store``, rows
  as ``results.rows_from_result`` gives them (largest rank first)."""
  out = []
  for name, rec in records.items():
    if rec.get("status") != "ok":
      out.append((name, None, rec))
      continue
    rows = results.rows_from_result(store, name, rec["result"])
    out.extend((name, row, rec) for row in sorted(rows, key=lambda r: -r.rank))
  return out


def _nll_text(row: results.Row) -> str:
  if row.gold_nll is None:
    return ""
  return f"{row.gold_nll:.4f}" + ("" if row.gold_nll_sem is None else f" ± {row.gold_nll_sem:.4f}")


def _accuracy_text(row: results.Row) -> str:
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
