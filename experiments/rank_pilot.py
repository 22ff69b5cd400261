"""Does rank matter at CPU scale? The rate choice and the pilot report of experiments/cpu_campaign.sh.

  python experiments/rank_pilot.py rates  --results experiments/results/cpu_campaign/rates --task siqa [--lrs-only]
  python experiments/rank_pilot.py report --results experiments/results/cpu_campaign/pilot --out experiments/results/cpu_campaign

``rates``: per rank, each learning rate's held-out NLL per token and accuracy on one task (the short rate-search
runs); the rank's rate is the one with the LOWEST held-out NLL (accuracy ties on a few hundred examples; the
NLL separates rates at a smaller n). ``--lrs-only`` prints ``1:RATE+32:RATE`` for configs/paper.py's ``lrs``.

``report``: per task, direct training at the highest rank against the lowest, each at its own rate, paired on
the same held-out examples (``results.paired``): the mean per-example difference of the gold choice's NLL
per token and of correctness, each with its SEM over the examples. |Δ| > 2 SEM is a detectable difference;
otherwise the smallest effect this n could have shown is about 2 SEM. The training curves (loss per step,
from the cells' metrics.jsonl copied to ``STORE/curves/``) go to rank_pilot_curves.png, to check that the
runs trained until the loss flattened. Writes rank_pilot.md and the PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def _direct(rows):
  return [r for r in rows if r.method == "direct" and r.gold_nll is not None]


def rate_table(rows, task: str):
  """{rank: [(lr, nll, accuracy, n, steps)]} of one task's direct runs."""
  out = defaultdict(list)
  for r in _direct(rows):
    if r.task == task:
      out[r.rank].append((r.learning_rate, r.gold_nll, r.accuracy, r.n, r.steps))
  return {k: sorted(v) for k, v in sorted(out.items())}


def _rates(args, rows) -> int:
  table = rate_table(rows, args.task)
  if not table:
    raise SystemExit(f"rank_pilot: no direct runs of task {args.task!r} in {args.results}")
  best = dict(sorted(R.best_direct_lr([r for r in _direct(rows) if r.task == args.task], by="nll").items()))
  if args.lrs_only:
    print("+".join(f"{rank}:{lr:g}" for rank, lr in best.items()))
    return 0
  lines = [f"# Rate search: {args.task}, direct training, held-out NLL per token (lower is better)\n\n"]
  body = [
      [
          str(rank),
          f"{lr:g}",
          f"{nll:.4f}",
          results_render.fmt_pct(acc),
          str(n),
          str(steps),
          "**best**" if lr == best[rank] else "",
      ]
      for rank, entries in table.items()
      for lr, nll, acc, n, steps in entries
  ]
  lines.append(results_render.markdown_table(["rank", "rate", "held-out NLL", "accuracy %", "n", "steps", ""], body))
  lines.append(f"\nChosen (lowest NLL): {', '.join(f'r={k}: {v:g}' for k, v in best.items())}.\n")
  text = "".join(lines)
  if args.out:
    results_render.write_text(Path(args.out) / "rank_pilot_rates.md", text)
  print(text)
  return 0


def _curve(store: Path, cell: str) -> list[dict]:
  """A cell's metrics rows (its training curve, copied to ``STORE/curves/CELL.jsonl``); [] without one."""
  f = store / "curves" / f"{cell}.jsonl"
  return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def _curves(store: Path, cells: dict[str, list[str]], path: Path) -> Path | None:
  """One panel per task: training loss per step (raw and a 10-step moving mean) of each rank's run."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  plt = results_render.pyplot()
  tasks = sorted(cells)
  if not tasks:
    return None
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for cell in cells[task]:
      recs = _curve(store, cell)
      if not recs:
        continue
      steps = np.array([x["step"] for x in recs])
      loss = np.array([x["loss"] for x in recs])
      k = min(10, len(loss))
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      label = f"r={recs[0]['rank']}"
      (line,) = ax.plot(steps, loss, alpha=0.25, lw=0.8)
      ax.plot(steps[k - 1 :], smooth, color=line.get_color(), lw=1.6, label=label)
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("train loss (answer tokens)")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  return results_render.save_figure(fig, path)


def _final_train_loss(store: Path, cell: str, last: int = 20) -> float | None:
  """Mean training loss over a cell's last ``last`` steps (its curve in ``STORE/curves``), None without one."""
  losses = [x["loss"] for x in _curve(store, cell)][-last:]
  return sum(losses) / len(losses) if losses else None


def _fmt_loss(value: float | None) -> str:
  return "—" if value is None else f"{value:.3f}"


def _report(args, rows) -> int:
  store = Path(args.results[0])
  direct = [r for r in _direct(rows) if r.steps == args.steps]
  by_task = defaultdict(lambda: defaultdict(list))
  for r in direct:
    by_task[r.task][r.rank].append(r)
  out = Path(args.out)
  body, cells, sentences = [], defaultdict(list), []
  for task in sorted(by_task):
    ranks = sorted(by_task[task])
    if len(ranks) < 2:
      continue
    lo, hi = ranks[0], ranks[-1]
    a, b = by_task[task][hi], by_task[task][lo]
    cells[task] += [r.cell for r in b + a]
    p = R.paired(a, b)
    if p is None:
      continue
    z_nll = p.nll / p.nll_sem if p.nll_sem else math.inf
    z_acc = p.accuracy / p.accuracy_sem if p.accuracy_sem else math.inf
    train_lo, train_hi = _final_train_loss(store, b[0].cell), _final_train_loss(store, a[0].cell)
    body.append(
        [
            task,
            str(p.n),
            f"{b[0].learning_rate:g} / {a[0].learning_rate:g}",
            f"{_fmt_loss(train_lo)} / {_fmt_loss(train_hi)}",
            f"{b[0].gold_nll:.4f} / {a[0].gold_nll:.4f}",
            f"{p.nll:+.4f} ± {p.nll_sem:.4f}",
            f"{z_nll:+.1f}",
            f"{results_render.fmt_pct(b[0].accuracy)} / {results_render.fmt_pct(a[0].accuracy)}",
            f"{100 * p.accuracy:+.1f} ± {100 * p.accuracy_sem:.1f}",
            f"{z_acc:+.1f}",
        ]
    )
    if abs(z_nll) > 2:
      what = "lower (better)" if p.nll < 0 else "higher (worse)"
      overfit = (
          f" r={hi} fits its training data better (train loss {train_hi:.3f} vs {train_lo:.3f}) but generalises "
          "worse: it overfits the training part."
          if p.nll > 0 and train_hi is not None and train_lo is not None and train_hi < train_lo
          else ""
      )
      sentences.append(
          f"- **{task}**: rank matters: r={hi} reaches a {what} held-out NLL than r={lo} by "
          f"{abs(p.nll):.4f} nats/token ({abs(z_nll):.1f} SEM, n={p.n}); accuracy "
          f"{100 * p.accuracy:+.1f} ± {100 * p.accuracy_sem:.1f} points.{overfit}"
      )
    else:
      sentences.append(
          f"- **{task}**: no detectable rank effect: Δ NLL {p.nll:+.4f} ± {p.nll_sem:.4f} "
          f"(n={p.n}); an effect of about {2 * p.nll_sem:.4f} nats/token or "
          f"{200 * p.accuracy_sem:.1f} accuracy points would have shown."
      )
  if not body:
    raise SystemExit(f"rank_pilot: no task with two ranks of direct runs at {args.steps} steps in {args.results}")
  png = _curves(store, cells, out / "rank_pilot_curves.png")
  md = [
      f"# Does rank matter? Direct training at the highest vs the lowest rank, each at its own rate ({args.steps} "
      "steps, whole offline held-out half)\n\n",
      "Paired on the same held-out examples: Δ = high rank − low rank, mean per example ± SEM; z = Δ / SEM. "
      "Negative Δ NLL / positive Δ accuracy favour the high rank. Train loss: the mean of the last 20 steps "
      "(answer tokens of the training rows), next to the held-out NLL to show over- or under-fitting.\n\n",
      results_render.markdown_table(
          [
              "task",
              "n",
              "rate lo / hi",
              "train loss lo / hi",
              "NLL lo / hi",
              "Δ NLL",
              "z",
              "acc % lo / hi",
              "Δ acc (points)",
              "z",
          ],
          body,
      ),
      "\n",
      "\n".join(sentences),
      "\n\n",
      f"Training curves: `{png.name if png else '—'}`.\n\n",
      results_render.provenance([str(store)], direct),
  ]
  return results_render.finish(out, "rank_pilot", md, png or out / "rank_pilot_curves.png")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("rates")
  r.add_argument("--results", nargs="+", required=True)
  r.add_argument("--task", default="siqa")
  r.add_argument("--out", default="")
  r.add_argument("--lrs-only", action="store_true")
  g = sub.add_parser("report")
  g.add_argument("--results", nargs="+", required=True)
  g.add_argument("--out", required=True)
  g.add_argument("--steps", type=int, default=120, help="the pilot runs' step count (rate-search runs differ)")
  args = p.parse_args(argv)
  rows = R.load_rows(args.results)
  if not rows:
    raise SystemExit(f"rank_pilot: no finished cells in {args.results}")
  return _rates(args, rows) if args.command == "rates" else _report(args, rows)


if __name__ == "__main__":
  sys.exit(main())
