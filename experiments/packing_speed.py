"""Example packing on the real Gemma 3 270M: the LoRA train step on real task data, packed vs one per row.

Configurations, each on the same task's offline training data (``data.source="olmo"``, ``offline_train``,
shuffle seed 0), side by side in one run:
  * unpacked 8 x 64: one example per row (what a short-answer task would train with);
  * packed 8 x 128: ``pack=True`` first-fit rows (``data.pipeline``), about 1k real tokens per step;
  * unpacked 8 x 128: the control (twice the row length, the same examples as 8 x 64, more padding).
Each is ``trainer.Trainer.train_step`` (LoRA rank ``--rank`` on all projections, Adafactor) on consecutive real
batches of its iterator: one warm-up step (the compile), then ``--steps`` timed steps on new batches, each
synchronised, the three configurations taking turns step by step (a shared machine's other load then slows
them alike); seconds per step is their median; real tokens (``segment_ids > 0``) and examples per step are
means over the timed batches, and the rates are those means over the median step time.

Answer-token budget: the step gathers ``max_targets`` answer positions (static), and its vocabulary
projection costs that many rows whatever the batch holds. Here it is computed from the data: the most answer
tokens in any batch this run feeds the configuration, rounded up to a multiple of 8 (the table shows it, and
per row). A real packed run sets ``data.max_target_tokens`` (per ROW) to cover every batch of the epoch.

  python experiments/packing_speed.py [--tasks siqa arc_e --steps 5 --rank 8]
writes experiments/results/packing_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import data  # noqa: E402
from lora_squeeze import lora  # noqa: E402
from lora_squeeze import models  # noqa: E402
from lora_squeeze import results_render  # noqa: E402
from lora_squeeze import trainer as trainer_lib  # noqa: E402

# (label, pack, batch, max_len); the first is the baseline of the ratio column.
CONFIGS = (("unpacked", False, 8, 64), ("packed", True, 8, 128), ("unpacked (control)", False, 8, 128))


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _examples(batch) -> int:
  """Packed examples in a batch: one per segment start (a change of segment id to a non-zero one)."""
  seg = np.asarray(batch["segment_ids"])
  return int(((seg > 0) & (np.diff(seg, axis=1, prepend=0) != 0)).sum())


class Config:
  """One configuration on one task: its first 1 + ``steps`` batches, its trainer and its LoRA state."""

  def __init__(self, model, task: str, *, label: str, pack: bool, batch_size: int, max_len: int, rank: int, steps: int):
    self.model, self.label, self.batch_size, self.max_len = model, label, batch_size, max_len
    it = data.train_iterator(
        task, model.tokenizer, batch_size=batch_size, max_len=max_len, seed=0, split="offline_train", pack=pack
    )
    self.batches = [next(it) for _ in range(1 + steps)]
    most = max(int(b["loss_mask"][:, 1:].sum()) for b in self.batches)
    self.max_targets = -(-most // 8) * 8
    self.trainer = trainer_lib.Trainer(model, lora.LoRAConfig(rank=rank), max_targets=self.max_targets)
    self.state = self.trainer.init_state(jax.random.key(0), rank)
    self.seconds = []

  def step(self) -> None:
    """The next batch's train step, synchronised and timed (the first one compiles)."""
    batch = self.batches[len(self.seconds)]
    t = time.perf_counter()
    self.state, m = self.trainer.train_step(self.state, self.model.params, batch, 1e-3)
    jax.block_until_ready(m)
    self.seconds.append(time.perf_counter() - t)
    if not np.isfinite(float(m["loss"])):
      raise FloatingPointError(f"{self.label}: non-finite loss")

  def summary(self) -> dict:
    timed = self.batches[1:]
    sec = statistics.median(self.seconds[1:])
    real = float(np.mean([(b["segment_ids"] > 0).sum() for b in timed]))
    examples = float(np.mean([_examples(b) for b in timed]))
    return {
        "seconds": sec,
        "compile_seconds": self.seconds[0],
        "real_tokens": real,
        "examples": examples,
        "examples_per_s": examples / sec,
        "tokens_per_s": real / sec,
        "fill": real / (self.batch_size * self.max_len),
    }


def measure(model, task: str, *, rank: int, steps: int) -> dict[str, dict]:
  """All CONFIGS on one task. Timed steps run round-robin (one step of each configuration in turn), so load
  from other work on a shared machine falls on every configuration alike."""
  configs = [
      Config(model, task, label=label, pack=pack, batch_size=b, max_len=t, rank=rank, steps=steps)
      for label, pack, b, t in CONFIGS
  ]
  for _ in range(1 + steps):
    for c in configs:
      c.step()
  out = {}
  for c in configs:
    out[c.label] = dict(c.summary(), max_targets=c.max_targets, step_seconds=c.seconds[1:])
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", nargs="+", default=["siqa", "arc_e"])
  p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing_speed.md"))
  args = p.parse_args(argv)

  t_start, load_start = time.time(), os.getloadavg()[0]
  model = models.load("gemma3_270m")
  rows, ratios = [], []
  for task in args.tasks:
    got = measure(model, task, rank=args.rank, steps=args.steps)
    for label, pack, b, t in CONFIGS:
      r = got[label]
      print(
          f"[packing_speed] {task} {label} {b}x{t}: {r['seconds']:.3f} s/step, "
          f"{r['examples']:.1f} examples/step (compile + first step {r['compile_seconds']:.1f} s; timed steps "
          f"{', '.join(f'{x:.2f}' for x in r['step_seconds'])} s)",
          flush=True,
      )
    base = got[CONFIGS[0][0]]["examples_per_s"]
    for label, pack, b, t in CONFIGS:
      r = got[label]
      rows.append(
          [
              task,
              label,
              f"{b} x {t}",
              f"{r['seconds']:.3f}",
              f"{min(r['step_seconds']):.3f}",
              f"{r['real_tokens']:,.0f}",
              f"{100 * r['fill']:.0f}%",
              f"{r['examples']:.1f}",
              f"{r['examples_per_s']:.2f}",
              f"{r['tokens_per_s']:,.0f}",
              f"{r['max_targets']} ({r['max_targets'] // b}/row)",
              f"{r['examples_per_s'] / base:.2f}x",
          ]
      )
    packed, control = got["packed"]["examples_per_s"], got["unpacked (control)"]["examples_per_s"]
    ratios.append(
        f"{task}: packed 8 x 128 trains {packed / base:.2f}x the examples/s of unpacked 8 x 64 and "
        f"{packed / control:.2f}x those of unpacked 8 x 128."
    )

  header = [
      "task",
      "layout",
      "batch x len",
      "s/step",
      "fastest step",
      "real tokens/step",
      "non-pad",
      "examples/step",
      "examples/s",
      "real tokens/s",
      "max_targets",
      "examples/s vs unpacked 8 x 64",
  ]
  text = "".join(
      [
          "# Example packing: real Gemma 3 270M LoRA train step (float32, jit)\n\n",
          f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, {_cpu_name()}, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}. LoRA rank {args.rank} on all 7 projections of 18 layers, Adafactor; "
          f"offline_train data (olmo), shuffle seed 0. Per configuration: one warm-up step (compile), then the "
          f"median of {args.steps} timed steps on new batches, the configurations taking turns step by step; tokens "
          "and examples are means over those batches. "
          "max_targets: the answer positions the step gathers, the most any of this run's batches needs, rounded "
          "up to 8 (packed rows hold several answers: data.max_target_tokens is per row).\n\n",
          results_render.markdown_table(header, rows, align="lllrrrrrrrrr"),
          "\n",
          "\n".join(ratios),
          "\n",
          f"\nWhole run {time.time() - t_start:.0f} s (`python experiments/packing_speed.py --steps {args.steps}`); "
          f"1-minute load average {load_start:.2f} at its start, {os.getloadavg()[0]:.2f} at its end (the step "
          "itself keeps both cores busy: a load well above 2 means other work shared the machine).\n",
      ]
  )
  print(text)
  path = results_render.write_text(args.out, text)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
