"""In-Squeeze's overhead: an 8-stage ladder (128 → 64 → … → 1) against a direct run with the same total
steps, both on the real Gemma 3 270M with the offline ARC-E training part (no evaluation: training only),
with the coming stages' programs compiled in a background thread (``config.background_compile``, issue 19)
and without.

Each run is a real ``python -m lora_squeeze.main`` subprocess; ``result.json["timing"]`` breaks the time
down per stage: each boundary (end of stage k's last step to end of stage k+1's first step: the stage-end
checkpoint, the rank change, its checkpoint, the first step), the steady steps, and the programs compiled in
the background (when, how long, how long the loop waited for them).

All timed runs use one persistent XLA compile cache that a first, untimed run filled (``--cache``; the
``fill`` run compiles every program of the ladder): what a sweep's second and later cells see, and the case
issue 19 is about (a stage's first step still took 7-10 s there: tracing, lowering and loading the program).

Per In-Squeeze run and boundary: the stall = boundary seconds minus one steady step (that of the stage
before the boundary, or the nearest earlier stage with steady steps). The slowdown of steady steps while a
compile runs beside them: each stage's steady s/step with the background compile against the same stage
without it, with the share of that stage's steady time a compile was running. The end-to-end ratio: train
loop seconds of In-Squeeze over direct, at the given step counts.

  python experiments/insqueeze_overhead.py [--steps 32,128 --batch 4 --max-len 64 --cache DIR]
writes experiments/results/insqueeze_overhead.md and .json (raw timings; --from-raw re-makes the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_squeeze import fileio  # noqa: E402

MODES = ("direct", "in_off", "in_on")
LABELS = {
    "direct": "direct r128",
    "in_off": "In-Squeeze, no background compile",
    "in_on": "In-Squeeze, background compile",
}


def _run(mode: str, workdir: Path, *, steps: int, batch: int, max_len: int, cache: str) -> dict:
  in_squeeze = mode.startswith("in")
  config = ROOT / "configs" / ("in_squeeze.py" if in_squeeze else "direct.py")
  arg = f"src=128,tgt=1,steps={steps},extra=0,runlocal" if in_squeeze else f"rank=128,steps={steps},runlocal"
  env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_SQUEEZE_JAX_CACHE=cache)
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      f"--config={config}:{arg}",
      f"--workdir={workdir}",
      "--config.eval.enabled=False",
      "--config.progress=False",
      f"--config.background_compile={mode != 'in_off'}",
      f"--config.data.batch_size={batch}",
      f"--config.data.max_len={max_len}",
      "--config.data.max_target_tokens=16",
      "--config.checkpoint_every=100000",
      "--config.log_every=8",
  ]
  t = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
  result = json.loads((workdir / "result.json").read_text())
  result["process_wall_seconds"] = wall
  return result


def _machine() -> str:
  load = os.getloadavg()
  cpu = ""
  try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (
      f"{platform.node()}, {os.cpu_count()} CPU cores ({cpu or 'unknown CPU'}), load average "
      f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"
  )


def _per_step(stage) -> float | None:
  return stage["steady_seconds"] / stage["steady_steps"] if stage.get("steady_steps", 0) > 0 else None


def _overlap(window, compiles) -> float:
  """Seconds of ``window`` ([start, end]) during which a background compile was running."""
  if not window:
    return 0.0
  lo, hi = window
  return sum(max(0.0, min(hi, c["end"]) - max(lo, c["start"])) for c in compiles if c.get("start") is not None)


def boundaries(timing) -> list[dict]:
  """Per boundary of one In-Squeeze run: ranks, boundary seconds and its parts, stall."""
  stages = timing["stages"]
  out, last_step = [], None
  for prev, stage in zip(stages, stages[1:]):
    last_step = _per_step(prev) or last_step
    if stage.get("boundary_seconds") is None:
      continue
    waited = sum(
        c["waited"] for c in timing.get("background_compile", []) if c["program"].endswith(f"r{stage['rank']}")
    )
    out.append(
        {
            "from": prev["rank"],
            "to": stage["rank"],
            "boundary": stage["boundary_seconds"],
            "save": stage["save_seconds"],
            "change": stage["change_seconds"],
            "first_step": stage["first_step_seconds"],
            "waited": waited,
            "steady_step": last_step,
            "stall": stage["boundary_seconds"] - last_step,
        }
    )
  return out


def report(raw: dict) -> str:
  runs = {(r["steps"], r["mode"]): r for r in raw["runs"]}
  step_counts = sorted({s for s, _ in runs})
  lines = [
      "# In-Squeeze stage boundaries with and without background compilation (real Gemma 3 270M)",
      "",
      f"Machine: {raw['machine']} (at the start of the timed runs; at the end: {raw['machine_end']}). "
      f"Python {raw['python']}, jax {raw['jax']}. Batch {raw['batch']} x {raw['max_len']} tokens, offline ARC-E "
      "training part, Adafactor, ladder 128 → 64 → … → 1 (standard scheme: steps ∝ rank, at least 1 per stage), "
      "direct = rank 128 for the same steps, no evaluation. Each run a separate `python -m lora_squeeze.main` "
      "process on one persistent XLA compile cache filled by an untimed first run (warm cache); times from its "
      f"`result.json` timing. {raw.get('note', '')}".rstrip(),
      "",
      "## End to end",
      "",
      "| steps | run | train-loop s | run wall s (`train.run`, model load incl.) | steady s/step (median over stages) "
      "| ratio train loop vs direct | ratio run wall vs direct | load average after the run |",
      "|---:|---|---:|---:|---:|---:|---:|---|",
  ]
  for steps in step_counts:
    d = runs.get((steps, "direct"))
    for mode in MODES:
      r = runs.get((steps, mode))
      if r is None:
        continue
      tm = r["timing"]
      ratio = tm["train_seconds"] / d["timing"]["train_seconds"] if d else float("nan")
      wall_ratio = r["run_wall_seconds"] / d["run_wall_seconds"] if d else float("nan")
      load = r.get("machine_after", "").rpartition("load average ")[2]
      lines.append(
          f"| {steps} | {LABELS[mode]} | {tm['train_seconds']:.1f} | {r['run_wall_seconds']:.1f} | "
          f"{tm['steady_step_seconds']:.3f} | {ratio:.3f} | {wall_ratio:.3f} | {load} |"
      )
  lines += [
      "",
      "## Each stage boundary",
      "",
      "Boundary = end of stage k's last step to end of stage k+1's first step (stage-end checkpoint + rank change + "
      "its checkpoint + first step, incl. any wait for a background compile); stall = boundary − one steady step "
      "(the stage before's, or the nearest earlier stage's).",
      "",
      "| steps | run | boundary | boundary s | checkpoints s | rank change s | first step s | waited for bg compile s | "
      "stall s |",
      "|---:|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for steps in step_counts:
    for mode in ("in_off", "in_on"):
      r = runs.get((steps, mode))
      if r is None:
        continue
      bs = boundaries(r["timing"])
      for b in bs:
        lines.append(
            f"| {steps} | {LABELS[mode]} | r{b['from']} → r{b['to']} | {b['boundary']:.2f} | {b['save']:.2f} | "
            f"{b['change']:.2f} | {b['first_step']:.2f} | {b['waited']:.2f} | {b['stall']:.2f} |"
        )
      if bs:
        stalls = [b["stall"] for b in bs]
        lines.append(
            f"| {steps} | {LABELS[mode]} | **all {len(bs)}** | {sum(b['boundary'] for b in bs):.2f} | "
            f"{sum(b['save'] for b in bs):.2f} | {sum(b['change'] for b in bs):.2f} | "
            f"{sum(b['first_step'] for b in bs):.2f} | {sum(b['waited'] for b in bs):.2f} | "
            f"{sum(stalls):.2f} (median {statistics.median(stalls):.2f}) |"
        )
  lines += [
      "",
      "## Steady steps while a compile runs beside them",
      "",
      "Per stage with at least 2 steady steps: steady s/step without and with the background compile, and the share "
      "of the stage's steady time during which a background compile was running (both compete for the 2 cores).",
      "",
      "| steps | stage | s/step, no bg compile | s/step, bg compile | slowdown | compile running (share of steady time) |",
      "|---:|---|---:|---:|---:|---:|",
  ]
  for steps in step_counts:
    off, on = runs.get((steps, "in_off")), runs.get((steps, "in_on"))
    if not (off and on):
      continue
    compiles = on["timing"].get("background_compile", [])
    for s_off, s_on in zip(off["timing"]["stages"], on["timing"]["stages"]):
      if s_off.get("steady_steps", 0) < 2 or s_on.get("steady_steps", 0) < 2:
        continue
      a, b = _per_step(s_off), _per_step(s_on)
      share = _overlap(s_on.get("steady_window"), compiles) / max(s_on["steady_seconds"], 1e-9)
      lines.append(f"| {steps} | r{s_on['rank']} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {share:.0%} |")
  for steps in step_counts:
    on = runs.get((steps, "in_on"))
    if on is None:
      continue
    cs = on["timing"].get("background_compile", [])
    lines += [
        "",
        f"Background compiles of the {steps}-step run (program: compile s, start–end s after the loop began, loop "
        "waited s): "
        + "; ".join(
            f"{c['program']}: {c['seconds']:.1f}, {c['start']:.1f}–{c['end']:.1f}, {c['waited']:.2f}" for c in cs
        ),
    ]
  lines += ["", raw.get("conclusion", "").strip()]
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", default="32", help="step counts, comma-separated (each: direct + both In-Squeeze)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--max-len", type=int, default=64)
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--cache", default="", help="persistent compile cache dir (default: a fresh temporary one)")
  p.add_argument("--no-fill", action="store_true", help="the cache is already filled: skip the untimed first run")
  p.add_argument("--fill-only", action="store_true", help="only fill the cache (untimed), then exit")
  p.add_argument("--append", action="store_true", help="add these runs to the existing raw JSON")
  p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "insqueeze_overhead.md"))
  p.add_argument("--from-raw", default="", help="re-make the table from a saved raw timings JSON (no runs)")
  p.add_argument("--conclusion", default="", help="a paragraph appended to the table (what the numbers say)")
  args = p.parse_args(argv)
  out = Path(args.out)
  raw_path = out.with_suffix(".json")
  if args.from_raw:
    raw = json.loads(Path(args.from_raw).read_text())
  else:
    import jax  # pylint: disable=g-import-not-at-top

    steps_list = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
      cache = args.cache or str(Path(tmp) / "xla_cache")
      if not args.no_fill:
        t = time.perf_counter()
        _run("in_off", Path(tmp) / "fill", steps=32, batch=args.batch, max_len=args.max_len, cache=cache)
        print(f"cache filled in {time.perf_counter() - t:.0f} s", flush=True)
      if args.fill_only:
        return 0
      raw = {
          "machine": _machine(),
          "python": platform.python_version(),
          "jax": jax.__version__,
          "batch": args.batch,
          "max_len": args.max_len,
          "runs": [],
      }
      if args.append and raw_path.exists():
        raw = dict(json.loads(raw_path.read_text()), machine_end=raw["machine"])
      for steps in steps_list:
        for mode in args.modes.split(","):
          r = _run(
              mode, Path(tmp) / f"{steps}_{mode}", steps=steps, batch=args.batch, max_len=args.max_len, cache=cache
          )
          raw["runs"] = [x for x in raw["runs"] if (x["steps"], x["mode"]) != (steps, mode)]
          raw["runs"].append(
              {
                  "steps": steps,
                  "mode": mode,
                  "timing": r["timing"],
                  "run_wall_seconds": r["wall_seconds"],
                  "process_wall_seconds": r["process_wall_seconds"],
                  "machine_after": _machine(),
              }
          )
          raw["machine_end"] = _machine()
          fileio.atomic_write_text(raw_path, json.dumps(raw, indent=2))  # each run kept as soon as it ends
          print(steps, mode, f"train {r['timing']['train_seconds']:.1f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
  if args.conclusion:
    raw["conclusion"] = args.conclusion
  fileio.atomic_write_text(raw_path, json.dumps(raw, indent=2))
  text = report(raw)
  print(text)
  fileio.atomic_write_text(out, text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
