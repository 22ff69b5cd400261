"""Train loop: schedules, the answer-only loss, the jitted steps (trace counts), rank changes with the optimizer
state, run modes from configs, checkpoints and exact resume after SIGKILL (real subprocesses)."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_squeeze import aot
from lora_squeeze import config_lib
from lora_squeeze import gemma_forward
from lora_squeeze import lora
from lora_squeeze import models
from lora_squeeze import schedules
from lora_squeeze import squeeze
from lora_squeeze import train
from lora_squeeze import checkpoints as checkpoints_lib
from lora_squeeze import optim as optim_lib
from lora_squeeze import trainer as trainer_lib
from lora_squeeze.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("total", [255, 1000, 10_200, 15_700, 8])
@pytest.mark.parametrize("scheme", ["standard", "min_steps"])
def test_in_squeeze_steps_sum_exactly(total, scheme):
  ranks = schedules.halving_ladder(128, 1)
  min_steps = 200 if total >= 200 * 8 else 1
  steps = schedules.in_squeeze_steps(ranks, total, scheme=scheme, min_steps=min_steps)
  assert sum(steps) == total and len(steps) == 8 and all(s >= 1 for s in steps)
  rest = [s - (min_steps if scheme == "min_steps" else 0) for s in steps]
  rest_total = sum(rest)
  if total < 255:  # too few steps for a proportional split: every stage still gets one
    assert steps == [1] * 8 if total == 8 else True
    return
  for r, s in zip(ranks, rest):  # within one step of the exact proportional share
    assert abs(s - rest_total * r / 255) < 1.0 + 1e-9
  if scheme == "min_steps":
    assert min(steps) >= min_steps


def test_in_squeeze_steps_paper_example():
  # 128 -> ... -> 1 over N + M = 10,200: the rank-128 stage gets 128/255 of the steps.
  steps = schedules.in_squeeze_steps(schedules.halving_ladder(128, 1), 10_200)
  assert steps[0] == round(10_200 * 128 / 255) and sum(steps) == 10_200
  mins = schedules.in_squeeze_steps(schedules.halving_ladder(128, 1), 10_200, scheme="min_steps")
  assert mins[-1] == 200 + round(8_600 / 255) and sum(mins) == 10_200


def test_schedule_errors():
  with pytest.raises(ValueError, match="min_steps=200 x 8 stages"):
    schedules.in_squeeze_steps([128, 64, 32, 16, 8, 4, 2, 1], 1000, scheme="min_steps")
  with pytest.raises(ValueError, match="unknown scheme"):
    schedules.in_squeeze_steps([2, 1], 10, scheme="cosine")
  with pytest.raises(ValueError, match="not a chain of halvings"):
    schedules.halving_ladder(12, 5)
  assert schedules.warmup_constant(0, peak=0.1, warmup_steps=1000) == pytest.approx(1e-4)
  assert schedules.warmup_constant(999, peak=0.1, warmup_steps=1000) == pytest.approx(0.1)
  assert schedules.warmup_constant(5000, peak=0.1, warmup_steps=1000) == pytest.approx(0.1)


def _load_config(name, arg=None):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_plan_stages_for_each_mode():
  direct = train.plan_stages(_load_config("direct", "rank=8,lr=0.003"))
  assert [(s.rank, s.steps, s.learning_rate, s.warmup_steps) for s in direct] == [(8, 10_000, 0.003, 1000)]
  cont = train.plan_stages(_load_config("cont_squeeze", "src=128,tgt=1,extra=700"))
  assert [(s.rank, s.steps, s.learning_rate, s.warmup_steps) for s in cont] == [
      (128, 10_000, 0.003, 1000),
      (1, 700, 0.03, 100),
  ]
  cont_src = train.plan_stages(_load_config("cont_squeeze", "src=128,tgt=1,source=/x"))
  assert len(cont_src) == 1 and cont_src[0].squeeze_first and cont_src[0].steps == 200
  ins = train.plan_stages(_load_config("in_squeeze", "src=128,tgt=1,scheme=min_steps"))
  assert [s.rank for s in ins] == [128, 64, 32, 16, 8, 4, 2, 1]
  assert sum(s.steps for s in ins) == 10_200 and min(s.steps for s in ins) >= 200
  assert [s.warmup_steps for s in ins] == [1000] + [100] * 7
  assert train.plan_stages(_load_config("post_squeeze", "source=/x")) == []
  with pytest.raises(ValueError, match="not one of"):
    _load_config("direct", "rnak=8")


# ------------------------------------------------------------------------------------------ the model side


@pytest.fixture(scope="module")
def tiny():
  return models.load("tiny")


def _batch(tokenizer, n=4, max_len=16, seed=0):
  it = synthetic.SyntheticIterator(tokenizer, batch_size=n, max_len=max_len, seed=seed)
  return next(it)


def _random_lora(tiny, rank, seed=0):
  cfg = lora.LoRAConfig(rank=rank)
  p = lora.init_lora(jax.random.key(seed), tiny.config, cfg)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), p), cfg


def test_hidden_states_match_gemma_and_answer_loss_matches_full_logits(tiny):
  batch = _batch(tiny.tokenizer)
  lp, cfg = _random_lora(tiny, 4)
  module = lora.LoRA(model=tiny.transformer, config=cfg)
  params = {"params": lora.merge_params(tiny.params, lp)}
  tokens = jnp.asarray(batch["tokens"])
  full = module.apply(params, tokens, return_hidden_states=True)  # gemma's own masks (from tokens != 0)
  mask = gemma_forward.attention_mask_from_segments(batch["segment_ids"])
  hidden = module.apply(
      params, tokens, positions=jnp.asarray(batch["positions"]), attention_mask=mask, method=module.hidden_states
  )
  real = batch["segment_ids"] > 0
  np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(full.hidden_states)[real], rtol=1e-5, atol=1e-5)
  # Reference loss: full-vocabulary logits at every position, in float64 on the host.
  logits = np.asarray(full.logits, np.float64)
  logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
  )
  m = batch["loss_mask"]
  b_idx, t_idx = np.nonzero(m)
  ref = -np.mean(logp[b_idx, t_idx - 1, batch["tokens"][b_idx, t_idx]])
  loss, count = trainer_lib.answer_loss(
      hidden, tokens, jnp.asarray(m), tiny.params["embedder"]["input_embedding"], max_targets=64
  )
  assert int(count) == m.sum() > 0
  assert abs(float(loss) - ref) / ref < 1e-5
  with pytest.raises(ValueError, match="max_target_tokens"):
    trainer_lib.check_target_budget(batch, int(m.sum()) - 1)


def test_packed_batch_has_the_loss_and_lora_gradients_of_the_same_examples_unpacked(tiny):
  """Packing is invisible to training: segments never see each other and RoPE restarts in each, so the
  mean answer loss and its LoRA gradients equal those of the same examples one per row."""
  from lora_squeeze import data  # pylint: disable=g-import-not-at-top

  tok = tiny.tokenizer
  src = [data.Example(f"Q{i}: " + "ab" * (i % 6), (), (), f" answer {i}" + "z" * (i % 3)) for i in range(24)]
  t = 64
  packed = next(data.train_iterator(src, tok, batch_size=2, max_len=t, seed=0, shuffle=False, pack=True))
  starts = np.diff(packed["segment_ids"], axis=1, prepend=0) > 0
  k = int(starts.sum())  # the examples in the batch
  assert packed["segment_ids"].max() >= 3 and k > 4
  # RoPE (and the sliding window) depend on position DIFFERENCES only, so once segments are kept apart the
  # loss cannot tell restarted positions from positions running on through the row (measured here: 1e-6
  # apart); the restart, which keeps positions small and the packed step identical to the unpacked one, is
  # checked directly.
  for r in range(packed["positions"].shape[0]):
    since_start = np.arange(t) - np.maximum.accumulate(np.where(starts[r], np.arange(t), 0))
    real = packed["segment_ids"][r] > 0
    np.testing.assert_array_equal(packed["positions"][r][real], since_start[real])
  # shuffle=False: the first packed batch holds the first k examples of the source.
  unpacked = data.pad_batch([data.encode_example(e, tok, t) for e in src[:k]], t)
  assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
  lp, cfg = _random_lora(tiny, 4, seed=2)  # b != 0: the LoRA path contributes to the loss
  assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(lp))
  trainer = trainer_lib.Trainer(tiny, cfg, max_targets=int(unpacked["loss_mask"].sum()))
  loss_fn = lambda p, batch: trainer._loss(p, tiny.params, batch)  # pylint: disable=protected-access
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

  def rel(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  (loss_u, count_u), grads_u = value_and_grad(lp, unpacked)
  (loss_p, count_p), grads_p = value_and_grad(lp, packed)
  assert int(count_p) == int(count_u) == int(unpacked["loss_mask"].sum())
  assert rel(loss_p, loss_u) < 1e-5, (float(loss_p), float(loss_u))
  assert rel(grads_p, grads_u) < 1e-5
  # The comparison sees segments attending to each other: one segment id per row changes both.
  one_segment = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
  (loss_w, _), grads_w = value_and_grad(lp, one_segment)
  assert rel(loss_w, loss_u) > 1e-3 and rel(grads_w, grads_u) > 1e-3


def test_train_step_traces_once_per_rank_and_learns(tiny):
  cfg = lora.LoRAConfig(rank=8)
  trainer = trainer_lib.Trainer(tiny, cfg, max_targets=64)
  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=4, max_len=16, seed=0, num_examples=8)
  state = trainer.init_state(jax.random.key(0), 8)
  eval_batch = {k: np.concatenate([v, v2]) for (k, v), v2 in zip(next(it).items(), next(it).values())}
  loss0 = float(trainer.eval_loss(state["params"], tiny.params, eval_batch)[0])
  for rank in (8, 4, 2):
    if rank != 8:
      state = trainer.change_rank(state, rank, jax.random.key(rank))
    for i in range(25):
      state, m = trainer.train_step(state, tiny.params, next(it), 0.1 if i > 2 else 0.03)
  loss1 = float(trainer.eval_loss(state["params"], tiny.params, eval_batch)[0])
  assert trainer.traces["train_step"] == 3 and trainer.traces["change_rank"] == 2
  # Compiled once per rank too: a first state of other (uncommitted) shardings than the step's outputs
  # traced once but compiled twice.
  assert trainer.train_step_program._cache_size() == 3  # pylint: disable=protected-access
  assert int(state["step"]) == 75
  assert loss1 < loss0 - 0.5, (loss0, loss1)
  # Back to a rank seen before: no new trace.
  state = trainer.change_rank(state, 4, jax.random.key(0))
  state, _ = trainer.train_step(state, tiny.params, next(it), 0.01)
  assert trainer.traces["train_step"] == 3


def test_rank_change_preserves_model_output_when_lossless(tiny):
  """Growing 4 -> 8 (or squeezing to >= the true rank) must not change the model's predictions."""
  lp4, cfg = _random_lora(tiny, 4, seed=3)
  trainer = trainer_lib.Trainer(tiny, cfg, max_targets=64)
  state = trainer.state_from_params(lp4)
  batch = _batch(tiny.tokenizer, seed=5)
  before = float(trainer.eval_loss(state["params"], tiny.params, batch)[0])
  grown = trainer.change_rank(state, 8, jax.random.key(1))
  assert set(lora.lora_ranks(grown["params"]).values()) == {8}
  after = float(trainer.eval_loss(grown["params"], tiny.params, batch)[0])
  assert abs(after - before) < 1e-5 * abs(before)
  back = trainer.change_rank(grown, 4, jax.random.key(1))
  assert abs(float(trainer.eval_loss(back["params"], tiny.params, batch)[0]) - before) < 1e-5 * abs(before)


def test_carry_optimizer_state_across_the_factoring_boundary():
  """Rank 128 -> 64 changes Adafactor's layout (factored -> full) for (F=128, r) factors; carried
  statistics are the rank-axis means of the old second moments, and the count survives."""
  opt = optim_lib.make_optimizer()
  rng = np.random.default_rng(0)
  old = {
      "m": {
          "a": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(128, 40)), jnp.float32),
      }
  }
  state = opt.init(old)
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), old)
    _, state = opt.update(grads, state, old)
  new = {"m": {"a": jnp.zeros((128, 64)), "b": jnp.zeros((64, 40))}}
  carried = optim_lib.carry_adafactor_state(state, old, new, opt.init(new))
  assert jax.tree.structure(carried) == jax.tree.structure(opt.init(new))
  assert jax.tree.map(jnp.shape, carried) == jax.tree.map(jnp.shape, opt.init(new))
  old_fs = state[0]
  new_fs = carried[0]
  assert int(new_fs.count) == 3
  # a (128, 128) was factored: full estimate = v_row/mean(v_row) ⊗ v_col; mean over the rank axis (cols).
  v_row, v_col = np.asarray(old_fs.v_row["m"]["a"]), np.asarray(old_fs.v_col["m"]["a"])
  full = (v_row / v_row.mean())[:, None] * v_col[None, :]
  np.testing.assert_allclose(
      np.asarray(new_fs.v["m"]["a"]), np.broadcast_to(full.mean(1, keepdims=True), (128, 64)), rtol=1e-5
  )
  # b (128, 40) was not factored (40 < 128): mean over the rank axis (rows).
  np.testing.assert_allclose(
      np.asarray(new_fs.v["m"]["b"]),
      np.broadcast_to(np.asarray(old_fs.v["m"]["b"]).mean(0, keepdims=True), (64, 40)),
      rtol=1e-5,
  )


def test_carry_mode_runs_in_the_trainer(tiny):
  lp, cfg = _random_lora(tiny, 8)
  trainer = trainer_lib.Trainer(tiny, cfg, max_targets=64, optimizer_state="carry")
  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=4, max_len=16, seed=0)
  state = trainer.state_from_params(lp)
  state, _ = trainer.train_step(state, tiny.params, next(it), 0.01)
  state = trainer.change_rank(state, 4, jax.random.key(0))
  assert int(state["opt_state"][0].count) == 1
  state, m = trainer.train_step(state, tiny.params, next(it), 0.01)
  assert np.isfinite(float(m["loss"]))
  with pytest.raises(ValueError, match="optimizer_state"):
    trainer_lib.Trainer(tiny, cfg, max_targets=8, optimizer_state="keep")


# ------------------------------------------------------------------------------------------ whole runs


def _smoke(arg="", **overrides):
  config = _load_config("smoke", arg)
  config.progress = False
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _adapter_leaves(workdir):
  params, _, _ = checkpoints_lib.load_adapter(pathlib.Path(workdir) / checkpoints_lib.ADAPTER_DIR)
  return {
      "/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_in_squeeze_run_then_finished_workdir_does_nothing(tmp_path):
  config = _smoke()
  result = train.run(config, tmp_path / "w")
  assert result["ranks_per_stage"] == [8, 4, 2] and result["steps"] == 24
  assert json.loads((tmp_path / "w" / "result.json").read_text())["final_rank"] == 2
  lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, 25))
  assert [x["rank"] for x in lines] == [8] * 14 + [4] * 7 + [2] * 3  # standard scheme: 24 · (8, 4, 2)/14
  assert set(lora.lora_ranks(checkpoints_lib.load_adapter(tmp_path / "w" / "adapter")[0]).values()) == {2}
  mtime = (tmp_path / "w" / "metrics.jsonl").stat().st_mtime_ns
  again = train.run(config, tmp_path / "w")
  assert again == result and (tmp_path / "w" / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_post_and_cont_squeeze_reuse_a_source_run(tmp_path):
  src = _smoke(mode="direct", steps=10)
  src.lora.rank = 8
  train.run(src, tmp_path / "src")
  src_params = checkpoints_lib.load_adapter(tmp_path / "src" / "adapter")[0]

  seen = []

  def evaluate_fn(model, params, cfg):
    seen.append(lora.lora_ranks(params))
    return {"num_modules": len(lora.lora_ranks(params))}

  post = _smoke(mode="post_squeeze", source_workdir=str(tmp_path / "src"), target_ranks=(4, 2))
  result = train.run(post, tmp_path / "post", evaluate_fn=evaluate_fn)
  assert sorted(result["targets"]) == ["2", "4"] and result["steps"] == 0
  assert [set(s.values()) for s in seen] == [{4}, {2}]
  assert 0 < result["targets"]["2"]["retention_mean"] < result["targets"]["4"]["retention_mean"] <= 1

  cont = _smoke(mode="cont_squeeze", source_workdir=str(tmp_path / "src"), extra_steps=6)
  cont.source_rank, cont.target_rank = 8, 2
  result = train.run(cont, tmp_path / "cont", evaluate_fn=evaluate_fn)
  assert result["ranks_per_stage"] == [2] and result["steps"] == 6
  # The cont run starts from the squeezed source: its first logged loss is the squeezed adapter's.
  assert set(lora.lora_ranks(checkpoints_lib.load_adapter(tmp_path / "cont" / "adapter")[0]).values()) == {2}
  # The source run was not touched.
  again = checkpoints_lib.load_adapter(tmp_path / "src" / "adapter")[0]
  jax.tree.map(np.testing.assert_array_equal, src_params, again)


def _cli(workdir, *args, fault=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("LORA_SQUEEZE_FAULT", None)
  if fault:
    env["LORA_SQUEEZE_FAULT"] = fault
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      f"--config={ROOT / 'configs' / 'smoke.py'}:steps=24",
      f"--workdir={workdir}",
      "--config.progress=False",
      *args,
  ]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_reference(tmp_path_factory):
  """An uninterrupted smoke run through the CLI (shared by the kill/resume tests)."""
  work = tmp_path_factory.mktemp("smoke") / "ref"
  ref = _cli(work)
  assert ref.returncode == 0, ref.stderr[-3000:]
  return work


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, smoke_reference):
  want = _adapter_leaves(smoke_reference)

  # Killed right after the rank change into stage 1, before its checkpoint; then right after that
  # checkpoint; then mid-stage after a periodic save: each restart continues and ends bit-identical.
  for fault in ("after_change:1", "after_change_saved:2", "after_save:5"):
    work = tmp_path / fault.replace(":", "_")
    killed = _cli(work, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (fault, killed.returncode, killed.stderr[-2000:])
    assert not (work / "result.json").exists()
    resumed = _cli(work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    got = _adapter_leaves(work)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{fault}: {k}")
    _same_losses(work / "metrics.jsonl", smoke_reference / "metrics.jsonl")  # timings aside


def _same_losses(a, b):
  la = [(x["step"], x["loss"]) for x in map(json.loads, pathlib.Path(a).read_text().splitlines())]
  lb = [(x["step"], x["loss"]) for x in map(json.loads, pathlib.Path(b).read_text().splitlines())]
  assert la == lb
  return True


@pytest.mark.slow
def test_external_sigkill_at_a_random_moment_then_resume(tmp_path, smoke_reference):
  work = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("LORA_SQUEEZE_FAULT", None)
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      f"--config={ROOT / 'configs' / 'smoke.py'}:steps=24",
      f"--workdir={work}",
      "--config.progress=False",
  ]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  metrics = work / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = _cli(work)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want, got = _adapter_leaves(smoke_reference), _adapter_leaves(work)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  _same_losses(work / "metrics.jsonl", smoke_reference / "metrics.jsonl")
  # A finished workdir: no training (the metrics file is untouched).
  before = metrics.read_text()
  again = _cli(work)
  assert again.returncode == 0 and "nothing to do" in again.stdout and metrics.read_text() == before


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  # 1e8: the loss turns NaN at step 3 (at 1e30 the first update overflows and nothing is ever saved:
  # tests/test_reliability.py).
  config = _smoke(mode="direct", steps=12, learning_rate=1e8, checkpoint_every=1, log_every=1, warmup_steps=0)
  with pytest.raises(FloatingPointError, match="non-finite loss .* at step"):
    train.run(config, tmp_path / "w")
  assert not (tmp_path / "w" / "result.json").exists()
  lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert lines and all(np.isfinite(x["loss"]) for x in lines)
  ckpts = checkpoints_lib.Checkpoints(tmp_path / "w" / "checkpoints", keep=2)
  meta = ckpts.latest_meta()
  # The newest kept checkpoint is the last state whose own loss was finite: the state after the last
  # logged step produced the NaN, so it was set aside.
  assert meta["global_step"] == lines[-1]["step"] - 1
  ckpts.close()


def test_tensorboard_events_and_timing(tmp_path):
  config = _smoke(mode="direct", steps=6, tensorboard=True, log_every=2)
  result = train.run(config, tmp_path / "w")
  events = list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))
  assert events, list((tmp_path / "w").iterdir())
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(events[0].parent))
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  assert {"loss", "lr", "rank", "tokens_per_s"} <= tags, tags
  timing = result["timing"]
  assert timing["stages"][0]["steady_steps"] == 5 and timing["stages"][0]["first_step_seconds"] > 0
  assert timing["steady_step_seconds"] > 0 and result["final_train_loss"] == result["stages"][0]["final_loss"]


@pytest.mark.parametrize("max_targets", [7, 13, 64])
def test_answer_loss_and_gradient_equal_a_float64_reference(max_targets):
  """The gathered projection = a dense float64 reference, loss and gradient, whatever the padding."""
  rng = np.random.default_rng(0)
  b, t, d, v = 3, 9, 8, 50
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
  mask = np.zeros((b, t), np.int32)
  mask[0, 3:6] = mask[1, 8] = mask[2, 1:4] = 1  # 7 targets
  fn = lambda h: trainer_lib.answer_loss(h, tokens, jnp.asarray(mask), emb, max_targets=max_targets)
  (loss, count), grad = jax.value_and_grad(fn, has_aux=True)(hidden)

  def ref(h):
    h = np.asarray(h, np.float64)
    logits = h @ np.asarray(emb, np.float64).T
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    bi, ti = np.nonzero(mask)
    return -np.mean(logp[bi, ti - 1, np.asarray(tokens)[bi, ti]])

  assert int(count) == 7
  assert abs(float(loss) - ref(hidden)) < 1e-5 * ref(hidden)
  eps = 1e-4  # finite differences in float64 on two coordinates that matter and one that does not
  for idx in [(0, 2, 1), (2, 3, 0), (1, 0, 4)]:
    hp = np.asarray(hidden, np.float64).copy()
    hm = hp.copy()
    hp[idx] += eps
    hm[idx] -= eps
    fd = (ref(hp) - ref(hm)) / (2 * eps)
    assert abs(float(grad[idx]) - fd) < 1e-4, (idx, float(grad[idx]), fd)


def test_remat_gives_the_same_loss_and_gradients_and_saves_only_block_inputs(tiny):
  """config.remat: each block rematerialised in the backward pass. Same loss and LoRA gradients (float32
  reassociation only), and the residuals a gradient keeps from the forward pass (JAX's own accounting,
  what a memory-aware scheduler on TPU/GPU holds; XLA:CPU's schedule does not show it, see
  experiments/remat_memory.py) shrink to about the blocks' inputs."""
  batch = jax.tree.map(jnp.asarray, _batch(tiny.tokenizer, n=4, max_len=64, seed=3))
  lp, cfg = _random_lora(tiny, 4, seed=5)
  results, saved = {}, {}
  for remat in (False, True):
    trainer = trainer_lib.Trainer(tiny, cfg, max_targets=256, remat=remat)
    loss = lambda p, b, t=trainer: t._loss(p, tiny.params, b)  # pylint: disable=protected-access
    results[remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(lp, batch)
    saved[remat] = aot.residual_bytes(lambda p, b, loss=loss: loss(p, b)[0], lp, batch)

  def rel(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  (loss0, count0), grads0 = results[False]
  (loss1, count1), grads1 = results[True]
  assert int(count0) == int(count1) > 0
  assert float(np.abs(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads0)])).max()) > 0
  assert rel(loss1, loss0) < 1e-6 and rel(grads1, grads0) < 1e-5
  # Without remat every layer's intermediates are kept; with it, about one (B, T, D) input per block.
  layers, (b, t), d = tiny.config.num_layers, batch["tokens"].shape, tiny.config.embed_dim
  assert saved[False] > 4 * saved[True], saved
  assert saved[True] < 4 * layers * b * t * d * 4 + (1 << 20), saved
