"""Grids of runs with a resumable results store (one atomically written JSON per cell).

A sweep is a config whose ``sweep`` field lists cells: ``{"name": ..., "overrides": {dotted.key: value}}``
applied to the config itself (big_vision's "hyper" sweeps, kept beside the config they vary). A value
``"@other_cell"`` names another cell's workdir (a Post- / Cont-Squeeze cell reusing its source run's
adapter instead of retraining it); such cells run after their sources.

  python -m lora_squeeze.sweep --config=configs/quickstart.py --workdir=DIR            # all cells, in order
  python -m lora_squeeze.sweep --config=configs/quickstart.py --workdir=DIR --cell=X   # one cell (launchers)
  python -m lora_squeeze.sweep --config=configs/quickstart.py --workdir=DIR --list       # "NAME [SOURCES]"
  bash launch/sweep.sh local|slurm|tpu CONFIG DIR ...                                   # one launch per cell

Layout: ``DIR/cells/NAME/`` is the cell's run workdir (train.run: checkpoints, metrics.jsonl, result.json,
adapter) and ``DIR/results/NAME.json`` its record: ``{"name", "status": "ok"|"error", "overrides",
"result" | "error", "seconds"}``. A rerun skips cells whose record says ok (an interrupted cell resumes from
its checkpoints); a failing cell records its error (with traceback) and the sweep goes on.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from lora_squeeze import train


def _deps(cell: Mapping[str, Any]) -> list[str]:
  return [v[1:] for v in dict(cell.get("overrides", {})).values() if isinstance(v, str) and v.startswith("@")]


def cells_of(config) -> list[dict[str, Any]]:
  """The config's cells, checked: unique names, known sources, sources before their users."""
  cells = [dict(c) for c in config.get("sweep", ())]
  if not cells:
    raise ValueError("sweep: the config has no 'sweep' cells")
  names = [c["name"] for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep: duplicate cell names in {names}")
  order, done = [], set()
  by_name = {c["name"]: c for c in cells}
  for c in cells:
    for d in _deps(c):
      if d not in by_name:
        raise ValueError(f"sweep: cell {c['name']!r} refers to unknown cell '@{d}'")

  def visit(c, stack=()):
    if c["name"] in done:
      return
    if c["name"] in stack:
      raise ValueError(f"sweep: cycle through {c['name']!r}")
    for d in _deps(c):
      visit(by_name[d], stack + (c["name"],))
    done.add(c["name"])
    order.append(c)

  for c in cells:
    visit(c)
  return order


def cell_config(config, cell: Mapping[str, Any], sweep_dir: Path) -> ml_collections.ConfigDict:
  """The run config of one cell: a copy of ``config`` without the sweep, with the overrides applied."""
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  if "sweep" in c:
    del c["sweep"]
  for key, value in dict(cell.get("overrides", {})).items():
    if isinstance(value, str) and value.startswith("@"):
      value = str(sweep_dir / "cells" / value[1:])
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise KeyError(f"sweep cell {cell['name']!r}: unknown config key {key!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"sweep cell {cell['name']!r}: unknown config key {key!r}")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def _write_json(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  train.atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def record_path(sweep_dir: Path, name: str) -> Path:
  return Path(sweep_dir) / "results" / f"{name}.json"


def load_results(sweep_dir: str | Path) -> dict[str, dict]:
  """{cell name: record} for every cell recorded so far."""
  out = {}
  for p in sorted((Path(sweep_dir) / "results").glob("*.json")):
    out[p.stem] = json.loads(p.read_text())
  return out


def run_cell(config, cell: Mapping[str, Any], sweep_dir: Path, *,
             run_fn: Callable[..., dict] = train.run) -> dict:
  """Run one cell unless its record says ok; always returns its record."""
  path = record_path(sweep_dir, cell["name"])
  if path.exists():
    record = json.loads(path.read_text())
    if record.get("status") == "ok":
      return record
  t = time.time()
  record = {"name": cell["name"], "overrides": dict(cell.get("overrides", {}))}
  try:
    for dep in _deps(record):
      dep_record = record_path(sweep_dir, dep)
      if not dep_record.exists() or json.loads(dep_record.read_text()).get("status") != "ok":
        raise RuntimeError(f"source cell {dep!r} has not finished successfully")
    result = run_fn(cell_config(config, cell, sweep_dir), Path(sweep_dir) / "cells" / cell["name"])
    record.update(status="ok", result=result)
  except Exception as e:  # pylint: disable=broad-except
    record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    print(f"[lora_squeeze] sweep cell {cell['name']} FAILED: {type(e).__name__}: {e}")
  record["seconds"] = time.time() - t
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # multi-host cells: every process runs the cell, one writes its record
    _write_json(path, record)
  return record


def run_sweep(config, sweep_dir: str | Path, *, only: Sequence[str] | None = None,
              run_fn: Callable[..., dict] = train.run) -> dict[str, dict]:
  """Run every cell (or ``only`` those), in dependency order; returns {name: record}."""
  sweep_dir = Path(sweep_dir)
  cells = cells_of(config)
  if only:
    unknown = sorted(set(only) - {c["name"] for c in cells})
    if unknown:
      raise ValueError(f"sweep: unknown cells {unknown}; cells are {[c['name'] for c in cells]}")
    cells = [c for c in cells if c["name"] in set(only)]
  records = {}
  for i, cell in enumerate(cells):
    print(f"[lora_squeeze] sweep cell {i + 1}/{len(cells)}: {cell['name']}")
    records[cell["name"]] = run_cell(config, cell, sweep_dir, run_fn=run_fn)
  return records


def main(argv=None) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flag = config_flags.DEFINE_config_file("config", None, "Sweep config (configs/*.py[:args]).",
                                                lock_config=False)
  workdir = flags.DEFINE_string("workdir", None, "Sweep directory (cells/, results/).")
  cell = flags.DEFINE_multi_string("cell", None, "Run only these cells (repeatable).")
  list_cells = flags.DEFINE_bool("list", False, "Print the cell names, one per line, and exit.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    config = config_flag.value
    if list_cells.value:  # "NAME [SOURCE,...]" in run order (launch/sweep.sh reads it)
      for c in cells_of(config):
        print(" ".join([c["name"], ",".join(_deps(c))]).strip())
      return
    import os  # pylint: disable=g-import-not-at-top
    if os.environ.get("LORA_SQUEEZE_DISTRIBUTED") == "1":
      from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top
      sharding.initialize_distributed()
    from absl import logging  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top
    adapters.enable_compile_cache()
    records = run_sweep(config, workdir.value, only=cell.value)
    report = config.get("report", None)
    if report and not cell.value:
      from lora_squeeze import reports  # pylint: disable=g-import-not-at-top
      reports.write_report(report, workdir.value, records)
    failed = [n for n, r in records.items() if r["status"] != "ok"]
    if failed:
      raise SystemExit(f"[lora_squeeze] sweep finished with failed cells: {failed} (see results/NAME.json)")

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
