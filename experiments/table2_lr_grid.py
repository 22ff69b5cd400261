"""Table 2: direct training's task-averaged accuracy (and held-out NLL) for every (rank, learning rate) of the
grid, and the best rate per rank (by default the paper's rule: the rate that maximises the average accuracy
over all tasks, seeds averaged first; ``--rate-rule nll``: the lowest average held-out NLL).

  python experiments/table2_lr_grid.py --results runs/lr_grid --out experiments/results/paper
writes table2_lr_grid.{md,png}.
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def grid(rows, value="accuracy"):
  direct = results_render.require(rows, "table2", method="direct")
  n = collections.Counter(r.steps for r in direct).most_common(1)[0][0]  # the grid's N (not N + M runs)
  direct = [r for r in direct if r.steps == n]
  by = R.per_task(direct, lambda r: (r.rank, r.learning_rate), value)
  tasks = sorted({t for v in by.values() for t in v})
  ranks = sorted({k[0] for k in by})
  lrs = sorted({k[1] for k in by})
  g = {(r, lr): R.mean_over_tasks(by[(r, lr)], tasks) if (r, lr) in by else math.nan for r in ranks for lr in lrs}
  return g, ranks, lrs, tasks, direct


def main(argv=None):
  args, rows = results_render.script_args(__doc__, argv)
  g, ranks, lrs, tasks, direct = grid(rows)
  best = R.best_direct_lr(direct, by=args.rate_rule)
  nll, *_ = grid(rows, "gold_nll")
  table = [
      [str(r)]
      + results_render.bold_best([None if math.isnan(g[(r, lr)]) else g[(r, lr)] for lr in lrs])
      + [f"{best[r]:g}" if r in best else "—"]
      for r in ranks
  ]
  title = f"{args.title} direct training, mean accuracy (%) over {len(tasks)} task(s)".strip()
  md = [
      f"# Table 2: {title}\n\nA rank's average counts only if every task has a result at that rate.\n\n",
      results_render.markdown_table(["rank"] + [f"lr={lr:g}" for lr in lrs] + ["best lr"], table),
      f"\n{R.rate_rule_text(args.rate_rule)}\n\n## Held-out NLL (nats/token, mean over tasks)\n\n",
      results_render.markdown_table(
          ["rank"] + [f"lr={lr:g}" for lr in lrs],
          [
              [str(r)] + ["—" if math.isnan(nll.get((r, lr), math.nan)) else f"{nll[(r, lr)]:.4f}" for lr in lrs]
              for r in ranks
          ],
      ),
      "\n" + results_render.provenance(args.results, rows),
  ]
  plt = results_render.pyplot()
  import numpy as np  # pylint: disable=g-import-not-at-top

  a = np.array([[100 * g[(r, lr)] for lr in lrs] for r in ranks])
  fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(lrs), 1.2 + 0.45 * len(ranks)))
  im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", aspect="auto")
  for i, r in enumerate(ranks):
    for j, lr in enumerate(lrs):
      if np.isfinite(a[i, j]):
        ax.text(
            j, i, f"{a[i, j]:.1f}" + ("*" if best.get(r) == lr else ""), ha="center", va="center", fontsize=8, color="w"
        )
  ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
  ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
  ax.set_xlabel(f"learning rate (* = the rank's best by {'held-out NLL' if args.rate_rule == 'nll' else 'accuracy'})")
  ax.set_ylabel("rank")
  ax.set_title(results_render.fit_title(ax, title), fontsize=9)
  fig.colorbar(im, ax=ax, label="accuracy (%)")
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "table2_lr_grid.png")
  return results_render.finish(args.out, "table2_lr_grid", md, png)


if __name__ == "__main__":
  sys.exit(main())
