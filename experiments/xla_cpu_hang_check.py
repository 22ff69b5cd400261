"""Re-check the XLA:CPU wedge that kept the one-device rank change out of one jitted program (README, "Known
platform issues"): with jaxlib 0.10.0 an executable that batched several squeezes (vmapped, batch >= 2), or that
mixed threefry draws with the LAPACK calls of the small factorisations, never returned on its second run.

Each case runs in its own subprocess under a timeout (a wedged run is killed, never waited on), and runs its
compiled executable ``--repeats`` times:

* ``batched_efficient``: the efficient squeeze of 2 and 4 same-shape modules batched into one program
  (``jax.vmap`` of squeeze.py's one-module ``_squeeze_matrices``; the library itself runs one module per program);
* ``threefry_lapack``: one program drawing with jax.random (threefry) and running QR/Cholesky/SVD, batch 2;
* ``whole_tree_change``: train.Trainer's rank change of the whole tiny model (all modules, each squeeze side by
  side in one jitted program), 8 -> 4 -> 2, on one device;
* ``whole_tree_change_270m_shapes``: the same program on the real 270M's LoRA shapes (random factors, no
  weights loaded), 16 -> 8.

  python experiments/xla_cpu_hang_check.py [--timeout 240 --repeats 5]
writes experiments/results/xla_cpu_hang_check.md (+ .json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("batched_efficient", "threefry_lapack", "whole_tree_change", "whole_tree_change_270m_shapes")
# (case, LORA_SQUEEZE_LAPACK_THREADS): "1" is what `import lora_squeeze` sets; "0" leaves scipy's OpenBLAS at
# its own thread count (the setting under which the wedge was first seen, before that limit existed).
RUNS = tuple((c, "1") for c in CASES) + (("batched_efficient", "0"), ("threefry_lapack", "0"))


def _case(name: str, repeats: int) -> None:
  """Runs one case in this process (the child)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lora_squeeze import squeeze  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  if name == "batched_efficient":
    for g in (2, 4):
      a = jnp.asarray(rng.standard_normal((g, 640, 16)), jnp.float32)
      b = jnp.asarray(rng.standard_normal((g, 16, 1024)), jnp.float32)
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(g))
      one = functools.partial(squeeze._squeeze_matrices, rank=8, method="efficient", oversample=10, power_iters=2)  # pylint: disable=protected-access
      batched = jax.jit(jax.vmap(one))
      for _ in range(repeats):
        jax.block_until_ready(batched(a, b, keys))
  elif name == "threefry_lapack":

    @jax.jit
    def f(key, x):
      noise = jax.random.normal(key, x.shape, x.dtype)
      q, r = jnp.linalg.qr(x + noise)
      c = jnp.linalg.cholesky(jnp.einsum("gmi,gmj->gij", q, q) + jnp.eye(x.shape[-1]))
      return jnp.linalg.svd(r @ c, compute_uv=True)

    x = jnp.asarray(rng.standard_normal((2, 256, 16)), jnp.float32)
    for i in range(repeats):
      jax.block_until_ready(f(jax.random.key(i), x))
  else:
    from lora_squeeze import lora as lora_lib  # pylint: disable=g-import-not-at-top
    from lora_squeeze import models  # pylint: disable=g-import-not-at-top

    model_name, ranks = ("tiny", (8, 4, 2)) if name == "whole_tree_change" else ("gemma3_270m", (16, 8))
    model_config = models.model_config(model_name) if model_name != "tiny" else models.load("tiny").config
    cfg = lora_lib.LoRAConfig(rank=ranks[0])
    params = lora_lib.init_lora(jax.random.key(0), model_config, cfg)
    # Trained-looking factors: b non-zero (a fresh LoRA's b is zero: every direction would be "dead").
    params = jax.tree.map(lambda x: x + 0.01 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    change = jax.jit(
        lambda p, key, rank: lora_lib.change_rank(p, rank, cfg, method="efficient", key=key)[0],
        static_argnames=("rank",),
    )
    for i in range(repeats):
      p = params
      for r in ranks[1:]:
        p = jax.block_until_ready(change(p, jax.random.key(i), rank=r))
  print("ok", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--timeout", type=float, default=240.0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--case", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "xla_cpu_hang_check.md"))
  args = p.parse_args(argv)
  if args.case:
    _case(args.case, args.repeats)
    return 0
  import jaxlib  # pylint: disable=g-import-not-at-top

  rows = []
  for name, threads in RUNS:
    t = time.perf_counter()
    cmd = [sys.executable, __file__, "--case", name, "--repeats", str(args.repeats)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_SQUEEZE_LAPACK_THREADS=threads)
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
      status = "ok" if proc.returncode == 0 and "ok" in proc.stdout else f"failed (exit {proc.returncode})"
      detail = "" if status == "ok" else proc.stderr.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
      status, detail = f"WEDGED (no return within {args.timeout:.0f} s, killed)", ""
    rows.append(
        {
            "case": name,
            "lapack_threads": threads,
            "status": status,
            "seconds": time.perf_counter() - t,
            "detail": detail,
        }
    )
    print(rows[-1], flush=True)
  load = os.getloadavg()
  machine = (
      f"{platform.node()}, {os.cpu_count()} CPU cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
      f"(1/5/15 min) at the end, jaxlib {jaxlib.__version__}, Python {platform.python_version()}"
  )
  lines = [
      "# XLA:CPU wedge re-check (batched squeezes, threefry + LAPACK, whole-tree rank change)",
      "",
      f"Machine: {machine}. Each case in its own process, its executable run {args.repeats} times, "
      f"killed after {args.timeout:.0f} s. Cases: see `experiments/xla_cpu_hang_check.py`.",
      "",
      "| case | LORA_SQUEEZE_LAPACK_THREADS | result | seconds (process, incl. compile) |",
      "|---|---|---|---:|",
  ]
  lines += [
      f"| {r['case']} | {r['lapack_threads']} ({'one thread' if r['lapack_threads'] == '1' else 'OpenBLAS default'})"
      f" | {r['status']} | {r['seconds']:.1f} |"
      for r in rows
  ]
  text = "\n".join(lines) + "\n"
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
  print(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
