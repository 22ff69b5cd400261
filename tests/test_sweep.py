"""sweep.py: cell order and overrides, the results store, skip-on-rerun, failing cells, source reuse; the
quickstart report (table + heatmap PNG)."""

import json
import pathlib
import shutil

import pytest

from lora_squeeze import results_render
from lora_squeeze import sweep
from lora_squeeze import train


def _config(cells):
  import importlib.util
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location("smoke", root / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("steps=6")
  c.progress = False
  c.sweep = cells
  return c


def test_order_overrides_store_rerun_and_failures(tmp_path):
  cells = [
      {"name": "post", "overrides": {"mode": "post_squeeze", "source_workdir": "@src", "target_ranks": (2,)}},
      {"name": "src", "overrides": {"mode": "direct", "lora.rank": 4}},
      {"name": "bad", "overrides": {"lora.rnak": 3}},
  ]
  config = _config(cells)
  assert [c["name"] for c in sweep.cells_of(config)] == ["src", "post", "bad"]  # sources first
  calls = []

  def fake_run(cfg, workdir):
    calls.append((cfg.mode, cfg.lora.rank, cfg.get("source_workdir"), str(workdir)))
    return {"mode": cfg.mode}

  # Every cell's override keys are checked before the first cell runs: nothing runs, nothing is written.
  with pytest.raises(ValueError, match=r"sweep cell 'bad': unknown config key 'lora.rnak' \(did you mean 'lora.rank'"):
    sweep.run_sweep(config, tmp_path, run_fn=fake_run)
  assert calls == [] and not (tmp_path / "results").exists()
  config = _config(cells[:2])
  records = sweep.run_sweep(config, tmp_path, run_fn=fake_run)
  assert [c[:2] for c in calls] == [("direct", 4), ("post_squeeze", 8)]
  assert calls[1][2] == str(tmp_path / "cells" / "src")
  assert set(records) == {"src", "post"}
  stored = json.loads((tmp_path / "results" / "src.json").read_text())
  assert stored["status"] == "ok" and stored["result"] == {"mode": "direct"}
  calls.clear()
  sweep.run_sweep(config, tmp_path, run_fn=fake_run)  # rerun: finished cells are skipped
  assert calls == []
  with pytest.raises(ValueError, match="unknown cell"):
    sweep.cells_of(_config([{"name": "a", "overrides": {"source_workdir": "@nope"}}]))


def test_failed_source_blocks_its_users(tmp_path):
  config = _config(
      [
          {"name": "src", "overrides": {"mode": "direct"}},
          {"name": "post", "overrides": {"mode": "post_squeeze", "source_workdir": "@src"}},
      ]
  )

  def failing(cfg, workdir):
    raise RuntimeError("boom")

  records = sweep.run_sweep(config, tmp_path, run_fn=failing)
  assert records["src"]["status"] == "error" and "boom" in records["src"]["error"]
  assert "has not finished" in records["post"]["error"]


def test_real_tiny_sweep_and_report(tmp_path):
  config = _config(
      [
          {"name": "direct_r4", "overrides": {"mode": "direct", "lora.rank": 4}},
          {
              "name": "post",
              "overrides": {"mode": "post_squeeze", "source_workdir": "@direct_r4", "target_ranks": (2, 1)},
          },
      ]
  )
  calls = []

  def run_with_fake_eval(cfg, workdir):
    calls.append(cfg.mode)
    return train.run(
        cfg,
        workdir,
        evaluate_fn=lambda m, p, c: {
            "accuracy": 0.5 + 0.01 * len(train.lora_lib.lora_ranks(p)) / 100,
            "ci95": [0.4, 0.6],
            "gold_nll": 1.0 + 0.1 * max(train.lora_lib.lora_ranks(p).values()),
            "gold_nll_sem": 0.01,
        },
    )

  records = sweep.run_sweep(config, tmp_path, run_fn=run_with_fake_eval)
  assert all(r["status"] == "ok" for r in records.values()), records
  assert sorted(records["post"]["result"]["targets"]) == ["1", "2"]
  # The post-squeeze cell read the direct cell's adapter (no retraining: steps 0).
  assert records["post"]["result"]["steps"] == 0 and (tmp_path / "cells" / "direct_r4" / "adapter").exists()
  results_render.write_report({"name": "q", "title": "tiny"}, tmp_path, records)
  md = (tmp_path / "q.md").read_text()
  assert "post_squeeze from r=4" in md and "| direct_r4 | direct | 4 | 6 |" in md
  assert "| 1.4000 ± 0.0100 |" in md and "| 1.1000 ± 0.0100 |" in md  # held-out NLL of r=4 and of r=1
  png = (tmp_path / "q.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_a_store_continued_elsewhere_skips_what_finished_and_rebuilds_missing_sources(tmp_path):
  """A committed store (records only) continued under another directory, as on a new machine: finished cells
  stay finished although their @source paths moved; a cell still to run whose source finished elsewhere
  first rebuilds that source's run (its adapter is needed), and the rebuilt record replaces the old one."""
  cells = [
      {"name": "src", "overrides": {"mode": "direct", "lora.rank": 4}},
      {"name": "post", "overrides": {"mode": "post_squeeze", "source_workdir": "@src", "target_ranks": (2,)}},
      {"name": "cont", "overrides": {"mode": "cont_squeeze", "source_workdir": "@src", "extra_steps": 2}},
  ]
  calls = []

  def fake_run(cfg, workdir, **_):
    calls.append((pathlib.Path(workdir).name, cfg.get("source_workdir")))
    return {"mode": cfg.mode}

  first = tmp_path / "machine1"
  sweep.run_sweep(_config(cells[:2]), first, run_fn=fake_run)
  assert [c[0] for c in calls] == ["src", "post"]
  post_record = json.loads((first / "results" / "post.json").read_text())
  assert post_record["settings"]["source_workdir"] == "@src"  # not machine1's path
  # Another machine: only the records travel.
  second = tmp_path / "machine2"
  shutil.copytree(first / "results", second / "results")
  calls.clear()
  records = sweep.run_sweep(_config(cells), second, run_fn=fake_run)
  assert calls == [("src", ""), ("cont", str(second / "cells" / "src"))]  # post skipped; src rebuilt for cont
  assert records["post"]["fingerprint"] == post_record["fingerprint"]
  assert json.loads((second / "results" / "src.json").read_text())["fingerprint"] == records["src"]["fingerprint"]
  assert list((second / "results" / "superseded").glob("src.*.json"))  # the old record is kept aside
  calls.clear()
  sweep.run_sweep(_config(cells), second, run_fn=fake_run)
  assert calls == []


def test_a_cell_whose_source_was_rebuilt_records_the_rebuilt_source(tmp_path):
  """The rebuilt source's record can hash differently from the one it replaces (written by an older version
  whose settings held other keys): the cell that triggered the rebuild read the rebuilt adapter, so its record
  must name the rebuilt record's fingerprint; otherwise the next run reruns it for nothing."""
  cells = [
      {"name": "src", "overrides": {"mode": "direct", "lora.rank": 4}},
      {"name": "cont", "overrides": {"mode": "cont_squeeze", "source_workdir": "@src", "extra_steps": 2}},
  ]
  calls = []

  def fake_run(cfg, workdir, **_):
    calls.append(pathlib.Path(workdir).name)
    return {"mode": cfg.mode}

  first = tmp_path / "machine1"
  sweep.run_sweep(_config(cells[:1]), first, run_fn=fake_run)
  second = tmp_path / "machine2"
  shutil.copytree(first / "results", second / "results")
  old = json.loads((second / "results" / "src.json").read_text())
  old["fingerprint"] = "0" * 16  # as hashed by an older version: same settings, another hash
  (second / "results" / "src.json").write_text(json.dumps(old))
  calls.clear()
  records = sweep.run_sweep(_config(cells), second, run_fn=fake_run)
  assert calls == ["src", "cont"]  # src kept (same settings), then rebuilt for cont, whose run reads it
  rebuilt = json.loads((second / "results" / "src.json").read_text())["fingerprint"]
  assert rebuilt != "0" * 16 and records["cont"]["sources"] == {"src": rebuilt}
  calls.clear()
  sweep.run_sweep(_config(cells), second, run_fn=fake_run)
  assert calls == []


def test_an_older_record_with_an_absolute_source_path_is_the_same_cell():
  cell = {"name": "post", "overrides": {"source_workdir": "@src", "squeeze.method": "rsvd"}}
  old = {"source_workdir": "/old/machine/runs/cells/src", "squeeze": {"method": "rsvd"}}
  assert sweep.portable(old, cell) == {"source_workdir": "@src", "squeeze": {"method": "rsvd"}}
  other = {"source_workdir": "/somewhere/else/entirely", "squeeze": {"method": "rsvd"}}
  assert sweep.portable(other, cell) == other  # a path that is not the cell's source stays as it is
