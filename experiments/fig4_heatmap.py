"""Fig. 4 (text, 4B and 1B) / Fig. 9 (VL): the gain of Post-Squeeze r_src → r_tgt over direct training at
r_tgt, for every (r_src, r_tgt), averaged over tasks (red = Post-Squeeze better).

Direct baselines use each rank's best learning rate in the store (the paper tunes every rank; with one rate
per rank in the store that is the one). Post-Squeeze sources are the direct runs at r_src with the best rate
among those the store squeezed from; ``--method`` picks the squeeze (efficient by default; Fig. 5 compares the two).

  python experiments/fig4_heatmap.py --results runs/heatmap --out experiments/results/paper
writes fig4_heatmap.{md,png}.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def gains(rows, *, method="efficient", rule="accuracy"):
  """({(src, tgt): {task: post − direct}}, direct per task per rank, post per task)."""
  post_rows = R.squeezed_from_best(
      rows,
      [r for r in results_render.require(rows, "fig4", method="post_squeeze") if r.squeeze_method == method],
      by=rule,
  )
  # Baselines trained as long as the squeezed sources were (a store may also hold N + M runs, Table 1).
  steps = {r.steps for r in post_rows}
  direct_rows = [r for r in rows if r.method == "direct" and r.steps in steps]
  best = R.best_direct_lr(direct_rows, by=rule)
  direct = R.per_task([r for r in direct_rows if best.get(r.rank) == r.learning_rate], lambda r: r.rank)
  if not post_rows:
    raise SystemExit(f"fig4: no Post-Squeeze results with method={method!r} from best-rate sources")
  post = R.per_task(post_rows, lambda r: (r.source_rank, r.rank))
  out = {}
  for (src, tgt), by_task in post.items():
    out[(src, tgt)] = {t: acc - direct[tgt][t] for t, acc in by_task.items() if t in direct.get(tgt, {})}
  return out, direct, post


def grid(per_cell, srcs, tgts):
  """Task-averaged points (×100) per (src, tgt); nan where no task has both numbers or tgt > src."""
  return [
      [100 * R.mean(list(per_cell[(s, t)].values())) if per_cell.get((s, t)) else math.nan for t in tgts] for s in srcs
  ]


def main(argv=None):
  def extra(p):
    p.add_argument("--method", default="efficient", help="squeeze method of the Post-Squeeze cells")

  args, rows = results_render.script_args(__doc__, argv, extra=extra)
  per_cell, direct, _ = gains(rows, method=args.method, rule=args.rate_rule)
  srcs = sorted({s for s, _ in per_cell}, reverse=True)
  tgts = sorted({t for _, t in per_cell})
  g = grid(per_cell, srcs, tgts)
  tasks = sorted({t for v in per_cell.values() for t in v})
  title = f"{args.title} Post-Squeeze ({args.method}) − direct at r_tgt, mean of {len(tasks)} task(s)".strip()
  png = results_render.heatmap(
      g,
      row_labels=[str(s) for s in srcs],
      col_labels=[str(t) for t in tgts],
      title=title,
      cbar_label="accuracy gain (points)",
      xlabel="target rank r_tgt",
      ylabel="source rank r_src",
      path=Path(args.out) / "fig4_heatmap.png",
  )
  md = [
      f"# Fig. 4: {title}\n\nPoints of accuracy, Post-Squeeze r_src → r_tgt minus direct training at r_tgt "
      f"(positive = Post-Squeeze better). {R.rate_rule_text(args.rate_rule)}\n\n"
  ]
  md.append(
      results_render.markdown_table(
          ["r_src \\ r_tgt"] + [str(t) for t in tgts],
          [[str(s)] + ["—" if math.isnan(v) else f"{v:+.1f}" for v in row] for s, row in zip(srcs, g)],
      )
  )
  md.append("\n## Per task (points)\n\n")
  cells = sorted(per_cell, key=lambda k: (-k[0], -k[1]))
  md.append(
      results_render.markdown_table(
          ["task"] + [f"{s}→{t}" for s, t in cells],
          [
              [task] + [f"{100 * per_cell[c][task]:+.1f}" if task in per_cell[c] else "—" for c in cells]
              for task in tasks
          ],
      )
  )
  md.append("\n## Direct training per rank (accuracy %)\n\n")
  ranks = sorted(direct)
  md.append(
      results_render.markdown_table(
          ["task"] + [f"r={r}" for r in ranks],
          [[task] + [results_render.fmt_pct(direct[r].get(task)) for r in ranks] for task in tasks],
      )
  )
  md.append("\n" + results_render.provenance(args.results, rows))
  return results_render.finish(args.out, "fig4_heatmap", md, png)


if __name__ == "__main__":
  sys.exit(main())
