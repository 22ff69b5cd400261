"""Activation memory of the train step with and without ``config.remat``, at the paper's shapes, from abstract
shapes (no weights, nothing compiled for the paper sizes).

    PYTHONPATH=. python experiments/remat_memory.py            # 270m, 1b, 4b, 12b at batch 8 x 1024
    PYTHONPATH=. python experiments/remat_memory.py --quick    # tiny and 270m only (prints, writes nothing)

For each model: the residuals a gradient of the project's own training loss (``train.Trainer._loss``: LoRA on
all seven projections, rank 128, bfloat16 base, batch 8 x 1024, 64 answer tokens per row) keeps from the
forward pass for the backward pass (``aot.residual_bytes``: JAX's accounting of the ``jax.vjp`` residuals,
computed values only), with ``remat`` off and on. This is the activation part of a train step's device
memory that remat cuts; a memory-aware scheduler (XLA:TPU, XLA:GPU) holds about this between the two
passes. The last column puts it next to the compiled one-device train step's temporaries of
experiments/results/paper_scale_plan.md (XLA:CPU, no remat) where that table has them.

Why not XLA:CPU's memory analysis: on this backend the rematerialised program does not get smaller. Measured
here on the tiny model and on a plain 8-layer MLP (``cpu_check`` below, same run): XLA:CPU's schedule hoists
the recomputation, so its ``temp_size_in_bytes`` stays flat or grows with remat. The table says so too.

Writes experiments/results/remat_memory.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "experiments" / "results"
MODELS = ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b")
PLAN_KEY = {"gemma3_1b": "1b", "gemma3_4b": "4b", "gemma3_12b": "12b"}


def residuals(name: str, batch: int, length: int, rank: int, remat: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from lora_squeeze import aot  # pylint: disable=g-import-not-at-top

  model = aot.abstract_model(name) if name != "tiny" else aot.abstract_model("tiny", dtype="float32")
  setting = aot.Setting(batch=batch, max_len=length, remat=remat)
  programs = aot.Programs(model, setting)
  lora = programs.lora(rank)
  base, data = programs.base(), programs.batch()
  t = time.perf_counter()
  loss = lambda p, b, d: programs.trainer._loss(p, b, d)[0]  # pylint: disable=protected-access
  n = aot.residual_bytes(loss, lora, base, data)
  return {
      "model": name,
      "remat": remat,
      "residual_bytes": n,
      "trace_s": time.perf_counter() - t,
      "layers": int(model.config.num_layers),
      "embed_dim": int(model.config.embed_dim),
  }


def cpu_check() -> dict:
  """XLA:CPU's compiled temporaries with and without remat, on the tiny model (batch 8 x 256) and on an
  8-layer MLP with jax.checkpoint per layer: does this backend's memory analysis see remat at all?"""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lora_squeeze import aot, lora, models, train  # pylint: disable=g-import-not-at-top
  from lora_squeeze.data import synthetic  # pylint: disable=g-import-not-at-top

  out = {}
  tiny = models.load("tiny", num_layers=8)
  cfg = lora.LoRAConfig(rank=4)
  lp = lora.init_lora(jax.random.key(0), tiny.config, cfg)
  batch = next(synthetic.SyntheticIterator(tiny.tokenizer, batch_size=8, max_len=256, seed=0))
  for remat in (False, True):
    tr = train.Trainer(tiny, cfg, max_targets=8 * 256, remat=remat)
    fn = jax.jit(jax.value_and_grad(lambda p, b, tr=tr: tr._loss(p, tiny.params, b), has_aux=True))
    out[f"tiny8_temp_{remat}"] = fn.lower(lp, batch).compile().memory_analysis().temp_size_in_bytes
    out[f"tiny8_residual_{remat}"] = aot.residual_bytes(
        lambda p, base, b, tr=tr: tr._loss(p, base, b)[0], lp, tiny.params, jax.tree.map(jnp.asarray, batch)
    )

  def layer(w, x):
    return jnp.tanh(jnp.tanh(x @ w) @ w.T)

  ws = [jnp.full((256, 1024), 0.01) for _ in range(8)]
  x = jnp.ones((2048, 256))
  for remat in (False, True):
    step = jax.checkpoint(layer) if remat else layer

    def f(ws, x, step=step):
      for w in ws:
        x = step(w, x)
      return jnp.sum(x**2)

    out[f"mlp_temp_{remat}"] = jax.jit(jax.grad(f)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
  return out


def machine() -> str:
  load = os.getloadavg()
  return (
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
      f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
  )


def plan_memory(field: str = "temporaries") -> dict[str, float]:
  """{model key: GB of ``field``} of the compiled one-device train_r128 in paper_scale_plan.json."""
  path = RESULTS / "paper_scale_plan.json"
  if not path.exists():
    return {}
  out = {}
  for rec in json.loads(path.read_text()).get("records", []):
    if rec.get("devices") == 1 and rec.get("program") == "train_r128" and rec.get("memory"):
      out[rec["model"]] = rec["memory"].get(field, 0) / 1e9
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny and 270m only; prints, writes nothing")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--rank", type=int, default=128)
  args = p.parse_args(argv)
  from lora_squeeze import runtime  # pylint: disable=g-import-not-at-top

  runtime.quiet_native_logs()
  names = ("tiny", "gemma3_270m") if args.quick else MODELS
  before = machine()
  rows = []
  for name in names:
    for remat in (False, True):
      r = residuals(name, args.batch, args.length, args.rank, remat)
      rows.append(r)
      print(f"{name:12s} remat={remat!s:5s} residuals {r['residual_bytes'] / 1e9:8.3f} GB  ({r['trace_s']:.0f} s)")
  check = cpu_check()
  print("XLA:CPU check:", check)
  if args.quick:
    return 0
  temps = plan_memory()
  lines = [
      "# Activation memory of the train step with and without `config.remat`\n\n",
      "JAX's residual count runs above XLA's compiled temporaries where both exist (it counts values XLA "
      "fuses away; compare the last two columns without remat): read it as an upper bound.\n\n",
      f"`PYTHONPATH=. python experiments/remat_memory.py` on {datetime.date.today()}. Machine: {before}. "
      "Nothing is compiled or run for these sizes: JAX traces the project's own training loss "
      f"(`train.Trainer._loss`) on abstract shapes: batch {args.batch} x {args.length}, LoRA rank {args.rank} "
      "on all seven projections, bfloat16 base, 64 answer tokens per row.\n\n",
      "`residuals` = what a gradient keeps from the forward pass for the backward pass (`aot.residual_bytes`, "
      "JAX's accounting of the `jax.vjp` residuals: computed values only, not the weights). A memory-aware "
      "scheduler (XLA:TPU, XLA:GPU) holds about this between the passes, on top of the weights, the LoRA "
      "state and one layer's working set.\n\n",
      "| model | layers | residuals, remat off (GB) | residuals, remat on (GB) | ratio | one-device train_r128 temporaries on XLA:CPU, remat off (GB, paper_scale_plan) |\n",
      "|---|---:|---:|---:|---:|---:|\n",
  ]
  out = {"machine": before, "rows": rows, "cpu_check": check, "batch": args.batch, "length": args.length}
  for name in names:
    off = next(r for r in rows if r["model"] == name and not r["remat"])
    on = next(r for r in rows if r["model"] == name and r["remat"])
    plan = temps.get(PLAN_KEY.get(name, ""), None)
    lines.append(
        f"| {name} | {off['layers']} | {off['residual_bytes'] / 1e9:.2f} | {on['residual_bytes'] / 1e9:.2f} | "
        f"{off['residual_bytes'] / max(on['residual_bytes'], 1):.1f}x | {'-' if plan is None else f'{plan:.2f}'} |\n"
    )
  args_gb = plan_memory("arguments")
  lines.append(
      "\nWhat it means for one device, estimated (not compiled with remat): arguments (paper_scale_plan) + the "
      "residuals with remat + one layer's share of the residuals without it (the working set of the block "
      "being recomputed):\n\n"
  )
  for name in names:
    key = PLAN_KEY.get(name, "")
    if key in args_gb:
      off = next(r for r in rows if r["model"] == name and not r["remat"])
      on = next(r for r in rows if r["model"] == name and r["remat"])
      layer = off["residual_bytes"] / 1e9 / off["layers"]
      est = args_gb[key] + on["residual_bytes"] / 1e9 + layer
      lines.append(
          f"- {name}: {args_gb[key]:.1f} + {on['residual_bytes'] / 1e9:.1f} + {layer:.1f} ≈ **{est:.1f} GB** "
          f"with remat, against {args_gb[key] + temps.get(key, 0):.1f} GB compiled without it.\n"
      )
  mib = lambda b: f"{b / 2**20:.1f}"
  lines += [
      "\n## Why this is not XLA:CPU's memory analysis\n\n",
      "Same run, compiled on this machine's XLA:CPU (temporaries = `memory_analysis().temp_size_in_bytes`):\n\n",
      "| program | remat off (MiB) | remat on (MiB) |\n|---|---:|---:|\n",
      f"| tiny model, 8 layers, batch 8 x 256: compiled temporaries | {mib(check['tiny8_temp_False'])} | "
      f"{mib(check['tiny8_temp_True'])} |\n",
      f"| the same: residuals (`aot.residual_bytes`) | {mib(check['tiny8_residual_False'])} | "
      f"{mib(check['tiny8_residual_True'])} |\n",
      f"| 8-layer MLP (2048 x 256 -> 1024 -> 256, tanh), `jax.checkpoint` per layer: compiled temporaries | "
      f"{mib(check['mlp_temp_False'])} | {mib(check['mlp_temp_True'])} |\n\n",
      "XLA:CPU does not schedule for memory here: it hoists the recomputed forward ops, so its buffer "
      "assignment keeps as much as (or more than) without remat, while JAX's residuals shrink by the ratio "
      "above. The accelerators' schedulers keep the recomputation next to its use; confirm the saving there "
      "with the compiled program's memory analysis on the device (`aot.memory`) before relying on it.\n",
  ]
  (RESULTS / "remat_memory.json").write_text(json.dumps(out, indent=1))
  text = "".join(lines)
  (RESULTS / "remat_memory.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
