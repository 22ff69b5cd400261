"""The run modes that train nothing: Post-Squeeze (a finished adapter squeezed to each target rank and
evaluated) and zero-shot (the base model alone, evaluated: the paper's "0-S" column). ``train.run`` hands
them their locked workdir; each writes ``result.json`` like a training run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from lora_squeeze import checkpoints
from lora_squeeze import data
from lora_squeeze import evaluate
from lora_squeeze import fileio
from lora_squeeze import lora as lora_lib
from lora_squeeze import rank_rules
from lora_squeeze import squeeze as squeeze_lib
from lora_squeeze import trainer as trainer_lib
from lora_squeeze import workdir as workdir_lib


def evaluate_adapter(config, model, lora_params, lora_config, evaluate_fn: Callable | None = None) -> dict:
  """The final metrics of an adapter (None: the base model alone): ``evaluate_fn(model, lora_params,
  lora_config)`` if given, else, when ``config.eval.enabled``, ``evaluate.evaluate_examples`` on the
  evaluation set of ``config.data`` (``data.eval_set``: at most ``config.eval.limit`` examples, 0 = all),
  else {}."""
  if evaluate_fn is not None:
    return evaluate_fn(model, lora_params, lora_config)
  eval_cfg = config.get("eval", None)
  if not eval_cfg or not eval_cfg.get("enabled", False):
    return {}
  task, split, examples = data.eval_set(config.data, limit=int(eval_cfg.get("limit", 0) or 0) or None)
  metrics = evaluate.evaluate_examples(
      model,
      task,
      examples,
      lora_params=lora_params,
      lora_config=lora_config,
      max_len=int(eval_cfg.get("max_len", 0) or config.data.max_len),
      batch_rows=int(eval_cfg.get("batch_size", 8)),
  )
  metrics["split"] = split
  return metrics


def run_post_squeeze(config, workdir: Path, *, evaluate_fn) -> dict:
  """Squeeze the source adapter to each target rank and evaluate; no training."""
  t_start = time.time()
  source_params, source_cfg, source_meta = checkpoints.load_adapter(
      Path(config.source_workdir) / checkpoints.ADAPTER_DIR
  )
  model = trainer_lib.load_eval_model(config)
  spectra = squeeze_lib.lora_spectra(source_params)
  per_rank = {}
  for i, r in enumerate(sorted({int(r) for r in config.target_ranks}, reverse=True)):
    params, new_cfg = lora_lib.change_rank(
        source_params, r, source_cfg, method=config.squeeze.method, key=trainer_lib.stage_key(int(config.seed), i)
    )
    retention = float(np.mean([float(rank_rules.retention(s, r)) for s in spectra.values()]))
    metrics = evaluate_adapter(config, model, params, new_cfg, evaluate_fn)
    per_rank[str(r)] = {"rank": r, "retention_mean": retention, "metrics": metrics}
    if config.get("save_adapters", False):
      checkpoints.save_adapter(
          workdir / f"{checkpoints.ADAPTER_DIR}_r{r}", params, new_cfg, extra={"mode": "post_squeeze"}
      )
  result = {
      "mode": "post_squeeze",
      "model": config.model,
      "task": config.data.get("task", None),
      "seed": int(config.seed),
      "source_workdir": str(config.source_workdir),
      "source_rank": lora_lib.describe_ranks(lora_lib.lora_ranks(source_params)),
      "targets": per_rank,
      "method": config.squeeze.method,
      "steps": 0,
      "wall_seconds": time.time() - t_start,
  }
  if jax.process_index() == 0:
    fileio.atomic_write_text(workdir / workdir_lib.RESULT_NAME, json.dumps(result, indent=2))
  return result


def run_zero_shot(config, workdir: Path, *, evaluate_fn) -> dict:
  """The base model without any adapter, evaluated (the paper's "0-S" column)."""
  t_start = time.time()
  model = trainer_lib.load_eval_model(config)
  metrics = evaluate_adapter(config, model, None, None, evaluate_fn)
  result = {
      "mode": "zero_shot",
      "model": config.model,
      "task": config.data.get("task", None),
      "seed": int(config.seed),
      "final_rank": 0,
      "steps": 0,
      "metrics": metrics,
      "wall_seconds": time.time() - t_start,
  }
  if jax.process_index() == 0:
    fileio.atomic_write_text(workdir / workdir_lib.RESULT_NAME, json.dumps(result, indent=2))
  return result
