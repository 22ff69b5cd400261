"""Issue 19: the coming stages' programs compiled ahead in a background thread (``Trainer.precompile``), and the
rank change as one jitted program compiled once per (source ranks, target rank) signature.

* The precompiled executables are the ones that run (the jitted functions' own caches stay empty for them),
  and give bit-identical states to the jitted calls, on one device and on a 4-device mesh (a subprocess with
  ``--xla_force_host_platform_device_count=4``, as in test_sharding.py).
* A whole In-Squeeze run with ``background_compile`` on and off ends with bit-identical adapters and losses;
  the run's timing lists the programs compiled ahead and each boundary's time.
* The rank change compiles once per signature and never again (XLA backend compiles counted with
  ``jax.monitoring``), and its factors are the float64 best rank-r approximation of a @ b.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
  from lora_squeeze import models

  return models.load("tiny")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _ladder_run(trainer, tiny, batches, *, precompile: bool, base=None, key_fn=None):
  """8 -> 4 -> 2 with two steps per stage; ``precompile`` starts the background compile after the first step
  (as train.run does)."""
  key_fn = key_fn or (lambda i: jax.random.key(100 + i))
  base = tiny.params if base is None else base
  state = trainer.init_state(jax.random.key(0), 8)
  losses, it = [], iter(batches)
  for i, rank in enumerate((8, 4, 2)):
    if i:
      state = trainer.change_rank(state, rank, key_fn(i))
    for _ in range(2):
      batch = next(it)
      state, m = trainer.train_step(state, base, batch, 0.05)
      losses.append(float(m["loss"]))
      if precompile and trainer.precompiler is None:
        trainer.precompile([(8, 4), (4, 2)], base_params=base, batch=batch, key=key_fn(1))
  trainer.close()
  return state, losses


def test_precompiled_programs_run_and_equal_the_jitted_ones(tiny):
  from lora_squeeze import lora
  from lora_squeeze import trainer as trainer_lib
  from lora_squeeze.data import synthetic

  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=4, max_len=16, seed=0)
  batches = [next(it) for _ in range(6)]
  cfg = lora.LoRAConfig(rank=8)
  plain = trainer_lib.Trainer(tiny, cfg, max_targets=64, optimizer_state="carry")
  want_state, want_losses = _ladder_run(plain, tiny, batches, precompile=False)
  ahead = trainer_lib.Trainer(tiny, cfg, max_targets=64, optimizer_state="carry")
  got_state, got_losses = _ladder_run(ahead, tiny, batches, precompile=True)

  assert got_losses == want_losses
  for g, w in zip(_leaves(got_state), _leaves(want_state), strict=True):
    np.testing.assert_array_equal(g, w)
  # The jitted train step compiled only the first rank; ranks 4 and 2 and both rank changes ran the
  # executables compiled in the background (one trace each, none in the jitted functions' caches).
  assert ahead.train_step_program._cache_size() == 1 and ahead.change_rank_program._cache_size() == 0  # pylint: disable=protected-access
  assert ahead.traces["train_step"] == 3 and ahead.traces["change_rank"] == 2, ahead.traces
  log = ahead.precompiler.log
  assert [e["program"] for e in log] == [
      "change_rank r8 -> r4",
      "train_step r4",
      "change_rank r4 -> r2",
      "train_step r2",
  ]
  assert all(e["error"] is None and e["seconds"] > 0 and e["end"] >= e["start"] for e in log), log
  assert plain.train_step_program._cache_size() == 3 and plain.change_rank_program._cache_size() == 2  # pylint: disable=protected-access


def _same_program_text(trainer, state, base, batch):
  """The programs ``precompile`` lowers from abstract shapes have the jitted calls' exact program text (so a
  persistent compile cache filled by either serves both)."""
  from lora_squeeze import lora
  from lora_squeeze import trainer as trainer_lib

  args = trainer._train_step_args(state, base, batch, 0.05)  # pylint: disable=protected-access
  structs = [jax.tree.map(trainer._struct, a) for a in args[1:]]  # pylint: disable=protected-access
  (rank,) = set(lora.lora_ranks(state["params"]).values())
  live = trainer.train_step_program.lower(*args).as_text()  # pylint: disable=protected-access
  ahead = trainer.train_step_program.lower(trainer.abstract_call_state(rank), *structs).as_text()  # pylint: disable=protected-access
  assert live == ahead
  key = trainer._change_key(trainer_lib.stage_key(0, 1))  # pylint: disable=protected-access
  live = trainer.change_rank_program.lower(state, key, rank=4).as_text()  # pylint: disable=protected-access
  ahead = trainer.change_rank_program.lower(trainer.abstract_call_state(rank), jax.tree.map(trainer._struct, key), rank=4)  # pylint: disable=protected-access
  assert live == ahead.as_text()


def test_ahead_lowering_has_the_jitted_calls_program_text(tiny):
  from lora_squeeze import lora
  from lora_squeeze import trainer as trainer_lib
  from lora_squeeze.data import synthetic

  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=4, max_len=16, seed=0)
  trainer = trainer_lib.Trainer(tiny, lora.LoRAConfig(rank=8), max_targets=64)
  _same_program_text(trainer, trainer.init_state(jax.random.key(0), 8), tiny.params, next(it))


def test_a_failed_background_compile_falls_back_to_the_jitted_call(tiny, capsys):
  from lora_squeeze import lora
  from lora_squeeze import trainer as trainer_lib
  from lora_squeeze.data import synthetic

  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=4, max_len=16, seed=0)
  trainer = trainer_lib.Trainer(tiny, lora.LoRAConfig(rank=8), max_targets=64)
  state = trainer.init_state(jax.random.key(0), 8)
  trainer.precompiler = trainer_lib.Precompiler()
  sig = ("change_rank", trainer_lib.rank_signature(state["params"]), 4)

  def broken():
    raise RuntimeError("no compiler today")

  trainer.precompiler.submit(sig, "change_rank r8 -> r4", broken)
  state = trainer.change_rank(state, 4, jax.random.key(1))
  state, m = trainer.train_step(state, trainer.model.params, next(it), 0.05)
  trainer.close()
  assert set(lora.lora_ranks(state["params"]).values()) == {4} and np.isfinite(float(m["loss"]))
  assert (
      "background compile of change_rank r8 -> r4 failed (RuntimeError: no compiler today)" in capsys.readouterr().out
  )
  assert trainer.precompiler.log[0]["error"] == "RuntimeError: no compiler today"


def test_rank_change_compiles_once_per_signature_and_is_the_float64_truncation(tiny):
  from lora_squeeze import lora
  from lora_squeeze import squeeze
  from lora_squeeze import trainer as trainer_lib

  compiles = []

  def listener(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  cfg = lora.LoRAConfig(rank=8)
  trainer = trainer_lib.Trainer(tiny, cfg, max_targets=64)
  rng = np.random.default_rng(0)

  def random_state():
    params = lora.init_lora(jax.random.key(0), tiny.config, cfg)
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32), params)
    return trainer.state_from_params(params), params

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first, params = random_state()
    out = trainer.change_rank(first, 4, jax.random.key(1))
    jax.block_until_ready(out)
    assert compiles, "the first 8 -> 4 change compiled nothing?"
    n_first = len(compiles)
    for key in (2, 3):  # the same signature again, other values and keys: no trace, no compile
      again, _ = random_state()
      jax.block_until_ready(trainer.change_rank(again, 4, jax.random.key(key)))
    assert len(compiles) == n_first and trainer.traces["change_rank"] == 1
    jax.block_until_ready(trainer.change_rank(out, 2, jax.random.key(4)))  # a new signature: one more program
    assert trainer.traces["change_rank"] == 2 and trainer.change_rank_program._cache_size() == 2  # pylint: disable=protected-access
  finally:
    jax.monitoring.clear_event_listeners()

  # The new factors: a'b' is the best rank-4 approximation of a b (float64 SVD), per module.
  got = jax.device_get(out["params"])
  for path, pair in squeeze.lora_pairs(params).items():
    a, b = squeeze.to_matrices(pair["a"].astype(np.float64), pair["b"].astype(np.float64))
    u, s, vt = np.linalg.svd(a @ b, full_matrices=False)
    want = (u[:, :4] * s[:4]) @ vt[:4]
    new = squeeze.lora_pairs(got)[path]
    ga, gb = squeeze.to_matrices(new["a"].astype(np.float64), new["b"].astype(np.float64))
    err = np.linalg.norm(ga @ gb - want) / np.linalg.norm(want)
    assert err < 1e-5, (path, err)


def _smoke(**overrides):
  import importlib.util

  spec = importlib.util.spec_from_file_location("smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.progress = False
  for k, v in overrides.items():
    config[k] = v
  return config


def test_in_squeeze_run_with_and_without_background_compile_is_bit_identical(tmp_path):
  from lora_squeeze import train
  from lora_squeeze import checkpoints as checkpoints_lib

  on = train.run(_smoke(background_compile=True), tmp_path / "on")
  off = train.run(_smoke(background_compile=False), tmp_path / "off")
  for name in ("on", "off"):
    assert json.loads((tmp_path / name / "config.json").read_text()).get("background_compile") is None
  leaves = {}
  for name in ("on", "off"):
    params = checkpoints_lib.load_adapter(tmp_path / name / checkpoints_lib.ADAPTER_DIR)[0]
    leaves[name] = _leaves(params)
  for g, w in zip(leaves["on"], leaves["off"], strict=True):
    np.testing.assert_array_equal(g, w)
  losses = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
  assert losses("on") == losses("off")

  compiled = on["timing"]["background_compile"]
  assert [c["program"] for c in compiled] == [
      "change_rank r8 -> r4",
      "train_step r4",
      "change_rank r4 -> r2",
      "train_step r2",
  ]
  assert all(c["error"] is None and c["seconds"] > 0 for c in compiled)
  assert off["timing"]["background_compile"] == []
  for result in (on, off):
    stages = result["timing"]["stages"]
    assert stages[0]["boundary_seconds"] is None
    for s in stages[1:]:
      assert s["boundary_seconds"] >= s["change_seconds"] + s["first_step_seconds"] + s["save_seconds"] - 1e-6, s
  # A workdir finished with it on is the same run with it off (a presentation key): nothing to redo.
  assert train.run(_smoke(background_compile=False), tmp_path / "on") == on


def test_background_compile_bad_value_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "lora_squeeze.main", f"--config={ROOT / 'configs' / 'smoke.py'}"]
  proc = subprocess.run(
      cmd + [f"--workdir={tmp_path / 'w'}", "--config.background_compile=yes"], env=env, capture_output=True, text=True
  )
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "--config.background_compile=yes" in proc.stderr and not (tmp_path / "w").exists()


def _four_devices():
  """Runs in a subprocess with 4 host devices: the same check as the one-device test, on a data x fsdp mesh
  with fsdp-split LoRA factors."""
  from lora_squeeze import lora
  from lora_squeeze import models
  from lora_squeeze import sharding
  from lora_squeeze import trainer as trainer_lib
  from lora_squeeze.data import synthetic

  assert jax.device_count() == 4, jax.devices()
  tiny = models.load("tiny")
  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=8, max_len=16, seed=0)
  batches = [next(it) for _ in range(6)]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2})
  base = sharding.put(tiny.params, sharding.base_shardings(tiny.params, mesh))
  cfg = lora.LoRAConfig(rank=8)
  make = lambda: trainer_lib.Trainer(tiny, cfg, max_targets=64, optimizer_state="carry", mesh=mesh, shard_lora=True)
  plain, ahead = make(), make()
  _same_program_text(plain, plain.init_state(jax.random.key(0), 8), base, batches[0])
  want_state, want_losses = _ladder_run(plain, tiny, batches, precompile=False, base=base)
  got_state, got_losses = _ladder_run(ahead, tiny, batches, precompile=True, base=base)
  assert got_losses == want_losses, (got_losses, want_losses)
  for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
    assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (g.sharding, w.sharding)
    np.testing.assert_array_equal(np.asarray(jax.device_get(g)), np.asarray(jax.device_get(w)))
  sizes = (ahead.train_step_program._cache_size(), ahead.change_rank_program._cache_size(), plain.train_step_program._cache_size())  # pylint: disable=protected-access
  # Ranks 4 and 2 and both rank changes ran the background-compiled executables; the jitted step's cache
  # holds only what it compiled for rank 8, once (the first state's layouts are the step's output layouts).
  assert sizes == (1, 0, 3), (sizes, ahead.precompiler.log)
  assert all(e["error"] is None for e in ahead.precompiler.log), ahead.precompiler.log
  print("FOUR_DEVICES_OK")


def test_four_devices_precompiled_programs_equal_the_jitted_ones():
  env = dict(
      os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
  )
  for k in ("LORA_SQUEEZE_FAULT", "LORA_SQUEEZE_DISTRIBUTED"):
    env.pop(k, None)
  proc = subprocess.run(
      [sys.executable, __file__, "four_devices"], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0 and "FOUR_DEVICES_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


if __name__ == "__main__":
  if sys.argv[1:] == ["four_devices"]:
    _four_devices()
  else:
    raise SystemExit(f"usage: {sys.argv[0]} four_devices")
