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
"settings", "sources", "fingerprint", "result" | "error", "seconds"}``. ``settings`` are the cell's resolved
result-determining settings (``workdir.result_settings``; an ``@cell`` reference stays ``@cell``, not the path,
so a store moved to another directory or machine is the same store: ``portable``), ``sources`` the
fingerprints of the cells it reads, ``fingerprint`` a hash of both. A cell whose source finished elsewhere (a
committed store continued on a new machine: records, no workdirs) first rebuilds that source's run.

A rerun skips cells whose record says ok AND whose fingerprint equals the cell's current one (an interrupted
cell resumes from its checkpoints; a failing cell records its error, with traceback, and the sweep goes on).
A CHANGED cell (another ``steps``, another override, a source cell that was rerun) is rerun from scratch:
its old record moves to ``DIR/results/superseded/`` and its old workdir to ``cells/NAME/superseded/``, and one
line says which keys changed. Every cell's overrides and values are checked before the first cell runs.
Records written before fingerprints existed are kept as they are, with a note.

A learning rate may be left to the sweep: an override value ``{"best_lr_from": STORE, "rank": R}``
(``config_lib.best_lr_from``; also as a value of ``lr_by_rank``) is the best direct-training rate at rank R in
the results store STORE (``results.best_direct_lr``: the paper's rule, or with ``"by": "nll"`` the lowest
held-out NLL), read when the sweep runs, once per
store. The cell's record keeps the reference in ``overrides`` and the rate in ``settings``; the fingerprint
hashes the rate, so a cell whose best rate changed (the store gained runs) is rerun. A store without a
finished direct run at R stops the sweep before any cell runs, naming the cell and the ranks the store has.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from lora_squeeze import config_lib
from lora_squeeze import fileio
from lora_squeeze import results
from lora_squeeze import results_render
from lora_squeeze import runtime
from lora_squeeze import workdir as workdir_lib

if __name__ == "__main__":  # the command: quiet before TensorFlow loads (through the imports below)
  runtime.quiet_native_logs()

# pylint: disable=g-import-not-at-top,wrong-import-position  (after quiet_native_logs: they load TensorFlow)
import jax

from lora_squeeze import sharding
from lora_squeeze import train

# pylint: enable=g-import-not-at-top,wrong-import-position


def _deps(cell: Mapping[str, Any]) -> list[str]:
  return [v[1:] for v in dict(cell.get("overrides", {})).values() if isinstance(v, str) and v.startswith("@")]


def cells_of(config) -> list[dict[str, Any]]:
  """The config's cells, checked: unique names, known sources, sources before their users."""
  cells = [dict(c) for c in config.get("sweep", ())]
  if not cells:
    raise workdir_lib.UserError(
        "sweep: the config has no 'sweep' cells (is it a run config? use " "python -m lora_squeeze.main for one run)"
    )
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


class BestRates:
  """The best direct-training rate per rank of results stores, each store read once (``lr_from`` cells)."""

  def __init__(self):
    self._rows: dict[str, list[results.Row]] = {}
    self._stores: dict[tuple[str, str], dict[int, float]] = {}

  def rate(self, store: str, rank: int, cell: str, by: str = "accuracy") -> float:
    if store not in self._rows:
      try:
        self._rows[store] = results.load_rows([store])
      except FileNotFoundError as e:
        raise workdir_lib.UserError(f"sweep cell {cell!r}: learning rate from lr_from={store}: {e}") from None
    if (store, by) not in self._stores:
      self._stores[(store, by)] = results.best_direct_lr(self._rows[store], by=by)
    best = self._stores[(store, by)]
    if int(rank) not in best:
      have = ", ".join(str(r) for r in sorted(best)) or "none"
      raise workdir_lib.UserError(
          f"sweep cell {cell!r}: lr_from={store} has no finished direct run at rank {rank} (ranks with a rate: "
          f"{have}); finish its lr_grid cells, or give the rate with lrs={rank}:RATE"
      )
    return best[int(rank)]

  def resolve(self, value: Any, cell: str) -> Any:
    """``value`` with every ``best_lr_from`` reference (itself, or a value of a mapping) replaced by the rate."""
    if config_lib.is_best_lr_from(value):
      return self.rate(value[config_lib.BEST_LR_FROM], value["rank"], cell, value.get("by", "accuracy"))
    if isinstance(value, Mapping):
      return {k: self.resolve(v, cell) for k, v in value.items()}
    return value


def cell_config(
    config, cell: Mapping[str, Any], sweep_dir: Path, *, rates: BestRates | None = None
) -> ml_collections.ConfigDict:
  """The run config of one cell: a copy of ``config`` without the sweep, with the overrides applied (``@cell``
  references made paths, ``best_lr_from`` references made rates through ``rates``)."""
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  if "sweep" in c:
    del c["sweep"]
  rates = rates or BestRates()
  for key, value in dict(cell.get("overrides", {})).items():
    if isinstance(value, str) and value.startswith("@"):
      value = str(sweep_dir / "cells" / value[1:])
    value = rates.resolve(value, cell["name"])
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        node = None
        break
      node = node[p]
    if node is None or leaf not in node:
      valid = workdir_lib.flatten(c.to_dict())
      raise workdir_lib.UserError(
          f"sweep cell {cell['name']!r}: unknown config key {key!r}" f"{workdir_lib.did_you_mean(key, valid)}"
      )
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def _write_json(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def record_path(sweep_dir: Path, name: str) -> Path:
  return Path(sweep_dir) / "results" / f"{name}.json"


def load_results(sweep_dir: str | Path) -> dict[str, dict]:
  """{cell name: record} for every cell recorded so far."""
  out = {}
  for p in sorted((Path(sweep_dir) / "results").glob("*.json")):
    out[p.stem] = json.loads(p.read_text())
  return out


def fingerprint(settings: Mapping[str, Any], sources: Mapping[str, str]) -> str:
  text = json.dumps({"settings": settings, "sources": dict(sources)}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _set_aside(path: Path) -> Path:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  dest = path.parent / "superseded" / f"{path.stem}.{stamp}.json"
  dest.parent.mkdir(parents=True, exist_ok=True)
  os.replace(path, dest)
  return dest


def portable(settings: Mapping[str, Any], cell: Mapping[str, Any]) -> dict:
  """``settings`` with each ``@cell`` reference's resolved path written back as ``@cell``, so that a record
  does not depend on where the sweep directory lies (a campaign continued on another machine or under
  another path is the same campaign). Also turns an older record's absolute ``.../cells/NAME`` into
  ``@NAME``."""
  out = copy.deepcopy(dict(settings))
  for key, value in dict(cell.get("overrides", {})).items():
    if not (isinstance(value, str) and value.startswith("@")):
      continue
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), str):
      v = node[leaf]
      if v == value or v.rstrip("/").endswith(f"cells/{value[1:]}"):
        node[leaf] = value
  return out


def _source_fingerprints(sweep_dir: Path, cell: Mapping[str, Any]) -> dict[str, str]:
  """{source cell: its record's fingerprint} ("" for a source without a successful record)."""
  sources = {}
  for dep in _deps(cell):
    dep_path = record_path(sweep_dir, dep)
    dep_record = json.loads(dep_path.read_text()) if dep_path.exists() else {}
    sources[dep] = dep_record.get("fingerprint", "") if dep_record.get("status") == "ok" else ""
  return sources


def _ensure_sources(config, cell, sweep_dir: Path, cells: Mapping[str, Mapping[str, Any]], run_fn, rates) -> bool:
  """Rebuilds each finished source cell whose run workdir is not here (the campaign went on on another
  machine, which kept only the records): a Post- / Cont-Squeeze cell needs its source's adapter. Returns
  whether it rebuilt any."""
  rebuilt = False
  for dep in _deps(cell):
    record = record_path(sweep_dir, dep)
    finished = record.exists() and json.loads(record.read_text()).get("status") == "ok"
    if finished and not (sweep_dir / "cells" / dep).is_dir() and dep in cells:
      print(
          f"[lora_squeeze] sweep cell {cell['name']}: its source cell {dep} finished elsewhere and its workdir "
          "is not here: rebuilding it (its record is replaced by the rebuilt run's)"
      )
      _set_aside(record)
      run_cell(config, cells[dep], sweep_dir, run_fn=run_fn, rates=rates, cells=cells)
      rebuilt = True
  return rebuilt


def run_cell(
    config,
    cell: Mapping[str, Any],
    sweep_dir: Path,
    *,
    run_fn: Callable[..., dict] = train.run,
    rates: BestRates | None = None,
    cells: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
  """Run one cell unless its record says ok for the same settings; always returns its record. ``cells``
  ({name: cell}, the whole sweep's): a source cell finished elsewhere is rebuilt here first."""
  sweep_dir = Path(sweep_dir)
  path = record_path(sweep_dir, cell["name"])
  cell_cfg = cell_config(config, cell, sweep_dir, rates=rates)
  settings = portable(workdir_lib.result_settings(cell_cfg), cell)
  sources = _source_fingerprints(sweep_dir, cell)
  fp = fingerprint(settings, sources)
  fresh = False
  if path.exists():
    old = json.loads(path.read_text())
    old_fp = old.get("fingerprint")
    if old_fp is None:  # written before records held their settings: nothing to compare
      if old.get("status") == "ok":
        print(f"[lora_squeeze] sweep cell {cell['name']}: record without settings (older version), kept as is")
        return old
    elif old_fp == fp or (
        not workdir_lib.differences(portable(old.get("settings", {}), cell), settings)
        and old.get("sources", {}) == sources
    ):  # same settings, hashed before a key moved (or with the sweep directory elsewhere)
      if old.get("status") == "ok":
        return old
    else:
      changed = workdir_lib.differences(portable(old.get("settings", {}), cell), settings)
      changed += [f"source cell {d} was rerun" for d in sources if old.get("sources", {}).get(d) != sources[d]]
      moved = _set_aside(path)
      print(
          f"[lora_squeeze] sweep cell {cell['name']} changed ({'; '.join(changed[:4]) or 'settings'}): "
          f"rerunning it afresh; the old record is kept as {moved}"
      )
      fresh = True
  t = time.time()
  record = {
      "name": cell["name"],
      "overrides": dict(cell.get("overrides", {})),
      "settings": settings,
      "sources": sources,
      "fingerprint": fp,
  }
  try:
    for dep, dep_fp in sources.items():
      if not dep_fp:
        raise RuntimeError(f"source cell {dep!r} has not finished successfully")
    if _ensure_sources(config, cell, sweep_dir, cells or {}, run_fn, rates):
      # A rebuilt source has a new record: this cell reads the rebuilt adapter, so its record names that one.
      record["sources"] = sources = _source_fingerprints(sweep_dir, cell)
      record["fingerprint"] = fingerprint(settings, sources)
    kwargs = {"fresh": True} if fresh else {}
    (sweep_dir / "cells" / cell["name"]).mkdir(parents=True, exist_ok=True)  # "ran here" (_ensure_sources)
    result = run_fn(cell_cfg, sweep_dir / "cells" / cell["name"], **kwargs)
    record.update(status="ok", result=result)
  except workdir_lib.UserError as e:  # e.g. a busy cell workdir: one line, and the sweep goes on
    record.update(status="error", error=f"{type(e).__name__}: {e}")
    print(f"[lora_squeeze] sweep cell {cell['name']} FAILED: {e}")
  except Exception as e:  # pylint: disable=broad-except
    record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    print(f"[lora_squeeze] sweep cell {cell['name']} FAILED: {type(e).__name__}: {e}")
  record["seconds"] = time.time() - t
  if jax.process_index() == 0:  # multi-host cells: every process runs the cell, one writes its record
    _write_json(path, record)
  return record


def check_cells(config, cells: Sequence[Mapping[str, Any]], sweep_dir: Path, *, rates: BestRates | None = None) -> None:
  """Every cell's overrides name real keys (and its ``lr_from`` rates exist) and give a runnable config;
  raises ``workdir.UserError`` naming the first bad cell, before any cell runs."""
  rates = rates or BestRates()
  for cell in cells:
    cfg = cell_config(config, cell, sweep_dir, rates=rates)
    try:
      config_lib.check_run_config(cfg)
    except workdir_lib.UserError as e:
      raise workdir_lib.UserError(f"sweep cell {cell['name']!r}: {e}") from None


def run_sweep(
    config, sweep_dir: str | Path, *, only: Sequence[str] | None = None, run_fn: Callable[..., dict] = train.run
) -> dict[str, dict]:
  """Run every cell (or ``only`` those), in dependency order; returns {name: record}."""
  sweep_dir = Path(sweep_dir)
  cells = cells_of(config)
  by_name = {c["name"]: c for c in cells}
  if only:
    names = [c["name"] for c in cells]
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise workdir_lib.UserError(
          f"sweep: unknown cell {unknown[0]!r}{workdir_lib.did_you_mean(unknown[0], names)}"
          f"; {len(names)} cells: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
      )
    cells = [c for c in cells if c["name"] in set(only)]
  rates = BestRates()  # each lr_from store read once, so every cell of this sweep sees the same rates
  check_cells(config, cells, sweep_dir, rates=rates)
  records = {}
  for i, cell in enumerate(cells):
    print(f"[lora_squeeze] sweep cell {i + 1}/{len(cells)}: {cell['name']}")
    records[cell["name"]] = run_cell(config, cell, sweep_dir, run_fn=run_fn, rates=rates, cells=by_name)
  return records


def main(argv=None) -> None:
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Sweep config (configs/*.py[:args]).", lock_config=False
  )
  workdir = flags.DEFINE_string("workdir", None, "Sweep directory (cells/, results/).")
  cell = flags.DEFINE_multi_string("cell", None, "Run only these cells (repeatable).")
  list_cells = flags.DEFINE_bool("list", False, "Print the cell names, one per line, and exit.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    runtime.quiet_native_logs()
    try:
      _run(config_flag.value)
    except workdir_lib.UserError as e:  # the user's to fix: one line, no traceback
      print(f"lora_squeeze.sweep: error: {e}", file=sys.stderr)
      sys.exit(2)

  def _run(config):
    if list_cells.value:  # "NAME [SOURCE,...]" in run order (launch/sweep.sh reads it)
      for c in cells_of(config):
        print(" ".join([c["name"], ",".join(_deps(c))]).strip())
      return
    workdir_lib.check_writable_dir(workdir.value)
    if os.environ.get("LORA_SQUEEZE_DISTRIBUTED") == "1":
      sharding.initialize_distributed()
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    runtime.enable_compile_cache()
    records = run_sweep(config, workdir.value, only=cell.value)
    report = config.get("report", None)
    if report and not cell.value:
      results_render.write_report(report, workdir.value, records)
    failed = [n for n, r in records.items() if r["status"] != "ok"]
    if failed:
      raise SystemExit(f"[lora_squeeze] sweep finished with failed cells: {failed} (see results/NAME.json)")

  app.run(
      _main, argv=argv, flags_parser=lambda a: config_lib.parse_flags_or_exit(a, config_flag, prog="lora_squeeze.sweep")
  )


if __name__ == "__main__":
  main()
