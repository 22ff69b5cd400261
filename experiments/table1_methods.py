"""Table 1 (4B text) / Table 7 (1B text) / Table 8 (4B VL): per task, accuracy of zero-shot, direct training
at r_tgt for N and N + M steps, Post-Squeeze r_src → r_tgt, Cont-Squeeze (+M), In-Squeeze standard and
minimum-steps (N + M in all); best per row in bold, the task average last.

  python experiments/table1_methods.py --results runs/table1 --out experiments/results/paper
writes table1_methods.{md,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def columns(rows, *, tgt=None, src=None, rule="accuracy"):
  """[(column label, {task: accuracy})], tgt, src — the paper's columns, as far as the store holds them."""
  squeezed = [r for r in rows if r.method in ("cont_squeeze", "in_squeeze_standard", "in_squeeze_min_steps")]
  if tgt is None:
    tgt = min(r.rank for r in (squeezed or results_render.require(rows, "table1", method="post_squeeze")))
  if src is None:
    src = max(
        (
            r.source_rank
            for r in squeezed + [r for r in rows if r.method == "post_squeeze" and r.rank == tgt]
            if r.source_rank
        ),
        default=None,
    )
  direct = [r for r in rows if r.method == "direct" and r.rank == tgt]
  if not direct:
    raise SystemExit(f"table1: no direct training at r_tgt={tgt}")
  n = min(r.steps for r in direct)
  # Direct training at its tuned rate (the best task average at N steps; seeds averaged); the N + M runs at
  # the same rate where the store has them.
  lr_t = R.best_direct_lr([r for r in direct if r.steps == n], by=rule).get(tgt)
  direct = [
      r
      for r in direct
      if r.learning_rate == lr_t or not any(o.learning_rate == lr_t for o in direct if o.steps == r.steps)
  ]
  cols = []
  zs = R.per_task([r for r in rows if r.method == "zero_shot"], lambda r: 0)
  if zs:
    cols.append(("0-S", zs[0]))
  by_steps = R.per_task(direct, lambda r: r.steps)
  cols.append((f"direct r={tgt}, N={n}", by_steps[n]))
  extras = sorted(s - n for s in by_steps if s != n)
  for m in extras:
    cols.append((f"direct r={tgt}, N+{m}", by_steps[n + m]))
  post = R.per_task(
      [
          r
          for r in rows
          if r.method == "post_squeeze"
          and r.rank == tgt
          and r.source_rank == src
          and r.squeeze_method in (None, "efficient")
      ],
      lambda r: 0,
  )
  if post:
    cols.append((f"Post-Squeeze {src}→{tgt}", post[0]))
  for method, label in (
      ("cont_squeeze", "Cont-Squeeze"),
      ("in_squeeze_standard", "In-Squeeze std"),
      ("in_squeeze_min_steps", "In-Squeeze min-steps"),
  ):
    by = R.per_task(
        [r for r in rows if r.method == method and r.rank == tgt and r.source_rank == src], lambda r: r.steps
    )
    for steps in sorted(by):
      cols.append((f"{label} +{steps - n}", by[steps]))
  return cols, tgt, src


def main(argv=None):
  def extra(p):
    p.add_argument("--tgt", type=int, default=None)
    p.add_argument("--src", type=int, default=None)

  args, rows = results_render.script_args(__doc__, argv, extra=extra)
  cols, tgt, src = columns(rows, tgt=args.tgt, src=args.src, rule=args.rate_rule)
  tasks = sorted({t for _, v in cols for t in v})
  table = [[t] + results_render.bold_best([v.get(t) for _, v in cols]) for t in tasks]
  complete = [t for t in tasks if all(t in v for _, v in cols)]
  avgs = [R.mean_over_tasks(v, complete) if complete else None for _, v in cols]
  table.append([f"mean ({len(complete)} tasks)"] + results_render.bold_best(avgs))
  title = f"{args.title} accuracy (%) per method, r_src={src}, r_tgt={tgt}".strip()
  md = [
      f"# Table 1: {title}\n\n",
      results_render.markdown_table(["task"] + [c for c, _ in cols], table),
      f"\nDirect training at r_tgt (N and N + M at one rate). {R.rate_rule_text(args.rate_rule)}\n",
      "\n" + results_render.provenance(args.results, rows),
  ]
  plt = results_render.pyplot()
  fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(cols), 3.6))
  ax.bar(range(len(cols)), [100 * (a or 0) for a in avgs], color="#4477aa")
  ax.set_xticks(range(len(cols)), [c for c, _ in cols], rotation=30, ha="right", fontsize=7)
  ax.set_ylabel(f"mean accuracy over {len(complete)} task(s) (%)")
  lo = min([100 * a for a in avgs if a] or [0])
  ax.set_ylim(max(0, lo - 10), None)
  ax.set_title(results_render.fit_title(ax, title), fontsize=9)
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "table1_methods.png")
  return results_render.finish(args.out, "table1_methods", md, png)


if __name__ == "__main__":
  sys.exit(main())
