"""The paper's claims, one by one, as paired comparisons on the same held-out examples.

Each claim compares two sets of adapters A and B evaluated on the same examples of the same tasks
(``results.paired``): the mean per-example difference A − B of correctness (accuracy points) and of the gold
choice's NLL per token (nats), each with its standard error over the pooled examples. Pairing removes the
between-example variance that makes two accuracies' 95% intervals overlap at n = 100; the NLL moves with
training long before the arg-max does. A verdict needs |difference| > 2 SEM:

  * "A better than B" claims: supported / contradicted / not significant, on NLL and on accuracy;
  * "no difference" claims (Fig. 5: efficient = standard Post-Squeeze): supported when neither is significant,
    or when the difference's 2-SEM interval lies inside a margin far below any detectable effect
    (``EQUIVALENCE_MARGIN``: float rounding is not a difference).
Pooled rows (all (r_src, r_tgt) of Fig. 4; Fig. 5) reuse each held-out example in every comparison: they are
averaged per example first (``results.pooled``), so an example counts once and the SEM is not shrunk by
counting correlated reuses as new examples.

Claims checked, as far as the store holds the cells (configs/paper.py: heatmap + table1 artefacts):
  1. Post-Squeeze r_src → r_tgt beats direct training at r_tgt (Fig. 4), for every (r_src, r_tgt < r_src),
     and pooled over all of them;
  2. memory-efficient Post-Squeeze (Alg. 2) = standard (Alg. 1, RSVD of ΔW) (Fig. 5), pooled;
  3. V_r when halving the rank is high (App. F: ~94-96%), and lower for large steps;
  4. Cont-Squeeze (+M steps at r_tgt) recovers from a large squeeze: better than Post-Squeeze r_src → r_tgt;
  5. Cont-Squeeze and In-Squeeze (standard, minimum-steps) against direct training at r_tgt for the same
     N + M steps (Table 1);
  6. beyond the paper: In-Squeeze with the optimizer state carried across rank changes against a fresh one
     (paper_sweeps: table1 with optimizer_states=fresh+carry), on the seeds both ran.
Several seeds (Table 3's cells): each seed of A is paired with the same seed of B, and the SEM counts the
seeds' spread (``results.paired``); each seed's own difference is listed below the claims.

  python experiments/claims.py --results runs/heatmap runs/table1 --out experiments/results/paper
writes claims.{md,png}.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render  # noqa: E402


def _direct(rows, rank, steps, rule="accuracy"):
  """Direct training at ``rank`` for ``steps`` steps, at its best rate (by ``rule``) when the store has several."""
  cands = [r for r in rows if r.method == "direct" and r.rank == rank and r.steps == steps]
  lrs = {r.learning_rate for r in cands}
  if len(lrs) > 1:
    best = R.best_direct_lr(cands, by=rule).get(rank)
    cands = [r for r in cands if r.learning_rate == best]
  return cands


def _post(rows, src, tgt, method="efficient"):
  return [
      r
      for r in rows
      if r.method == "post_squeeze"
      and r.source_rank == src
      and r.rank == tgt
      and (r.squeeze_method or "efficient") == method
  ]


# "No difference" claims: a difference whose 2-SEM interval lies inside ±margin is no difference in practice,
# even when it is many SEMs from 0 (efficient vs standard Post-Squeeze differ by float32 rounding, ~1e-6
# nats, with an SEM of ~1e-6). The margins are far below the smallest effect any comparison of the CPU
# campaign can detect (~0.02 nats/token, ~1 accuracy point).
EQUIVALENCE_MARGIN = {"nll": 1e-3, "accuracy": 1e-3}  # nats/token; accuracy as a fraction (0.1 points)


def _verdict(d, d_sem, better_is_negative: bool, equality: bool = False, margin: float = 0.0) -> str:
  if d_sem is None or math.isnan(d_sem):
    return "n/a"
  if d_sem == 0:
    return "identical" if d == 0 else ("A better" if (d < 0) == better_is_negative else "B better")
  z = d / d_sem
  if equality:
    if abs(z) <= 2:
      return "no significant difference"
    if abs(d) + 2 * d_sem < margin:
      return f"equivalent (within ±{margin:g})"
    return f"differ ({z:+.1f} SEM)"
  if abs(z) <= 2:
    return "not significant"
  return "A better" if (z < 0) == better_is_negative else "B better"


def comparisons(rows, rule="accuracy"):
  """[(claim, A label, B label, Paired, equality?)] for every claim the store has cells for; direct training's
  rate per rank by ``rule`` (``results.RATE_RULES``)."""
  out = []
  post_pairs = sorted(
      {
          (r.source_rank, r.rank)
          for r in rows
          if r.method == "post_squeeze" and r.source_rank and r.rank < r.source_rank
      },
      key=lambda p: (-p[0], -p[1]),
  )
  pooled = []
  for src, tgt in post_pairs:
    a = _post(rows, src, tgt)
    n_steps = {r.steps for r in a}
    b = [r for s in n_steps for r in _direct(rows, tgt, s, rule)]
    p = R.paired(a, b)
    if p:
      out.append(
          ("Post-Squeeze beats direct at r_tgt (Fig. 4)", f"Post-Squeeze {src}→{tgt}", f"direct r={tgt}", p, False)
      )
      pooled.append((a, b))
  p = R.pooled(pooled)  # each held-out example once: its mean difference over the (r_src, r_tgt) pairs
  if p and p.comparisons > 1:
    out.append(
        ("Post-Squeeze beats direct at r_tgt (Fig. 4)", "Post-Squeeze, all r_src → r_tgt", "direct r_tgt", p, False)
    )
  both = []
  for src, tgt in post_pairs + sorted(
      {(r.source_rank, r.rank) for r in rows if r.method == "post_squeeze" and r.rank == r.source_rank}
  ):
    a, b = _post(rows, src, tgt, "efficient"), _post(rows, src, tgt, "rsvd")
    if a and b:
      both.append((a, b))
  p = R.pooled(both)
  if p:
    out.append(("efficient = standard Post-Squeeze (Fig. 5)", "efficient (Alg. 2)", "standard (RSVD, Alg. 1)", p, True))
  for method, label in (
      ("cont_squeeze", "Cont-Squeeze"),
      ("in_squeeze_standard", "In-Squeeze standard"),
      ("in_squeeze_min_steps", "In-Squeeze min-steps"),
  ):
    for (src, tgt, steps), a in sorted(
        R.group([r for r in rows if r.method == method], lambda r: (r.source_rank, r.rank, r.steps)).items()
    ):
      if method == "cont_squeeze":
        post = _post(rows, src, tgt)
        p = R.paired(a, post)
        if p:
          m = steps - min((r.steps for r in post), default=steps)
          out.append(
              (
                  "Cont-Squeeze recovers from a large squeeze",
                  f"{label} {src}→{tgt} +{m}",
                  f"Post-Squeeze {src}→{tgt}",
                  p,
                  False,
              )
          )
      b = _direct(rows, tgt, steps, rule)
      p = R.paired(a, b)
      if p:
        out.append(
            (
                f"{label} vs direct training, same steps (Table 1)",
                f"{label} {src}→{tgt}",
                f"direct r={tgt}, {steps} steps",
                p,
                False,
            )
        )
  for scheme, label in (("standard", "In-Squeeze standard"), ("min_steps", "In-Squeeze min-steps")):
    fresh = R.group([r for r in rows if r.method == f"in_squeeze_{scheme}"], lambda r: (r.source_rank, r.rank, r.steps))
    for key, a in sorted(
        R.group(
            [r for r in rows if r.method == f"in_squeeze_{scheme}_carry"], lambda r: (r.source_rank, r.rank, r.steps)
        ).items()
    ):
      p = R.paired(a, fresh.get(key, []))  # on the seeds both ran (results.paired)
      if p:
        out.append(
            (
                "carrying the optimizer state across rank changes helps In-Squeeze (beyond the paper)",
                f"{label} {key[0]}→{key[1]}, optimizer state carried",
                f"{label}, fresh optimizer state",
                p,
                False,
            )
        )
  return out


def retention_rows(rows):
  """[(r_src, r_tgt, mean V_r over tasks)] of the Post-Squeeze rows (efficient), r_tgt < r_src."""
  by = R.group(
      [
          r
          for r in rows
          if r.method == "post_squeeze"
          and r.retention is not None
          and (r.squeeze_method or "efficient") == "efficient"
          and r.rank < (r.source_rank or 0)
      ],
      lambda r: (r.source_rank, r.rank),
  )
  return sorted(((s, t, R.mean([r.retention for r in v])) for (s, t), v in by.items()), key=lambda x: (-x[0], -x[1]))


def main(argv=None):
  args, rows = results_render.script_args(__doc__, argv)
  comps = comparisons(rows, args.rate_rule)
  if not comps:
    raise SystemExit(
        "claims: no pair of cells with per-example results to compare (records made before "
        "evaluate stored per-example results cannot be paired)"
    )
  table = []
  for claim, a, b, p, equality in comps:
    table.append(
        [
            claim,
            a,
            b,
            ", ".join(p.tasks),
            ", ".join(map(str, p.seeds)) or "-",
            str(p.n) if p.comparisons == 1 else f"{p.n} ({p.comparisons} comparisons, each example once)",
            f"{100 * p.accuracy:+.1f} ± {100 * p.accuracy_sem:.1f}",
            _verdict(p.accuracy, p.accuracy_sem, False, equality, EQUIVALENCE_MARGIN["accuracy"]),
            f"{p.nll:+.4f} ± {p.nll_sem:.4f}",
            _verdict(p.nll, p.nll_sem, True, equality, EQUIVALENCE_MARGIN["nll"]),
        ]
    )
  title = f"{args.title} the paper's claims, paired on the same held-out examples".strip()
  md = [
      f"# Claims: {title}\n\n",
      "A − B per held-out example, mean ± SEM; accuracy in points (positive = A better), gold-choice NLL in "
      "nats per token (negative = A better). Verdicts need |mean| > 2 SEM. Several seeds: seed s of A against "
      "seed s of B, the SEM adding the seeds' spread to the examples' (per seed: below). "
      + R.rate_rule_text(args.rate_rule)
      + "\n\n",
      results_render.markdown_table(
          [
              "claim",
              "A",
              "B",
              "tasks",
              "seeds",
              "examples",
              "Δ accuracy (points)",
              "verdict (accuracy)",
              "Δ NLL (nats/token)",
              "verdict (NLL)",
          ],
          table,
          align="llllllrlrl",
      ),
  ]
  multi = [(claim, a, b, p) for claim, a, b, p, _ in comps if len(p.seeds) > 1]
  if multi:
    md += [
        "\n## Each seed alone\n\n",
        "The claims above that pool several seeds: each seed's own paired difference (A's seed s against B's "
        "seed s, on the same examples), mean ± the examples' SEM. The pooled SEM above adds the spread of these "
        "per-seed means to the examples' SEM (`results.paired`): a seed is another training run, not more "
        "examples.\n\n",
        results_render.markdown_table(
            ["A", "B", "seed", "Δ accuracy (points)", "Δ NLL (nats/token)", "verdict (NLL)"],
            [
                [a, b, str(s), f"{100 * acc:+.1f} ± {100 * acc_sem:.1f}", f"{nll:+.4f} ± {nll_sem:.4f}",
                 _verdict(nll, nll_sem, better_is_negative=True)]
                for _, a, b, p in multi
                for s, nll, nll_sem, acc, acc_sem in p.per_seed
            ],  # fmt: skip
            align="lllrrl",
        ),
    ]
  ret = retention_rows(rows)
  if ret:
    md += [
        "\n## Retention V_r of Post-Squeeze (App. F; mean over tasks and modules)\n\n",
        results_render.markdown_table(
            ["r_src → r_tgt", "halving?", "V_r"],
            [[f"{s}→{t}", "yes" if 2 * t == s else "", f"{100 * v:.1f}%"] for s, t, v in ret],
        ),
    ]
  md.append("\n" + results_render.provenance(args.results, rows))

  plt = results_render.pyplot()
  labels = [f"{a}  vs  {b}" for _, a, b, _, _ in comps]
  fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.32 * len(comps)), sharey=True)
  y = list(range(len(comps)))[::-1]
  for ax, vals, sems, name in (
      (
          axes[0],
          [-p.nll for *_, p, _ in comps],
          [2 * p.nll_sem for *_, p, _ in comps],
          "NLL improvement of A over B (nats/token), ± 2 SEM",
      ),
      (
          axes[1],
          [100 * p.accuracy for *_, p, _ in comps],
          [200 * p.accuracy_sem for *_, p, _ in comps],
          "accuracy gain of A over B (points), ± 2 SEM",
      ),
  ):
    colors = ["#c0392b" if v - e > 0 else "#2471a3" if v + e < 0 else "#999999" for v, e in zip(vals, sems)]
    ax.barh(y, vals, xerr=[0 if math.isnan(e) else e for e in sems], color=colors, capsize=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(name, fontsize=8)
  axes[0].set_yticks(y, labels, fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "claims.png")
  return results_render.finish(args.out, "claims", md, png)


if __name__ == "__main__":
  sys.exit(main())
