"""How long does `lora-squeeze squeeze IN.gguf OUT.gguf --rank R` take on real-sized GGUF LoRAs?

    PYTHONPATH=. python experiments/gguf_squeeze_speed.py [--rank 16] [--repeats 2]

Two adapters, each built as a PEFT adapter (rank 64, lora_alpha 128, all seven projections of every layer,
singular values decaying over ~2 decades) and turned into a GGUF LoRA by `lora-squeeze convert` (float32,
as llama.cpp's converter writes by default):

* Gemma 3 270M-shaped (18 layers, hidden 640, MLP 2048, q 1024 / kv 256 features): ``--arch gemma3``;
* Llama-3-8B-shaped (32 layers, 4096 / 14336 / kv 1024; experiments/peft_squeeze_speed.py's adapter):
  ``--arch llama``.

Times the command end to end in a subprocess (interpreter start, imports, XLA compiles, reading and
writing), first with an empty compile cache (cold) and then reusing it (warm), and checks two sampled
modules of the output against the float64 SVD truncation of the input's (alpha / r) · B @ A. Writes a
markdown table to experiments/results/gguf_squeeze_speed.md (and prints it). The adapters live in a
temporary directory that is deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import gguf
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_squeeze_speed as pss  # pylint: disable=g-import-not-at-top,wrong-import-position

from lora_squeeze import adapters  # pylint: disable=wrong-import-position

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "gguf_squeeze_speed.md"
GEMMA_270M = {
    "q_proj": ("self_attn", 640, 1024),
    "k_proj": ("self_attn", 640, 256),
    "v_proj": ("self_attn", 640, 256),
    "o_proj": ("self_attn", 1024, 640),
    "gate_proj": ("mlp", 640, 2048),
    "up_proj": ("mlp", 640, 2048),
    "down_proj": ("mlp", 2048, 640),
}


def build_270m(directory: Path, rank: int = 64, alpha: int = 128, seed: int = 0) -> None:
  """A PEFT adapter on Gemma 3 270M's shapes (float32), spectra like experiments/peft_squeeze_speed.py's."""
  directory.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  decay = (0.93 ** np.arange(rank)).astype(np.float32)
  tensors = {}
  for layer in range(18):
    for kind, (group, n_in, n_out) in GEMMA_270M.items():
      p = f"base_model.model.model.layers.{layer}.{group}.{kind}"
      tensors[f"{p}.lora_A.weight"] = rng.standard_normal((rank, n_in), dtype=np.float32) / np.float32(math.sqrt(n_in))
      tensors[f"{p}.lora_B.weight"] = rng.standard_normal((n_out, rank), dtype=np.float32) * (np.float32(0.02) * decay)
  adapters.save_safetensors(directory / adapters.WEIGHTS_NAME, tensors, {"format": "pt"})
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": "google/gemma-3-270m",
      "r": rank,
      "lora_alpha": alpha,
      "target_modules": list(GEMMA_270M),
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  (directory / adapters.CONFIG_NAME).write_text(json.dumps(config, indent=2))


def command(*argv: str) -> list[str]:
  return [
      sys.executable,
      "-c",
      "import sys; from lora_squeeze.adapters import main; sys.exit(main(sys.argv[1:]))",
      *argv,
  ]


def check(src: Path, out: Path, names: list[str], rank: int) -> float:
  """Largest relative Frobenius error of the sampled modules' ΔW against the float64 truncation."""

  def read(path):
    r = gguf.GGUFReader(path)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    by = {t.name: t for t in r.tensors}
    out = {}
    for n in names:
      a, b = (np.array(by[f"{n}.lora_{s}"].data, np.float64) for s in ("a", "b"))
      out[n] = (alpha / a.shape[0] * b, a)  # ΔW = (alpha / r) · B @ A, kept as its two factors
    return out

  before, after = read(src), read(out)
  worst = 0.0
  for n in names:
    # numpy float64: QR of both factors, SVD of the r x r core (exact for a rank-r product, and cheap).
    (b, a), (b2, a2) = before[n], after[n]
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    want_b, want_a = qb @ (u[:, :rank] * s[:rank]), vt[:rank] @ qa.T
    # ‖B2 A2 − Bw Aw‖_F from the (r x r) Gram matrices, never forming the (out, in) matrices.
    gb = np.concatenate([b2, -want_b], 1)
    ga = np.concatenate([a2, want_a], 0)
    err2 = np.sum((gb.T @ gb) * (ga @ ga.T))
    worst = max(worst, float(np.sqrt(max(err2, 0.0)) / np.linalg.norm(s[:rank])))
  return worst


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--repeats", type=int, default=2, help="runs of the command per adapter (1st cold)")
  p.add_argument("--tmp", default=None)
  args = p.parse_args()
  load_before = os.getloadavg()
  rows = []
  with tempfile.TemporaryDirectory(prefix="gguf_squeeze_speed.", dir=args.tmp) as tmp:
    tmp = Path(tmp)
    for label, arch, build, sample in (
        ("Gemma 3 270M-shaped", "gemma3", build_270m, ["blk.0.attn_q.weight", "blk.17.ffn_down.weight"]),
        ("Llama-3-8B-shaped", "llama", pss.build_adapter, ["blk.0.attn_q.weight", "blk.31.ffn_down.weight"]),
    ):
      peft = tmp / f"{arch}_peft"
      build(peft)
      src = tmp / f"{arch}.gguf"
      t = time.perf_counter()
      pss.run_measured(command("convert", str(peft), str(src), "--arch", arch))
      convert_s = time.perf_counter() - t
      cache = tmp / f"cache_{arch}"
      for i in range(args.repeats):
        out = tmp / f"{arch}_r{args.rank}.gguf"
        wall, rss, stdout = pss.run_measured(
            command("squeeze", str(src), str(out), "--rank", str(args.rank), "--no-progress", "--force"),
            LORA_SQUEEZE_JAX_CACHE=str(cache),
        )
        err = check(src, out, sample, args.rank)
        rows.append(
            (label, src.stat().st_size, out.stat().st_size, "cold" if i == 0 else "warm", wall, rss, err, convert_s)
        )
        print(
            f"{label}: {wall:.1f} s ({'cold' if i == 0 else 'warm'}), peak RSS {rss / 2**20:.0f} MiB, "
            f"max rel. error {err:.1e}; {stdout.strip().splitlines()[-1]}",
            flush=True,
        )
  load_after = os.getloadavg()
  lines = [
      "# `lora-squeeze squeeze IN.gguf OUT.gguf` on real-sized GGUF LoRAs",
      "",
      f"{datetime.date.today()}, `python experiments/gguf_squeeze_speed.py --rank {args.rank} --repeats "
      f"{args.repeats}`. Machine: {pss.cpu_model()}, {os.cpu_count()} CPU cores, {platform.system()} "
      f"{platform.release()}; Python {platform.python_version()}, jax {jax.__version__}, gguf "
      f"{gguf.__version__ if hasattr(gguf, '__version__') else '0.19.0'}. Load average (1 min) {load_before[0]:.2f} "
      f"before, {load_after[0]:.2f} after (the machine was shared with other jobs).",
      "",
      "Each adapter: rank 64, lora_alpha 128, all seven projections of every layer, float32 GGUF written by "
      "`lora-squeeze convert` (byte-identical to llama.cpp's converter on the test fixture). Wall time of the "
      "whole command (start-up, imports, compiles, I/O); cold = empty XLA compile cache. Error: largest "
      "relative Frobenius error of two sampled modules' llama.cpp ΔW = (alpha/r)·B@A against numpy's "
      "float64 truncation of the input's.",
      "",
      f"| adapter | GGUF in | GGUF out (r={args.rank}) | run | wall time | peak RSS | max rel. error | convert PEFT->GGUF |",
      "|---|---:|---:|---|---:|---:|---:|---:|",
  ]
  for label, in_b, out_b, run, wall, rss, err, conv in rows:
    lines.append(
        f"| {label} | {in_b / 2**20:.1f} MiB | {out_b / 2**20:.1f} MiB | {run} | {wall:.1f} s | "
        f"{rss / 2**20:.0f} MiB | {err:.1e} | {conv:.1f} s |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(text)


if __name__ == "__main__":
  main()
