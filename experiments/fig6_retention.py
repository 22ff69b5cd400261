"""Fig. 6 (averaged over tasks) and Fig. 7 (per task): variance retention V_r(r_src → r_tgt) =
Σ_{i≤r_tgt} s_i² / Σ_{i≤r_src} s_i² of the source adapter's ΔW (mean over the adapted modules), for up to
three source ranks; the table gives V_r when halving the rank (paper: ~96%+ from 128, ~94%+ from 32).

  python experiments/fig6_retention.py --results runs/heatmap --out experiments/results/paper
writes fig6_retention.{md,png} (the averaged curves and one panel per task).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def retention(rows, sources=None, rule="accuracy"):
  """{src: {task: {tgt: V_r}}} (seeds averaged); the three largest source ranks unless ``sources``."""
  post = [r for r in results_render.require(rows, "fig6", method="post_squeeze") if r.retention is not None]
  post = R.squeezed_from_best(rows, post, by=rule)
  srcs = sorted(sources or sorted({r.source_rank for r in post})[-3:], reverse=True)
  out = {}
  for src in srcs:
    by = R.group([r for r in post if r.source_rank == src], lambda r: (r.task, r.rank))
    for (task, tgt), rs in by.items():
      out.setdefault(src, {}).setdefault(task, {})[tgt] = R.mean([r.retention for r in rs])
  return out


def main(argv=None):
  def extra(p):
    p.add_argument("--sources", type=int, nargs="*", default=None)

  args, rows = results_render.script_args(__doc__, argv, extra=extra)
  ret = retention(rows, args.sources, args.rate_rule)
  tasks = sorted({t for v in ret.values() for t in v})
  plt = results_render.pyplot()
  n = len(tasks) + 1
  cols = min(n, 4)
  nrows = -(-n // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
  panels = [("mean over tasks", None)] + [(t, t) for t in tasks]
  for ax, (label, task) in zip(axes.flat, panels):
    for src, by_task in ret.items():
      tgts = sorted({k for v in by_task.values() for k in v})
      if task is None:
        ys = [R.mean([by_task[t][k] for t in by_task if k in by_task[t]]) for k in tgts]
      else:
        tgts = sorted(by_task.get(task, {}))
        ys = [by_task[task][k] for k in tgts]
      ax.plot(tgts, [100 * y for y in ys], "o-", label=f"r_src={src}")
    ax.set_xscale("log", base=2)
    ticks = sorted({k for v in ret.values() for by in v.values() for k in by})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("r_tgt")
    ax.set_ylabel("V_r (%)")
    ax.set_title(results_render.fit_title(ax, f"{args.title} {label}".strip()), fontsize=9)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "fig6_retention.png")
  md = [
      "# Fig. 6/7: variance retention V_r of Post-Squeeze\n\nSources: each r_src's direct run at its tuned rate. "
      f"{R.rate_rule_text(args.rate_rule)}\n\n## V_r when halving the rank (%)\n\n"
  ]
  halves = [(s, s // 2) for s in ret if s >= 2]
  md.append(
      results_render.markdown_table(
          ["task"] + [f"{s}→{h}" for s, h in halves],
          [[t] + [results_render.fmt_pct(ret[s].get(t, {}).get(h)) for s, h in halves] for t in tasks],
      )
  )
  for src, by_task in ret.items():
    tgts = sorted({k for v in by_task.values() for k in v}, reverse=True)
    md.append(f"\n## r_src = {src}: V_r (%) per target rank\n\n")
    md.append(
        results_render.markdown_table(
            ["task"] + [f"r_tgt={k}" for k in tgts],
            [[t] + [results_render.fmt_pct(by_task[t].get(k)) for k in tgts] for t in sorted(by_task)],
        )
    )
  md.append("\n" + results_render.provenance(args.results, rows))
  return results_render.finish(args.out, "fig6_retention", md, png)


if __name__ == "__main__":
  sys.exit(main())
