"""Table 3: direct training's task-averaged accuracy, mean ± standard error of the mean (SEM) over seeds
(paper: 42, 43, 44), per (rank, learning rate); also every squeeze method run over several seeds (Post-Squeeze
and In-Squeeze labelled with their r_src → r_tgt). Paired differences per seed: experiments/claims.py.

  python experiments/table3_seeds.py --results runs/lr_grid_seeds --out experiments/results/paper
writes table3_seeds.{md,png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def _method(row) -> str:
  """The method with its source rank (``post_squeeze 32→1``) and a non-default squeeze method."""
  out = row.method
  if row.source_rank and row.source_rank != row.rank:
    out += f" {row.source_rank}→{row.rank}"
  if row.squeeze_method and row.squeeze_method != "efficient":
    out += f" ({row.squeeze_method})"
  return out


def per_seed(rows, value=lambda r: r.accuracy):
  """{(method, rank, lr, steps, tasks): {seed: task-averaged value}}: per configuration, the tasks that two or
  more seeds ran, averaged for every seed that ran all of them (a seed sweep on one task next to a main sweep
  on three compares that one task)."""
  out = {}
  for key, rs in R.group(
      [r for r in rows if value(r) is not None], lambda r: (_method(r), r.rank, r.learning_rate, r.steps)
  ).items():
    seeds_of = R.group(rs, lambda r: r.task)
    tasks = tuple(sorted(t for t, trs in seeds_of.items() if len({r.seed for r in trs}) >= 2))
    if not tasks:
      continue
    for seed, srs in R.group(rs, lambda r: r.seed).items():
      by_task = {r.task: value(r) for r in srs}
      if all(t in by_task for t in tasks):
        out.setdefault(key + (tasks,), {})[seed] = R.mean_over_tasks(by_task, tasks)
  return {k: v for k, v in out.items() if len(v) >= 2}


def main(argv=None):
  args, rows = results_render.script_args(__doc__, argv)
  data = per_seed(rows)
  if not data:
    raise SystemExit("table3: no configuration was run with two or more seeds")
  keys = sorted(data, key=lambda k: (k[0] != "direct", k[0], k[1], k[2] or 0, k[3]))
  nll = per_seed(rows, lambda r: r.gold_nll)
  table = []
  for k in keys:
    vals = list(data[k].values())
    nv = [nll[k][s] for s in sorted(data[k]) if s in nll.get(k, {})]
    table.append(
        [
            k[0],
            str(k[1]),
            "—" if k[2] is None else f"{k[2]:g}",
            str(k[3]),
            ", ".join(k[4]),
            " ".join(str(s) for s in sorted(data[k])),
            f"{100 * R.mean(vals):.2f} ± {100 * R.sem(vals):.2f}",
            f"{R.mean(nv):.4f} ± {R.sem(nv):.4f}" if len(nv) == len(vals) else "—",
        ]
    )
  title = f"{args.title} mean ± SEM over seeds (task-averaged)".strip()
  md = [
      f"# Table 3: {title}\n\n",
      results_render.markdown_table(
          ["method", "rank", "lr", "steps", "tasks", "seeds", "accuracy (%)", "held-out NLL (nats/token)"],
          table,
          align="llrrllll",
      ),
      "\n" + results_render.provenance(args.results, rows),
  ]
  plt = results_render.pyplot()
  fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(keys) + 1.5), 3.4))
  means = [100 * R.mean(list(data[k].values())) for k in keys]
  sems = [100 * R.sem(list(data[k].values())) for k in keys]
  ax.errorbar(range(len(keys)), means, yerr=sems, fmt="o", capsize=4)
  for i, k in enumerate(keys):
    ax.scatter([i] * len(data[k]), [100 * v for v in data[k].values()], s=10, color="grey", zorder=3)
  ax.set_xticks(range(len(keys)), [f"{k[0]} r={k[1]}\nlr={k[2]}" for k in keys], fontsize=7)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(results_render.fit_title(ax, title), fontsize=9)
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "table3_seeds.png")
  return results_render.finish(args.out, "table3_seeds", md, png)


if __name__ == "__main__":
  sys.exit(main())
