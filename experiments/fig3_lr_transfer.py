"""Fig. 3 (text) / Fig. 8 (VL): one learning rate, tuned at r_src, used for direct training at every rank,
against Post-Squeeze from r_src (no training, no tuning at the lower ranks).

Reads a results store with direct runs at every rank with that rate and a Post-Squeeze from r_src
(``configs/paper.py:artefact=fig3``); if the store also holds the per-rank learning-rate grid
(``artefact=lr_grid``) the direct curve with each rank's own best rate is drawn too (the paper's remark).

  python experiments/fig3_lr_transfer.py --results runs/fig3 [runs/lr_grid] --out experiments/results/paper
writes fig3_lr_transfer.{md,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def compute(rows, *, src=None, lr=None, rule="accuracy"):
  """{task: {series: {rank: accuracy}}}, src, lr."""
  post = results_render.require(rows, "fig3", method="post_squeeze")
  src = src or max(r.source_rank for r in post)
  post = [r for r in post if r.source_rank == src]
  if lr is None:  # the rate the Post-Squeeze's source was trained with = the rate tuned at r_src
    lrs = sorted({r.learning_rate for r in post if r.learning_rate is not None})
    if len(lrs) != 1:
      raise SystemExit(f"fig3: Post-Squeeze sources from r={src} used rates {lrs}; pass --lr")
    lr = lrs[0]
  post = [r for r in post if r.learning_rate == lr and r.squeeze_method in (None, "efficient")] or [
      r for r in post if r.learning_rate == lr
  ]
  direct = [r for r in rows if r.method == "direct" and r.steps in {p.steps for p in post}]  # not N + M runs
  same_lr = R.per_task([r for r in direct if r.learning_rate == lr], lambda r: r.rank)
  best = R.best_direct_lr(direct, by=rule)
  tuned = R.per_task([r for r in direct if best.get(r.rank) == r.learning_rate], lambda r: r.rank)
  squeezed = R.per_task(post, lambda r: r.rank)
  squeezed[src] = same_lr.get(src, {})
  tasks = sorted({r.task for r in post})
  out = {}
  for t in tasks:
    series = {
        f"direct, lr={lr:g} (tuned at r={src})": {k: v[t] for k, v in same_lr.items() if t in v},
        f"Post-Squeeze from r={src}": {k: v[t] for k, v in squeezed.items() if t in v},
    }
    if len({r.learning_rate for r in direct}) > 1:
      series["direct, each rank's best lr"] = {k: v[t] for k, v in tuned.items() if t in v}
    out[t] = series
  return out, src, lr


def main(argv=None):
  def extra(p):
    p.add_argument("--src", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)

  args, rows = results_render.script_args(__doc__, argv, extra=extra)
  data, src, lr = compute(rows, src=args.src, lr=args.lr, rule=args.rate_rule)
  plt = results_render.pyplot()
  n = len(data)
  fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
  md = [
      f"# Fig. 3: one learning rate (tuned at r_src={src}) for every rank vs Post-Squeeze\n\n"
      f'Series "direct, each rank\'s best lr" (shown when the store has several rates per rank): '
      f"{R.rate_rule_text(args.rate_rule)}\n"
  ]
  for ax, (task, series) in zip(axes[0], data.items()):
    ranks = sorted({k for s in series.values() for k in s})
    for (label, points), style in zip(series.items(), ("o-", "s-", "^--")):
      ks = sorted(points)
      ax.plot(ks, [100 * points[k] for k in ks], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(results_render.fit_title(ax, f"{args.title} {task}".strip()), fontsize=9)
    ax.grid(alpha=0.3)
    md.append(f"\n## {task}\n")
    md.append(
        results_render.markdown_table(
            ["series"] + [f"r={k}" for k in ranks],
            [[label] + [results_render.fmt_pct(p.get(k)) for k in ranks] for label, p in series.items()],
        )
    )
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  out = Path(args.out)
  png = results_render.save_figure(fig, out / "fig3_lr_transfer.png")
  md.append("\n" + results_render.provenance(args.results, rows))
  return results_render.finish(args.out, "fig3_lr_transfer", md, png)


if __name__ == "__main__":
  sys.exit(main())
