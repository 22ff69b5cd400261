"""In-Squeeze with per-module ranks (``config.auto_rank``) against uniform In-Squeeze and Post-Squeeze.

  python experiments/auto_rank.py --results STORE [STORE ...] --out DIR

For every In-Squeeze run that chose its ranks (method ``in_squeeze_*_auto`` in ``lora_squeeze.results``):
  * per rank change: the ladder's rank, the modules' chosen ranks (mean, min, max) and their lowest V_r;
  * the final adapter's LoRA parameter count, and the uniform rank with the nearest count (``r_eq``: the rank a
    Post-Squeeze of the same parameter budget squeezes to);
  * paired on the same held-out examples (``results.paired``), its held-out NLL and accuracy against every
    other adapter of the same task in the stores with the same final rank or r_eq: uniform In-Squeeze (same
    N + M), Post-Squeeze at r_eq, direct training at r_eq;
and ``auto_rank_ranks.png``: the chosen rank of every module, layer by projection type, one panel per rank change.
Writes auto_rank.md and auto_rank_ranks.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lora_squeeze import lora_layout  # noqa: E402
from lora_squeeze import results as R  # noqa: E402
from lora_squeeze import results_render as RR  # noqa: E402

KINDS = ("q", "k", "v", "kv", "o", "gate", "up", "gate_up", "down")


def _result(row) -> dict:
  """The run's result.json dict (a sweep directory's record, or a run workdir's file)."""
  store = Path(row.store)
  record = store / "results" / f"{row.cell}.json"
  if record.exists():
    return json.loads(record.read_text())["result"]
  return json.loads((store / "result.json").read_text())


def uniform_equivalent(result: dict) -> int:
  """The uniform rank whose LoRA parameter count is nearest the run's final (mixed-rank) one."""
  if isinstance(result["final_ranks"], int):
    return result["final_ranks"]
  # A module's parameters grow linearly in its rank: a uniform rank r costs r x the rank-1 adapter's count.
  return max(1, int(round(result["lora_params"] / result["lora_params_per_rank"])))


def stage_rows(result: dict) -> list[list[str]]:
  out = []
  for rec in result["auto_rank"]["stages"]:
    r = np.array(list(rec["ranks"].values()))
    out.append(
        [
            str(rec["stage"]),
            str(rec["ladder_rank"]),
            f"{r.mean():.2f}",
            f"{r.min()} / {r.max()}",
            f"{min(rec['retention'].values()):.3f}",
        ]
    )
  return out


def rank_grid(ranks: dict[str, int]) -> tuple[np.ndarray, list[str]]:
  """(layers x projection kinds) of the modules' ranks (nan where a kind has no module), and the kinds."""
  where = {lora_layout.module_kind(p): r for p, r in ranks.items()}
  layers = 1 + max(layer for layer, _ in where)
  kinds = [k for k in KINDS if any(kind == k for _, kind in where)]
  grid = np.full((layers, len(kinds)), np.nan)
  for (layer, kind), r in where.items():
    grid[layer, kinds.index(kind)] = r
  return grid, kinds


def plot(auto: list[tuple[object, dict]], path: Path) -> Path:
  plt = RR.pyplot()
  panels = [(row, rec) for row, res in auto for rec in res["auto_rank"]["stages"]]
  # constrained layout: each panel's colour bar keeps clear of the next panel's axis (it overlapped them).
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.5, 6), squeeze=False, layout="constrained")
  for i, (ax, (row, rec)) in enumerate(zip(axes[0], panels)):
    grid, kinds = rank_grid(rec["ranks"])
    im = ax.imshow(grid, cmap="viridis", vmin=1, vmax=rec["ladder_rank"], aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, fontsize=7)
    if i == 0:
      ax.set_ylabel("layer", fontsize=8)
    ax.set_title(f"{row.task}: stage {rec['stage']}\nladder r={rec['ladder_rank']}", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
    bar.set_label("rank", fontsize=7)
    bar.ax.tick_params(labelsize=7)
  fig.suptitle("In-Squeeze with automatic ranks: each module's rank after each rank change", fontsize=9)
  return RR.save_figure(fig, path)


def comparisons(rows, auto_row, result) -> list[list[str]]:
  r_eq = uniform_equivalent(result)
  out = []
  for other in rows:
    if other is auto_row or other.task != auto_row.task or other.seed != auto_row.seed:
      continue
    same_budget = other.method.startswith("in_squeeze") and other.steps == auto_row.steps
    at_r_eq = other.method in ("post_squeeze", "direct") and other.rank == r_eq
    if not (same_budget or at_r_eq):
      continue
    p = R.paired([auto_row], [other])
    if p is None:
      continue
    out.append(
        [
            f"{other.method} r={other.rank}" + (f" (from {other.source_rank})" if other.source_rank else ""),
            str(p.n),
            f"{p.nll:+.4f} ± {p.nll_sem:.4f}",
            f"{100 * p.accuracy:+.1f} ± {100 * p.accuracy_sem:.1f}",
        ]
    )
  return out


def main(argv=None):
  args, rows = RR.script_args(__doc__, argv)
  auto = [(r, _result(r)) for r in rows if r.method.endswith("_auto")]
  if not auto:
    raise SystemExit("auto_rank: no In-Squeeze run with automatic ranks (config.auto_rank.tau > 0) in the stores")
  md = ["# In-Squeeze with automatic per-module ranks\n"]
  for row, res in auto:
    tau = res["auto_rank"]["tau"]
    md.append(
        f"\n## {row.task}, seed {row.seed}: tau = {tau:g}, min rank {res['auto_rank']['min_rank']} "
        f"({row.cell})\n\nFinal adapter: {res['lora_params']:,} LoRA parameters, the count of uniform rank "
        f"r_eq = {uniform_equivalent(res)}; steps {row.steps}.\n\n"
    )
    md.append(RR.markdown_table(["stage", "ladder rank", "mean rank", "min / max", "lowest V_r"], stage_rows(res)))
    comp = comparisons(rows, row, res)
    if comp:
      md.append(
          "\nPaired on the same held-out examples, automatic − other (negative Δ NLL / positive Δ accuracy "
          "favour automatic ranks; |Δ| > 2 SEM to decide):\n\n"
      )
      md.append(RR.markdown_table(["other adapter", "n", "Δ NLL (nats/token)", "Δ accuracy (points)"], comp))
    else:
      md.append("\nNo other adapter of this task with per-example results at the same budget or r_eq to pair with.\n")
  png = plot(auto, Path(args.out) / "auto_rank_ranks.png")
  md.append(f"\nRanks per layer and projection type: `{png.name}`.\n")
  return RR.finish(args.out, "auto_rank", md, png)


if __name__ == "__main__":
  sys.exit(main())
