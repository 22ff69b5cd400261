"""Small reports over a sweep's results store: a markdown table and a heatmap PNG (the quickstart's).

The experiments/ scripts make the paper's figures; this module covers what a sweep prints when it ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_squeeze import fileio


def _accuracy(result: Mapping[str, Any]) -> tuple[float | None, list | None]:
  m = result.get("metrics") or {}
  return m.get("accuracy"), m.get("ci95")


def _nll(result: Mapping[str, Any]) -> dict[str, float | None]:
  m = result.get("metrics") or {}
  return {"gold_nll": m.get("gold_nll"), "gold_nll_sem": m.get("gold_nll_sem")}


def rows_of(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (cell, final rank): method, rank, accuracy, its CI, steps, seconds."""
  rows = []
  for name, rec in records.items():
    if rec.get("status") != "ok":
      rows.append(
          {
              "cell": name,
              "method": "FAILED",
              "rank": None,
              "accuracy": None,
              "ci95": None,
              "steps": None,
              "seconds": rec.get("seconds"),
              "error": rec.get("error"),
          }
      )
      continue
    res = rec["result"]
    if res["mode"] == "post_squeeze":
      for r, t in sorted(res["targets"].items(), key=lambda kv: -int(kv[0])):
        acc, ci = _accuracy(t)
        rows.append(
            {
                "cell": name,
                "method": f"post_squeeze from r={res['source_rank']}",
                "rank": int(r),
                "accuracy": acc,
                "ci95": ci,
                "steps": 0,
                "seconds": rec.get("seconds"),
                "retention": t.get("retention_mean"),
                **_nll(t),
            }
        )
    else:
      acc, ci = _accuracy(res)
      method = (
          res["mode"]
          if res["mode"] != "in_squeeze"
          else "in_squeeze " + "→".join(str(r) for r in res["ranks_per_stage"])
      )
      rows.append(
          {
              "cell": name,
              "method": method,
              "rank": res.get("final_rank"),
              "accuracy": acc,
              "ci95": ci,
              "steps": res.get("steps"),
              "seconds": rec.get("seconds"),
              **_nll(res),
          }
      )
  return rows


def markdown_table(rows) -> str:
  lines = [
      "| cell | method | final rank | steps | accuracy (95% CI) | held-out NLL (nats/token) | seconds |",
      "|---|---|---:|---:|---|---:|---:|",
  ]
  for r in rows:
    nll = (
        ""
        if r.get("gold_nll") is None
        else f"{r['gold_nll']:.4f}" + (f" ± {r['gold_nll_sem']:.4f}" if r.get("gold_nll_sem") is not None else "")
    )
    acc = (
        "—"
        if r["accuracy"] is None
        else (
            f"{100 * r['accuracy']:.1f}%"
            + (f" ({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f})" if r["ci95"] else "")
        )
    )
    if r.get("retention") is not None:
      acc += f", V_r {r['retention']:.3f}"
    if r["method"] == "FAILED":
      acc = f"error: {r.get('error', '')[:80]}"
    secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
    lines.append(
        f"| {r['cell']} | {r['method']} | {r['rank'] if r['rank'] is not None else ''} | "
        f"{r['steps'] if r['steps'] is not None else ''} | {acc} | {nll} | {secs} |"
    )
  return "\n".join(lines) + "\n"


# The heatmap's panels: (row key, scale, label, sign: +1 when larger is better).
_PANELS = (
    ("accuracy", 100.0, "accuracy %\n(± points vs direct at that rank)", 1.0, "{:.1f}"),
    ("gold_nll", 1.0, "held-out NLL, nats/token\n(± improvement over direct at that rank)", -1.0, "{:.3f}"),
)


def method_rank_heatmap(rows, path: Path, title: str) -> None:
  """Accuracy (and, where the records have it, the held-out gold-choice NLL) per (method, final rank) as
  heatmaps, diverging around the direct baseline of each rank (red = better than direct training at that
  rank, as in the paper's Fig. 4)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  panels = [p for p in _PANELS if any(r.get(p[0]) is not None and r["rank"] is not None for r in rows)]
  ok = [r for r in rows if r["accuracy"] is not None and r["rank"] is not None]
  methods = list(dict.fromkeys(r["method"] for r in ok))
  ranks = sorted({r["rank"] for r in ok}, reverse=True)
  fig, axes = plt.subplots(
      1,
      max(len(panels), 1),
      squeeze=False,
      figsize=(max(len(panels), 1) * (1.6 + 1.3 * len(ranks)) + 1.5, 1.2 + 0.55 * len(methods)),
  )
  for ax, (key, scale, label, sign, fmt) in zip(axes[0], panels):
    grid = np.full((len(methods), len(ranks)), np.nan)
    for r in ok:
      if r.get(key) is not None:
        grid[methods.index(r["method"]), ranks.index(r["rank"])] = scale * r[key]
    base = {rank: grid[methods.index("direct"), j] if "direct" in methods else np.nan for j, rank in enumerate(ranks)}
    delta = sign * (grid - np.array([base[r] for r in ranks])[None, :]) + 0.0  # no "-0.000"
    span = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() else 1.0
    # Accuracy: at least ±1 point, so equal accuracies do not blow tiny differences up.
    span = max(span, 1.0 if key == "accuracy" else 1e-3)
    im = ax.imshow(np.nan_to_num(delta), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
    for i in range(len(methods)):
      for j in range(len(ranks)):
        if np.isfinite(grid[i, j]):
          text = fmt.format(grid[i, j]) + (
              f"\n({delta[i, j]:+{fmt[2:-1]}})" if np.isfinite(delta[i, j]) else "\n(no direct)"
          )
          ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks])
    ax.set_yticks(range(len(methods)), methods if ax is axes[0][0] else [""] * len(methods))
    ax.set_title(label, fontsize=8)
    fig.colorbar(im, ax=ax)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=120)
  finally:
    plt.close(fig)


def write_report(report: Mapping[str, Any], sweep_dir: str | Path, records) -> None:
  """Print the table and write ``NAME.md`` and ``NAME.png`` into the sweep directory."""
  sweep_dir = Path(sweep_dir)
  name = report.get("name", "report")
  rows = rows_of(records)
  table = markdown_table(rows)
  title = report.get("title", name)
  fileio.atomic_write_text(sweep_dir / f"{name}.md", f"# {title}\n\n{table}")
  png = sweep_dir / f"{name}.png"
  method_rank_heatmap(rows, png, title)
  print(table)
  print(f"[lora_squeeze] {name}: {sweep_dir / f'{name}.md'} and {png}")
