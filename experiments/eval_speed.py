"""Choice scoring on the real Gemma 3 270M: our tree-packed, answer-logits-only scorer vs the usual one.

Baseline ("one row per choice, full logits"): every (example, choice) is its own padded row (prompt +
choice), run through gemma's ``__call__`` (vocabulary logits at every position), batched 8 rows at a time
with the same power-of-two length buckets; the choice's log-probabilities are read from those logits.
Ours (``evaluate.ChoiceScorer``): one row per example holding the prompt once and every choice behind a
tree mask, logits only at the positions that predict a choice token.

Work in the vocabulary projection = rows of logits computed x 2·D·V FLOPs; the table gives both counts.
Wall times are the second pass over the same examples (the first pass compiles every bucket for both).
Both scorers must agree (max |Δ log-prob| and identical predictions are reported).

  python experiments/eval_speed.py [--tasks arc_e hellaswag --limit 48]
writes experiments/results/eval_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_squeeze import data  # noqa: E402
from lora_squeeze import evaluate  # noqa: E402
from lora_squeeze import models  # noqa: E402
from lora_squeeze import fileio  # noqa: E402
from lora_squeeze.data import pipeline  # noqa: E402


class Baseline:
  """One padded row per (example, choice), full-vocabulary logits at every position."""

  def __init__(self, model, *, max_len: int, batch_rows: int = 8):
    self.model, self.max_len, self.batch_rows = model, max_len, batch_rows
    self._logp = jax.jit(self._logp_impl)
    self.logit_rows = 0

  def _logp_impl(self, params, tokens, loss_mask):
    logits = self.model.transformer.apply({"params": params}, tokens).logits  # (B, T, V) at every position
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    tok_logp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    return (tok_logp * loss_mask[:, 1:]).sum(-1)

  def score(self, examples):
    rows = []
    for i, ex in enumerate(examples):
      for k, choice in enumerate(ex.choices):
        enc = pipeline.encode_example(ex, self.model.tokenizer, self.max_len, continuation=choice, add_eos=False)
        rows.append((i, k, enc))
    rows.sort(key=lambda r: -len(r[2]["tokens"]))
    sums = [np.zeros(len(ex.choices)) for ex in examples]
    for start in range(0, len(rows), self.batch_rows):
      chunk = rows[start : start + self.batch_rows]
      t = evaluate.pow2(max(len(r[2]["tokens"]) for r in chunk))
      tokens = np.zeros((self.batch_rows, t), np.int32)
      mask = np.zeros((self.batch_rows, t), np.float32)
      for j, (_, _, enc) in enumerate(chunk):
        n = len(enc["tokens"])
        tokens[j, :n], mask[j, :n] = enc["tokens"], enc["loss_mask"]
      self.logit_rows += self.batch_rows * t
      out = np.asarray(self._logp(self.model.params, tokens, mask))
      for j, (i, k, _) in enumerate(chunk):
        sums[i][k] = out[j]
    return sums


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", nargs="+", default=["arc_e", "hellaswag"])
  p.add_argument("--limit", type=int, default=48)
  p.add_argument("--max-len", type=int, default=512)
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.md"))
  args = p.parse_args(argv)
  model = models.load("gemma3_270m")
  d, v = model.config.embed_dim, model.config.num_embed
  lines = [
      "# Choice scoring on the real Gemma 3 270M: tree-packed + answer-only logits vs one row per choice",
      "",
      f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
      f"{jax.devices()[0].platform}. First {args.limit} examples of each task's offline held-out part, "
      f"max_len {args.max_len}, 8 rows per forward; timings are the second (compiled) pass. Projection "
      f"FLOPs = logit rows x 2·{d}·{v:,}.",
      "",
      "| task | examples | choices | baseline logit rows | ours logit rows | projection work ratio | "
      "baseline s | ours s | speed-up | max abs Δ log-prob | same predictions |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for task in args.tasks:
    examples = data.eval_examples(task, "offline_heldout", limit=args.limit)
    scorer = evaluate.ChoiceScorer(model, max_len=args.max_len, batch_rows=8)
    base = Baseline(model, max_len=args.max_len)
    scorer.score(examples)
    base.score(examples)  # compile every bucket
    base.logit_rows = 0
    scorer.logit_rows = 0
    t = time.perf_counter()
    ours = scorer.score(examples)
    t_ours = time.perf_counter() - t
    ours_rows = scorer.logit_rows
    t = time.perf_counter()
    ref = base.score(examples)
    t_base = time.perf_counter() - t
    diff = max(float(np.abs(o[0] - r).max()) for o, r in zip(ours, ref))
    same = sum(int(np.argmax(o[0]) == np.argmax(r)) for o, r in zip(ours, ref))
    n_choices = sum(len(ex.choices) for ex in examples)
    lines.append(
        f"| {task} | {len(examples)} | {n_choices} | {base.logit_rows:,} | {ours_rows:,} | "
        f"{base.logit_rows / ours_rows:.1f}x | {t_base:.1f} | {t_ours:.1f} | {t_base / t_ours:.2f}x | "
        f"{diff:.1e} | {same}/{len(examples)} |"
    )
    print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(out, text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
