"""What a training run reports while it runs: ``metrics.jsonl``, TensorBoard scalars, the progress bar, and
the timing summary of ``result.json``.

The train loop queues each step's metrics as it runs (``StepLog.add``: device arrays, no host sync) and writes
them in batches (``StepLog.flush``: one ``device_get`` every ``config.log_every`` steps, at each checkpoint
and after each stage's first step). A flush is also where a non-finite loss or update is seen: it raises
``NonFiniteStep`` and the loop decides what to do with the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import auto as tqdm

from lora_squeeze import fileio

METRICS_NAME = "metrics.jsonl"
SCALARS = ("loss", "lr", "rank", "grad_norm", "steps_per_s", "tokens_per_s")


@dataclasses.dataclass(frozen=True)
class Step:
  """One step's record before its metrics reach the host."""

  global_step: int
  stage_step: int
  learning_rate: float
  tokens: int  # real (non-padding) tokens of the batch
  metrics: Any  # the train step's metric arrays (on device)


class NonFiniteStep(FloatingPointError):
  """A step whose loss, or whose updated parameters, are not finite."""

  def __init__(self, step: Step, loss: float):
    self.step, self.loss = step, loss
    self.loss_is_finite = math.isfinite(loss)
    what = "parameters after the update" if self.loss_is_finite else f"loss {loss}"
    super().__init__(f"non-finite {what} at step {step.global_step}")
    self.what = what


class StepLog:
  """``workdir/metrics.jsonl`` (appended by process 0; on resume, lines past the restored step are dropped),
  TensorBoard scalars (``tensorboard``, process 0) and a progress bar (``progress``, process 0)."""

  def __init__(
      self, workdir: Path, *, resume_step: int, total_steps: int, primary: bool, progress: bool, tensorboard: bool
  ):
    self.path = Path(workdir) / METRICS_NAME
    self.primary = primary
    if primary and self.path.exists():
      keep = [
          line
          for line in self.path.read_text().splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]
      fileio.atomic_write_text(self.path, "".join(line + "\n" for line in keep))
    self.progress = _progress_bar(total_steps, resume_step, enabled=progress and primary)
    self.writer = _tensorboard_writer(workdir, enabled=tensorboard and primary)
    self.pending: list[Step] = []
    self.stage_losses: dict[int, float] = {}
    self._clock = (time.time(), 0)  # (when, stage step) of the last flush: the rates are measured from there

  def restart_clock(self, when: float, stage_step: int) -> None:
    self._clock = (when, stage_step)

  def add(self, step: Step) -> None:
    self.pending.append(step)

  def flush(self, stage, n_stages: int) -> None:
    """Fetches the queued steps' metrics and writes them; raises ``NonFiniteStep`` at the first bad one."""
    if not self.pending:
      return
    fetched = jax.device_get([p.metrics for p in self.pending])
    now = time.time()
    elapsed = max(now - self._clock[0], 1e-9)
    rate = (self.pending[-1].stage_step - self._clock[1]) / elapsed
    tokens_rate = sum(p.tokens for p in self.pending) / elapsed
    for p, mv in zip(self.pending, fetched):
      loss = float(mv["loss"])
      if not math.isfinite(loss) or not bool(mv["params_finite"]):
        raise NonFiniteStep(p, loss)
      record = {
          "step": p.global_step,
          "stage": stage.index,
          "rank": stage.rank,
          "stage_step": p.stage_step,
          "lr": p.learning_rate,
          "loss": loss,
          "targets": int(mv["targets"]),
          "grad_norm": float(mv["grad_norm"]),
          "steps_per_s": rate,
          "tokens_per_s": tokens_rate,
      }
      self._write(record)
    last = float(fetched[-1]["loss"])
    self.stage_losses[stage.index] = last
    self.progress.update(len(self.pending))
    self.progress.set_postfix(
        stage=f"{stage.index + 1}/{n_stages}",
        rank=stage.rank,
        loss=f"{last:.4f}",
        steps_s=f"{rate:.2f}",
        tok_s=f"{tokens_rate:,.0f}",
    )
    self._clock = (now, self.pending[-1].stage_step)
    self.pending.clear()

  def _write(self, record: Mapping[str, Any]) -> None:
    if self.writer is not None:
      self.writer.write_scalars(record["step"], {k: record[k] for k in SCALARS})
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    self.progress.close()
    if self.writer is not None:
      self.writer.flush()


def _tensorboard_writer(workdir: Path, *, enabled: bool):
  """clu's TensorBoard SummaryWriter on ``workdir/tensorboard`` (imports TensorFlow: only when enabled)."""
  if not enabled:
    return None
  from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top  (heavy: TensorFlow)

  return summary_writer.SummaryWriter(os.fspath(Path(workdir) / "tensorboard"))


def _progress_bar(total: int, initial: int, *, enabled: bool):
  return tqdm.tqdm(
      total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=1.0, desc="train"
  )


def timing_summary(
    timing: Mapping[int, Mapping[str, Any]], train_seconds: float, precompiler=None, t_loop: float = 0.0
) -> dict[str, Any]:
  """Where the train loop's time went (this process's run; a resumed run counts only its own part).

  ``background_compile``: the programs compiled ahead (``Trainer.precompile``), each with its compile
  seconds, its start/end in seconds since the loop started, and how long the loop waited for it; stages
  carry ``steady_window`` (the same clock), so a compile's overlap with steady steps can be measured."""
  stages = [dict(v, stage=k) for k, v in sorted(timing.items())]
  steady = [s["steady_seconds"] / s["steady_steps"] for s in stages if s.get("steady_steps", 0) > 0]
  compiles = []
  for e in precompiler.log if precompiler is not None else []:
    compiles.append(
        {
            "program": e["program"],
            "seconds": e["seconds"],
            "start": None if e["start"] is None else e["start"] - t_loop,
            "end": None if e["end"] is None else e["end"] - t_loop,
            "waited": e["waited"],
            "error": e["error"],
        }
    )
  return {
      "train_seconds": train_seconds,
      "stages": stages,
      "steady_step_seconds": float(np.median(steady)) if steady else None,
      "background_compile": compiles,
  }
