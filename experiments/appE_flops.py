"""Appendix E: the coarse FLOP estimates of the three decompositions — full SVD of ΔW (m·n·min(m, n)),
randomized SVD of ΔW (m·n·(r_tgt + k_o)), and the memory-efficient LoRA-Squeeze (Alg. 2, (m + n)·r_src²) —
plus the m·n·r_src of forming ΔW that the first two also pay. The paper's worked example
(m = n = 2048, r_src = 64, r_tgt = 8, k_o = 10: ~8.6B, ~75.5M, ~16.8M) and the whole LoRA of every Gemma 3
size (all seven projections of every layer, the real module shapes). Measured times of the same three paths
are in experiments/results/squeeze_speed.md (experiments/squeeze_speed.py).

  python experiments/appE_flops.py [--src 64 --tgt 8 --oversample 10] --out experiments/results/paper
writes appE_flops.{md,png}. Needs no results store.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import lora, lora_layout, models, squeeze  # noqa: E402
from lora_squeeze import results_render  # noqa: E402

SIZES = ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b")
METHODS = ("svd", "rsvd", "efficient")


def model_flops(name: str, r_src: int, r_tgt: int, oversample: int) -> dict[str, int]:
  """Σ over every LoRA module of the model of ``squeeze.paper_flops`` (ΔW forming included for svd/rsvd)."""
  shapes = lora_layout.lora_shapes(models.model_config(name), lora.LoRAConfig(rank=r_src))
  total = dict.fromkeys(METHODS, 0)
  for a, b in shapes.values():
    m, n = math.prod(a[:-1]), math.prod(b[1:])
    f = squeeze.paper_flops(m, n, r_src, r_tgt, oversample)
    for k in METHODS:
      total[k] += f[k] + (f["form_delta_w"] if k != "efficient" else 0)
  total["modules"] = len(shapes)
  return total


def human(x: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if x >= scale:
      return f"{x / scale:,.1f}{unit}"
  return f"{x:,.0f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", type=int, default=64)
  p.add_argument("--tgt", type=int, default=8)
  p.add_argument("--oversample", type=int, default=10)
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "paper"))
  args = p.parse_args(argv)
  ex = squeeze.paper_flops(2048, 2048, 64, 8, 10)
  md = [
      "# Appendix E: FLOPs of the three decompositions\n\n",
      "## The paper's worked example (m = n = 2048, r_src = 64, r_tgt = 8, k_o = 10)\n\n",
      results_render.markdown_table(
          ["method", "FLOPs (formula)", "paper says", "+ forming ΔW"],
          [
              ["full SVD of ΔW", human(ex["svd"]), "~8.6B", human(ex["form_delta_w"])],
              ["RSVD of ΔW", human(ex["rsvd"]), "~75.5M", human(ex["form_delta_w"])],
              ["memory-efficient (Alg. 2)", human(ex["efficient"]), "~16.8M", "not needed"],
          ],
      ),
      f"\n## Whole LoRAs, all 7 projections per layer, r_src = {args.src} → r_tgt = {args.tgt}, "
      f"k_o = {args.oversample} (ΔW forming included for the first two)\n\n",
  ]
  table, per_model = [], {}
  for name in SIZES:
    f = model_flops(name, args.src, args.tgt, args.oversample)
    per_model[name] = f
    table.append(
        [name, str(f["modules"])]
        + [human(f[k]) for k in METHODS]
        + [f"{f['svd'] / f['efficient']:,.0f}×", f"{f['rsvd'] / f['efficient']:,.0f}×"]
    )
  md.append(
      results_render.markdown_table(
          ["model", "modules", "full SVD", "RSVD", "efficient", "SVD / efficient", "RSVD / efficient"], table
      )
  )
  md.append("\nMeasured seconds of the same paths: `experiments/results/squeeze_speed.md`.\n")
  plt = results_render.pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.6))
  width = 0.26
  for i, k in enumerate(METHODS):
    ax.bar(
        [j + (i - 1) * width for j in range(len(SIZES))],
        [per_model[s][k] for s in SIZES],
        width,
        label={"svd": "full SVD of ΔW", "rsvd": "RSVD of ΔW", "efficient": "memory-efficient"}[k],
    )
  ax.set_yscale("log")
  ax.set_xticks(range(len(SIZES)), SIZES)
  ax.set_ylabel("FLOPs (Appendix E estimates)")
  ax.set_title(f"Squeezing a whole rank-{args.src} LoRA to rank {args.tgt}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = results_render.save_figure(fig, Path(args.out) / "appE_flops.png")
  return results_render.finish(args.out, "appE_flops", md, png)


if __name__ == "__main__":
  sys.exit(main())
