"""In-Squeeze with per-module ranks chosen by the adapter (config.auto_rank), on the tiny model."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lora_squeeze import checkpoints
from lora_squeeze import config_lib
from lora_squeeze import lora
from lora_squeeze import lora_layout
from lora_squeeze import models
from lora_squeeze import rank_rules
from lora_squeeze import results
from lora_squeeze import train
from lora_squeeze.adapters import gemma_peft

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(tau=0.6, min_rank=0, **overrides):
  spec = importlib.util.spec_from_file_location("smoke_config", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.progress = False
  config.auto_rank.tau, config.auto_rank.min_rank = tau, min_rank
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def test_each_module_takes_the_smallest_rank_keeping_tau_within_the_ladder(tmp_path):
  config = _config(tau=0.6)
  result = train.run(config, tmp_path / "w")
  assert result["ranks_per_stage"] == [8, 4, 2]
  records = result["auto_rank"]["stages"]
  assert [r["stage"] for r in records] == [1, 2] and [r["ladder_rank"] for r in records] == [4, 2]
  previous = None
  for rec in records:
    for path, r in rec["ranks"].items():
      assert 1 <= r <= rec["ladder_rank"]
      if previous is not None:
        assert r <= previous[path]  # a module never grows
      # The rule: V_r >= tau, or the ladder's cap bound it.
      assert rec["retention"][path] >= 0.6 - 1e-6 or r == min(rec["ladder_rank"], previous[path] if previous else 8)
    previous = rec["ranks"]
  final = lora.lora_ranks(checkpoints.load_adapter(tmp_path / "w" / "adapter")[0])
  assert final == records[-1]["ranks"]
  assert result["final_ranks"] == lora.describe_ranks(final)
  assert result["lora_params"] == sum(
      int(np.prod(a)) + int(np.prod(b))
      for a, b in lora_layout.lora_shapes(
          models.load("tiny").config, lora.LoRAConfig(rank=lora.describe_ranks(final))
      ).values()
  )
  # The records read as their own method, next to uniform In-Squeeze.
  (row,) = results.load_rows([tmp_path / "w"])
  assert row.method == "in_squeeze_standard_auto" and row.rank == 2


def test_the_chosen_ranks_are_the_rule_applied_to_the_spectra(tmp_path):
  """Recompute the first boundary's choice from the checkpoint saved just before it."""
  config = _config(tau=0.9, min_rank=2, keep_checkpoints=50, checkpoint_every=1)
  result = train.run(config, tmp_path / "w")
  first = result["auto_rank"]["stages"][0]
  stage0_steps = result["stages"][0]["steps"]
  from lora_squeeze import squeeze  # pylint: disable=g-import-not-at-top
  from lora_squeeze import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  t = trainer_lib.Trainer(trainer_lib.load_model(config), trainer_lib.lora_config_from(config), max_targets=16)
  ckpts = checkpoints.Checkpoints(tmp_path / "w" / "checkpoints", keep=50)
  state = ckpts.manager.restore(
      2 * stage0_steps,
      args=ckpts._ocp.args.Composite(state=ckpts._ocp.args.StandardRestore(t.abstract_state(8))),  # pylint: disable=protected-access
  )["state"]
  ckpts.close()
  for path, s in squeeze.lora_spectra(state["params"]).items():
    want = min(4, len(s), max(2, rank_rules.choose_rank(s, 0.9)))
    assert first["ranks"][path] == want
    assert first["retention"][path] == pytest.approx(float(rank_rules.retention(s, want)), abs=1e-6)
  assert min(min(rec["ranks"].values()) for rec in result["auto_rank"]["stages"]) >= 2  # the floor


def test_mixed_final_ranks_export_with_a_peft_rank_pattern(tmp_path):
  result = train.run(_config(tau=0.85), tmp_path / "w")  # on the tiny model: final ranks 1 and 2
  params, cfg, _ = checkpoints.load_adapter(tmp_path / "w" / "adapter")
  ranks = lora.lora_ranks(params)
  model = models.load("tiny")
  gemma_peft.export_peft(params, tmp_path / "peft", lora_config=cfg, model_config=model.config)
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert len(set(ranks.values())) > 1  # mixed: PEFT reads each module's rank from rank_pattern
  assert written["rank_pattern"] and set(written["rank_pattern"].values()) <= set(ranks.values())
  back, _ = gemma_peft.import_peft(tmp_path / "peft", model_config=model.config)
  assert lora.lora_ranks(back) == ranks
  assert result["final_ranks"] == lora.describe_ranks(ranks)


def test_a_killed_auto_rank_run_resumes_with_its_records(tmp_path):
  config = _config(tau=0.6, checkpoint_every=4)
  reference = train.run(config, tmp_path / "ref")
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      "--config=configs/smoke.py",
      f"--workdir={tmp_path / 'w'}",
      "--config.progress=False",
      "--config.auto_rank.tau=0.6",
      "--config.checkpoint_every=4",
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", LORA_SQUEEZE_FAULT="after_change_saved:2")
  killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert killed.returncode != 0
  env.pop("LORA_SQUEEZE_FAULT")
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  resumed = json.loads((tmp_path / "w" / "result.json").read_text())
  assert resumed["auto_rank"] == reference["auto_rank"]
  assert resumed["final_ranks"] == reference["final_ranks"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tau=1.5), r"config.auto_rank.tau=1.5: the energy each module keeps, in \(0, 1\]"),
        (dict(tau=0.9, mode="direct"), r"auto_rank.tau=0.9 with config.mode='direct'.*mode=in_squeeze"),
        (dict(tau=0.9, min_rank=-1), r"auto_rank.min_rank"),
    ],
)
def test_bad_auto_rank_settings_name_the_key(overrides, message):
  mode = overrides.pop("mode", None)
  config = _config(**overrides)
  if mode:
    config.mode = mode
  with pytest.raises(Exception, match=message):
    config_lib.check_run_config(config)


def test_the_report_pairs_automatic_with_uniform_ranks_and_plots_them(tmp_path):
  """experiments/auto_rank.py on an automatic and a uniform In-Squeeze run, both evaluated on the same
  synthetic examples: the stage table, r_eq from the parameter count, a paired row, the PNG."""
  for name, tau in (("auto", 0.85), ("uniform", 0.0)):
    config = _config(tau=tau)
    config.eval.update(enabled=True, limit=32, batch_size=8)
    train.run(config, tmp_path / name)
  out = tmp_path / "out"
  proc = subprocess.run(
      [
          sys.executable,
          "experiments/auto_rank.py",
          "--results",
          str(tmp_path / "auto"),
          str(tmp_path / "uniform"),
          "--out",
          str(out),
      ],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  md = (out / "auto_rank.md").read_text()
  result = json.loads((tmp_path / "auto" / "result.json").read_text())
  final = result["final_ranks"]
  r_eq = round(result["lora_params"] / result["lora_params_per_rank"])
  assert (
      result["lora_params_per_rank"] * 2
      == json.loads((tmp_path / "uniform" / "result.json").read_text())["lora_params"]
  )  # the uniform run ends at rank 2 on the same modules
  assert isinstance(final, dict) and f"r_eq = {r_eq}" in md
  assert "| in_squeeze_standard r=2 (from 8) | 32 |" in md  # paired with the uniform run on the same 32 examples
  assert (out / "auto_rank_ranks.png").stat().st_size > 5_000
