"""Fig. 5: memory-efficient Post-Squeeze (Alg. 2, r_src-bound) minus the standard one (Alg. 1: RSVD of the full ΔW, method
``rsvd``),
accuracy points per (r_src, r_tgt), averaged over tasks. The paper finds no significant difference.

  python experiments/fig5_efficient_vs_standard.py --results runs/heatmap --out experiments/results/paper
writes fig5_efficient_vs_standard.{md,png}.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def differences(rows, a="efficient", b="rsvd"):
  """{(src, tgt): {task: acc_a − acc_b}} over Post-Squeeze cells of the same source run."""
  post = results_render.require(rows, "fig5", method="post_squeeze")
  by = R.per_task(post, lambda r: (r.squeeze_method, r.source_rank, r.learning_rate, r.rank))
  out = {}
  for (m, src, lr, tgt), tasks in by.items():
    if m != a or (b, src, lr, tgt) not in by:
      continue
    other = by[(b, src, lr, tgt)]
    out.setdefault((src, tgt), {}).update({t: v - other[t] for t, v in tasks.items() if t in other})
  if not out:
    raise SystemExit(f"fig5: no (r_src, r_tgt) has both {a!r} and {b!r} Post-Squeeze results")
  return out


def main(argv=None):
  args, rows = results_render.script_args(__doc__, argv)
  diff = differences(rows)
  srcs = sorted({s for s, _ in diff}, reverse=True)
  tgts = sorted({t for _, t in diff})
  g = [[100 * R.mean(list(diff[(s, t)].values())) if diff.get((s, t)) else math.nan for t in tgts] for s in srcs]
  tasks = sorted({t for v in diff.values() for t in v})
  flat = [100 * v for c in diff.values() for v in c.values()]
  title = f"{args.title} efficient − standard (rsvd) Post-Squeeze, mean of {len(tasks)} task(s)".strip()
  png = results_render.heatmap(
      g,
      row_labels=[str(s) for s in srcs],
      col_labels=[str(t) for t in tgts],
      title=title,
      cbar_label="accuracy difference (points)",
      xlabel="target rank r_tgt",
      ylabel="source rank r_src",
      path=Path(args.out) / "fig5_efficient_vs_standard.png",
  )
  md = [
      f"# Fig. 5: {title}\n\n",
      results_render.markdown_table(
          ["r_src \\ r_tgt"] + [str(t) for t in tgts],
          [[str(s)] + ["—" if math.isnan(v) else f"{v:+.1f}" for v in row] for s, row in zip(srcs, g)],
      ),
      f"\nOver all {len(flat)} (task, r_src, r_tgt) pairs: mean {R.mean(flat):+.2f} points, largest |difference| "
      f"{max(abs(v) for v in flat):.1f} points, identical accuracy in "
      f"{sum(1 for v in flat if abs(v) < 1e-9)} of {len(flat)}.\n",
      "\n" + results_render.provenance(args.results, rows),
  ]
  return results_render.finish(args.out, "fig5_efficient_vs_standard", md, png)


if __name__ == "__main__":
  sys.exit(main())
