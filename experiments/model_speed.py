"""Speed of the real Gemma 3 270M on this machine: forward and LoRA train step at batch 8 x 128 tokens.

Rows (all jitted, float32, timed after a warm-up call, median of ``--repeats``):
  * forward, full logits: gemma's ``__call__`` (262k-vocab logits at every position);
  * forward, hidden + answer logits: ``LoRA.hidden_states`` and ``logits_at`` at the answer positions only;
  * LoRA train step, answer-only loss: ``trainer.Trainer.train_step`` (Adafactor, rank 8 on all projections);
  * the same step with autodiff's backward for the LoRA product (``lora_matmul.HAND_BACKWARD = False``: what the
    step was before the hand-written backward), side by side;
  * LoRA train step, full-vocab loss: the same step computing logits at every position (the naive loss).
Then one answer-only step runs under ``jax.profiler`` and its XLA ops are split into GEMMs (``dot``) and the
rest, with the GEMMs' FLOPs counted from the compiled HLO: where the step's time goes, and the ceiling the
non-GEMM work puts on "% of the GEMM rate".
FLOPs per call come from XLA's own cost analysis of the compiled program (``compiled.cost_analysis()``),
so they count what actually runs; the matmul rate is an XLA float32 GEMM measured in the same run, so
"% of matmul" compares like with like on a shared, noisy machine.

Tried and dropped (measured on the 2-core AMD EPYC of experiments/results/model_speed.md): letting XLA choose
the frozen weights' layouts (``Format(Layout.AUTO)`` inputs, weights placed once in them: 91 of them change
layout) ran the step in 2.443 s against 2.405 s; the vocabulary projection's backward (K = 262,144, 167
GFLOP/s) split into 2-64 chunks as one batched GEMM or an einsum ran no faster (97-168 GFLOP/s).

  python experiments/model_speed.py [--batch 8 --seq 128 --answer 16 --rank 8 --repeats 5]
writes experiments/results/model_speed.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import lora  # noqa: E402
from lora_squeeze import lora_matmul  # noqa: E402
from lora_squeeze import fileio  # noqa: E402
from lora_squeeze import models  # noqa: E402
from lora_squeeze import trainer as trainer_lib  # noqa: E402


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compile)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\((.*)$", re.M)


def profile_step(compiled_text: str, run_once) -> dict:
  """Run ``run_once`` under jax.profiler; split the XLA:CPU op time into GEMMs and the rest.

  GEMM FLOPs: 2 x |output| x |contracted dims| of every ``dot`` in the compiled HLO (names match the
  profiler's op events)."""
  shapes, dots = {}, {}
  for name, _, dims, opcode, rest in _INSTR.findall(compiled_text):
    shapes[name] = [int(d) for d in dims.split(",") if d]
    if opcode == "dot":
      dots[name] = rest
  dot_flops = {}
  for name, rest in dots.items():
    lhs = rest.split(",")[0].strip().lstrip("%").rstrip(")")
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(shapes[lhs][int(i)] for i in contract.group(1).split(",") if i) if contract else 1
    dot_flops[name] = 2 * math.prod(shapes[name]) * k
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    run_once()
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*perfetto*.json.gz", recursive=True))[-1]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  secs, kinds = collections.Counter(), collections.Counter()  # GEMM vs rest; the rest by op kind
  for e in events:
    if e.get("ph") == "X" and e["name"] in shapes:
      dur = e.get("dur", 0) / 1e6
      if e["name"] in dot_flops:
        secs["dot"] += dur
      else:
        secs["other"] += dur
        kinds[re.sub(r"[._]\d+$", "", e["name"])] += dur
  return {
      "dot_seconds": secs["dot"],
      "other_seconds": secs["other"],
      "dot_flops": sum(dot_flops.values()),
      "top_other": kinds.most_common(6),
  }


def _step_runner(trainer, rank, params, batch, lr, *, nonzero_b: bool):
  """({"state": ...}, FLOPs per step, one_step()): a fresh state at ``rank`` (b moved off zero for a real LoRA
  forward when ``nonzero_b``) and a closure running the jitted, donating train step on it."""
  holder = {"state": trainer.init_state(jax.random.key(0), rank)}
  if nonzero_b:
    holder["state"]["params"] = jax.tree.map(lambda x: x + 0.01, holder["state"]["params"])
  step = trainer.train_step_program
  flops = _flops(step, holder["state"], params, batch, lr)

  def one_step():
    holder["state"], m = step(holder["state"], params, batch, lr)
    return m["loss"]

  return holder, flops, one_step


def _cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def matmul_rate(n: int, repeats: int) -> tuple[float, float]:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.float32)
  f = jax.jit(jnp.dot)
  sec = _time(lambda: f(a, b), repeats)
  return 2 * n**3 / sec / 1e9, sec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--answer", type=int, default=16, help="answer tokens per example (the loss positions)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_speed.md"))
  args = p.parse_args(argv)

  model = models.load("gemma3_270m")
  b, t = args.batch, args.seq
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, 200_000, size=(b, t)).astype(np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[:, t - args.answer :] = 1
  batch = {
      "tokens": tokens,
      "loss_mask": loss_mask,
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
  }
  cfg = lora.LoRAConfig(rank=args.rank)
  n_targets = int(loss_mask[:, 1:].sum())

  rows = []
  gemm_rate, gemm_sec = matmul_rate(2048, args.repeats)
  rows.append(("XLA f32 GEMM 2048³ (reference rate)", gemm_sec, 2 * 2048**3))

  params = model.params
  fwd_full = jax.jit(lambda p, tok: model.transformer.apply({"params": p}, tok).logits)
  sec = _time(lambda: fwd_full(params, tokens), args.repeats)
  rows.append(("forward, full logits (gemma __call__)", sec, _flops(fwd_full, params, tokens)))

  lr = jnp.float32(1e-3)
  trainer = trainer_lib.Trainer(model, cfg, max_targets=n_targets)
  holder, flops_step, one_step = _step_runner(trainer, args.rank, params, batch, lr, nonzero_b=True)
  lora_params = holder["state"]["params"]  # timed before the first (donating) step
  hidden_fwd = jax.jit(lambda lp, base, batch: trainer._loss(lp, base, batch))  # pylint: disable=protected-access
  sec = _time(lambda: hidden_fwd(lora_params, params, batch), args.repeats)
  rows.append(
      (
          f"forward with LoRA r={args.rank}, logits at {n_targets} answer tokens",
          sec,
          _flops(hidden_fwd, lora_params, params, batch),
      )
  )

  sec = _time(one_step, args.repeats)
  rows.append((f"LoRA r={args.rank} train step, answer-only loss ({n_targets} logits)", sec, flops_step))
  prof = profile_step(
      trainer.train_step_program.lower(holder["state"], params, batch, lr).compile().as_text(),
      lambda: jax.block_until_ready(one_step()),
  )

  lora_matmul.HAND_BACKWARD = False  # the same step with autodiff's backward for the LoRA product (before)
  _, flops_auto, one_auto_step = _step_runner(
      trainer_lib.Trainer(model, cfg, max_targets=n_targets), args.rank, params, batch, lr, nonzero_b=True
  )
  sec = _time(one_auto_step, args.repeats)
  lora_matmul.HAND_BACKWARD = True
  rows.append((f"LoRA r={args.rank} train step, answer-only loss, autodiff LoRA backward (before)", sec, flops_auto))

  full_mask = dict(batch, loss_mask=np.ones((b, t), np.int32))
  _, flops_full, one_full_step = _step_runner(
      trainer_lib.Trainer(model, cfg, max_targets=b * t), args.rank, params, full_mask, lr, nonzero_b=False
  )
  sec = _time(one_full_step, args.repeats)
  rows.append((f"LoRA r={args.rank} train step, full-vocab loss ({b * (t - 1)} logits)", sec, flops_full))

  lines = [
      "# Real Gemma 3 270M speed (float32, jit)",
      "",
      f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, {_cpu_name()}, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}. Batch {b} x {t} tokens; LoRA rank {args.rank} "
      f"on all 7 projections of 18 layers; {args.answer} answer tokens per example; median of "
      f"{args.repeats} timed calls after a warm-up. FLOPs: XLA cost analysis of each compiled program.",
      "",
      "| what | seconds | tokens/s | GFLOP per call | GFLOP/s | % of GEMM rate |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, sec, flops in rows:
    gf = flops / 1e9
    rate = gf / sec
    tok_s = "" if "GEMM" in name else f"{b * t / sec:,.0f}"
    lines.append(f"| {name} | {sec:.3f} | {tok_s} | {gf:,.1f} | {rate:,.1f} | {100 * rate / gemm_rate:.0f}% |")
  answer_step, auto_step_s, full_step = rows[3][1], rows[4][1], rows[5][1]
  op_total = prof["dot_seconds"] + prof["other_seconds"]
  dot_rate = prof["dot_flops"] / 1e9 / prof["dot_seconds"]
  lines += [
      "",
      f"Hand-written LoRA backward vs autodiff's: {auto_step_s / answer_step:.2f}x faster per train step.",
      f"Answer-only loss vs full-vocab loss: {full_step / answer_step:.2f}x faster per train step "
      f"({rows[5][2] / rows[3][2]:.2f}x fewer FLOPs).",
      "",
      f"Where the answer-only step's time goes (one step under jax.profiler, {op_total:.3f} s of XLA ops): "
      f"GEMMs {prof['dot_seconds']:.3f} s ({100 * prof['dot_seconds'] / op_total:.0f}%) for "
      f"{prof['dot_flops'] / 1e9:,.1f} GFLOP = {dot_rate:,.1f} GFLOP/s ({100 * dot_rate / gemm_rate:.0f}% of "
      f"the GEMM rate); everything else (norms, activations, softmax, rope, layout copies, the optimizer) "
      f"{prof['other_seconds']:.3f} s. Even with that rest at zero cost the step would run at "
      f"{100 * rows[3][2] / 1e9 / prof['dot_seconds'] / gemm_rate:.0f}% of the GEMM rate.",
      "Largest non-GEMM op kinds: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in prof["top_other"]) + ".",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(out, text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
