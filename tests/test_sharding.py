"""Sharded training on a device mesh and multi-process runs, on CPU.

* Mesh rules (no extra devices needed): mesh shapes from the config, the fsdp rule, the batch blocks of a
  process, sharded iterators giving exactly the rows of the global batch.
* 4 host devices (``--xla_force_host_platform_device_count=4`` must be set before jax is imported, so that
  part runs in a subprocess: this file with ``four_devices`` as its argument): sharded train steps and rank
  changes (data x fsdp, replicated and fsdp-sharded LoRA) equal the single-device ones, and
  ``squeeze_lora`` on sharded factors equals it on whole ones.
* Two real processes on 127.0.0.1 (``jax.distributed``, gloo CPU collectives) run the smoke config through
  ``lora_squeeze.main``: one of them is SIGKILLed mid-run, the other fails within the heartbeat timeout
  (no hang), and a restart of both resumes from the last checkpoint and ends where a single-process run
  ends (allclose: a sharded batch sums its loss in another order).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ rules


def test_mesh_shape_and_fsdp_rule():
  from jax.sharding import PartitionSpec as P
  from lora_squeeze import sharding

  assert sharding.mesh_shape({}, 8) == (8, 1)
  assert sharding.mesh_shape({"fsdp": 4}, 8) == (2, 4)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
  with pytest.raises(ValueError, match="exactly the 8 devices"):
    sharding.mesh_shape({"data": 3}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  # Specs in jit's normal form (no trailing None), the form a program's outputs carry.
  assert sharding.fsdp_spec((262144, 640), 4) == P("fsdp")  # the embedding: the vocab dim
  assert sharding.fsdp_spec((4, 640, 256), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((6, 10), 4) == P()  # nothing divides: replicated
  assert sharding.fsdp_spec((640,), 1) == P()


def test_mesh_from_config_one_device_and_batch_shard():
  import jax
  from lora_squeeze import config_lib
  from lora_squeeze import sharding

  config = config_lib.base_config()
  mesh = sharding.mesh_from_config(config)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert sharding.process_batch_shard(mesh, 8) == (0, 1)
  assert not sharding.shard_lora_enabled(config)


def test_sharded_iterators_give_the_rows_of_the_global_batch():
  from lora_squeeze import models
  from lora_squeeze.data import pipeline
  from lora_squeeze.data import synthetic
  from lora_squeeze.data import tasks

  tok = models.load("tiny").tokenizer
  src = [tasks.Example(prompt=f"q{i}", target=f"a{i}", choices=(), answers=()) for i in range(37)]
  makers = {
      "grain": lambda shard: pipeline.train_iterator(src, tok, batch_size=4, max_len=16, seed=3, shard=shard),
      "synthetic": lambda shard: synthetic.SyntheticIterator(tok, batch_size=4, max_len=16, seed=1, shard=shard),
  }
  for name, make in makers.items():
    whole, parts = make((0, 1)), [make((i, 2)) for i in range(2)]
    for step in range(12):  # past an epoch boundary of the 37 examples
      want, got = next(whole), [next(p) for p in parts]
      for k in want:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=f"{name} {k}")
    # The state is the global stream's position: the same in every process, and resumable in another.
    assert parts[0].get_state() == parts[1].get_state() == whole.get_state()
    resumed = make((1, 2))
    resumed.set_state(parts[0].get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], next(parts[1])["tokens"])
    with pytest.raises(ValueError, match="shard"):
      make((0, 3))


# ------------------------------------------------------------------------------------------ 4 devices


def _four_devices() -> None:
  """Runs in a subprocess with 4 CPU devices; raises on any mismatch. Kept to few distinct programs: on
  2 CPU cores every SPMD compile costs seconds."""
  import dataclasses

  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lora_squeeze import runtime
  from lora_squeeze import lora
  from lora_squeeze import models
  from lora_squeeze import sharding
  from lora_squeeze import squeeze
  from lora_squeeze import trainer as trainer_lib
  from lora_squeeze.data import synthetic

  runtime.enable_compile_cache()
  assert jax.device_count() == 4, jax.devices()
  tiny = models.load("tiny")
  it = synthetic.SyntheticIterator(tiny.tokenizer, batch_size=8, max_len=16, seed=0)
  batches = [next(it) for _ in range(4)]
  cfg = lora.LoRAConfig(rank=8)

  def train_and_squeeze(mesh):
    # fsdp-sharded LoRA (shard_lora=True): the harder case; the default (replicated) runs in the
    # two-process test.
    trainer = trainer_lib.Trainer(
        tiny, cfg, max_targets=64, optimizer_state="carry", mesh=mesh, shard_lora=mesh is not None
    )
    base = tiny.params
    if mesh is not None:
      base = sharding.put(base, sharding.base_shardings(base, mesh))
    state = trainer.init_state(jax.random.key(0), 8)
    losses = []
    for i, batch in enumerate(batches):
      if i == 2:  # the rank change 8 -> 4 in the middle (params squeezed, optimizer state carried)
        state = trainer.change_rank(state, 4, jax.random.key(7))
      state, m = trainer.train_step(state, base, batch, 0.03)
      losses.append(float(m["loss"]))
    return trainer, base, state, losses

  _, _, want_state, want_losses = train_and_squeeze(None)
  want = jax.device_get(want_state)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2})
  trainer, base, state, losses = train_and_squeeze(mesh)
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  # SVD factors are unique up to the sign of each direction, and the one-device and mesh programs may
  # differ in it (and did while the one-device change took the numpy/LAPACK host route): compare each
  # module's product a @ b, the optimizer's statistics (squares, so sign-free) and the step.
  got = jax.device_get(state)

  def products(tree):
    if isinstance(tree, dict) and set(tree) == {"a", "b"}:
      return np.tensordot(tree["a"], tree["b"], axes=([-1], [0]))
    return {k: products(v) for k, v in tree.items()}

  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
      products(got["params"]),
      products(want["params"]),
  )
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(np.abs(g), np.abs(w), rtol=1e-4, atol=1e-6),
      got["opt_state"],
      want["opt_state"],
  )
  assert int(got["step"]) == int(want["step"])
  assert trainer.traces["train_step"] == 2 and trainer.traces["change_rank"] == 1, trainer.traces
  # ... and compiled once per rank: the state's layouts (init, rank change) are the step's output layouts
  # (an init with P('fsdp', None) where the step returns P('fsdp',) compiled the first rank's step twice).
  assert trainer.train_step_program._cache_size() == 2, trainer.train_step_program._cache_size()  # pylint: disable=protected-access

  # The layouts are the ones sharding.py promises.
  def spec_is(x, spec):
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)

  emb = base["embedder"]["input_embedding"]  # (vocab, d): vocab split over fsdp
  assert spec_is(emb, P("fsdp", None)) and len(emb.addressable_shards) == 4, emb.sharding
  a = state["params"]["layer_0"]["mlp"]["down_lora"]["a"]  # (F=128, r=4) after the rank change
  assert spec_is(a, P("fsdp", None)), a.sharding
  assert state["step"].sharding.is_fully_replicated

  # squeeze_lora on fsdp-sharded factors gives the same ΔW as on whole ones. One layer's attention keeps
  # the number of compiled programs small.
  params = lora.init_lora(jax.random.key(0), tiny.config, cfg)["layer_0"]["attn"]
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  sharded = sharding.put(params, sharding.base_shardings(params, sharding.make_mesh({"data": 1, "fsdp": 4})))
  assert sharded["q_lora"]["a"].sharding.spec[0] == "fsdp"
  want = squeeze.squeeze_lora(params, 3, key=jax.random.key(2))
  got = squeeze.squeeze_lora(sharded, 3, key=jax.random.key(2))
  for name in params:
    dw = lambda pair: np.asarray(np.matmul(*squeeze.to_matrices(*jax.device_get((pair["a"], pair["b"])))))
    np.testing.assert_allclose(dw(got[name]), dw(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)
  # Evaluation on a mesh (fsdp-sharded base, host batches): each program splits its rows over the batch axes
  # (sharding.row_sharding) and returns replicated outputs, with the one-device results. 4 rows on the
  # 2 x 2 mesh split both ways; 2 rows split over data only.
  from lora_squeeze import evaluate
  from lora_squeeze.data import tasks

  exs = [
      tasks.Example(prompt="The sky is", choices=(" blue", " green"), answers=(0,), target=" blue"),
      tasks.Example(prompt="x", choices=(" a", " bb", " ccc", " dddd"), answers=(2, 3), target=" ccc"),
      tasks.Example(prompt="Two plus two is", choices=(" four", " five", " six"), answers=(0,), target=" four"),
  ]
  lp = jax.device_get(want_state["params"])
  assert sharding.row_sharding(mesh, 4).spec == P(("data", "fsdp")) and sharding.row_sharding(mesh, 2).spec == P(
      ("data",)
  )
  assert (
      sharding.row_sharding(mesh, 3) is None
      and sharding.mesh_of(base) is mesh
      and sharding.mesh_of(tiny.params) is None
  )
  sharded_model = dataclasses.replace(tiny, params=base)
  for rows in (4, 2):
    want_scores = evaluate.ChoiceScorer(tiny, lp, cfg, max_len=32, batch_rows=rows).score(exs)
    scorer = evaluate.ChoiceScorer(sharded_model, lp, cfg, max_len=32, batch_rows=rows)
    assert scorer.mesh is mesh
    for (gs, gc), (ws, wc) in zip(scorer.score(exs), want_scores):
      np.testing.assert_allclose(gs, ws, rtol=2e-5, atol=1e-5)
      np.testing.assert_array_equal(gc, wc)
  # The vision tower and a greedy step of a multimodal model, 4 rows.
  mm = models.load("tiny", text_only=False)
  mm_base = sharding.put(mm.params, sharding.base_shardings(mm.params, mesh))
  spec = models.image_spec(mm)
  images = np.random.default_rng(0).integers(0, 256, (4, 1, spec.height, spec.width, 3), dtype=np.uint8)
  embed_1, step_1 = evaluate.vl_decode_programs(mm)
  embed_m, step_m = evaluate.vl_decode_programs(dataclasses.replace(mm, params=mm_base))
  want_emb, got_emb = np.asarray(embed_1(mm.params, images)), embed_m(mm_base, images)
  assert got_emb.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(got_emb), want_emb, rtol=1e-4, atol=1e-5)
  # ... and each device runs the tower on its own row: a quarter of the one-device FLOPs (3.84x fewer here;
  # without the row split XLA partitions along the fsdp-sharded weights only: 1.68x fewer).
  flops = lambda prog, b: prog.lower(b, images).compile().cost_analysis()["flops"]
  assert flops(embed_m, mm_base) < 0.3 * flops(embed_1, mm.params), (flops(embed_m, mm_base), flops(embed_1, mm.params))
  toks = np.random.default_rng(1).integers(1, 100, (4, 16)).astype(np.int32)
  pos = np.tile(np.arange(16, dtype=np.int32), (4, 1))
  segs = np.ones((4, 16), np.int32)
  last = np.asarray([15, 9, 12, 3], np.int32)
  got_next = step_m(None, mm_base, toks, pos, segs, last)
  assert got_next.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(got_next), np.asarray(step_1(None, mm.params, toks, pos, segs, last)))
  print("FOUR_DEVICES_OK")


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  for k in ("LORA_SQUEEZE_FAULT", "XLA_FLAGS", "LORA_SQUEEZE_DISTRIBUTED"):
    env.pop(k, None)
  env.update(extra)
  return env


@pytest.mark.slow
def test_four_devices_sharded_steps_and_rank_changes_equal_one_device():
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
      [sys.executable, __file__, "four_devices"], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and "FOUR_DEVICES_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------ 2 processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Both runs evaluate at the end (16 synthetic examples): the two-process run on its mesh, rows split.
EVAL = ("--config.eval.enabled=True", "--config.eval.limit=16")


def _launch(workdir, port, faults=(None, None), extra=()):
  """Both processes of a 2-process smoke run (what launch/*.sh do on real clusters)."""
  procs = []
  for i in range(2):
    env = _env(
        LORA_SQUEEZE_DISTRIBUTED="1",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        LORA_SQUEEZE_NUM_PROCESSES="2",
        LORA_SQUEEZE_PROCESS_ID=str(i),
        LORA_SQUEEZE_HEARTBEAT_TIMEOUT="10",
    )
    if faults[i]:
      env["LORA_SQUEEZE_FAULT"] = faults[i]
    log = open(pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{port}.{i}.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "lora_squeeze.main",
        f"--config={ROOT / 'configs' / 'smoke.py'}",
        f"--workdir={workdir}",
        "--config.progress=False",
        *EVAL,
        *extra,
    ]
    procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout):
  deadline = time.time() + timeout
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      codes.append("hang")
    log.close()
  return codes


def _logs(workdir):
  return "\n".join(
      f"--- {p.name}\n" + p.read_text()[-3000:]
      for p in sorted(pathlib.Path(workdir).parent.glob(f"{pathlib.Path(workdir).name}.*.log"))
  )


def _adapter(workdir):
  import jax
  from lora_squeeze import checkpoints as checkpoints_lib

  params = checkpoints_lib.load_adapter(pathlib.Path(workdir) / checkpoints_lib.ADAPTER_DIR)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _losses(workdir):
  return [(x["step"], x["loss"]) for x in map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").open())]


@pytest.mark.slow
def test_two_processes_killed_one_fails_cleanly_then_resume_matches_single_process(tmp_path):
  from lora_squeeze import train
  from test_train import _smoke  # pylint: disable=g-import-not-at-top

  reference = tmp_path / "single"
  # one process, one device: the unsharded programs
  train.run(_smoke(**{"eval.enabled": True, "eval.limit": 16}), reference)

  work = tmp_path / "two"
  # Process 1 dies (SIGKILL) right after the checkpoint of step 10; process 0 must not hang: it fails in
  # the next collective or when the coordinator misses process 1's heartbeats (10 s here).
  procs = _launch(work, _free_port(), faults=(None, "after_save:10"))
  codes = _wait(procs, timeout=240)
  assert codes[1] == -signal.SIGKILL, (codes, _logs(work))
  assert codes[0] not in (0, "hang"), (codes, _logs(work))
  assert not (work / "result.json").exists()

  # Both restart: resume from the step-10 checkpoint and finish.
  procs = _launch(work, _free_port())
  codes = _wait(procs, timeout=300)
  assert codes == [0, 0], (codes, _logs(work))
  assert "resuming" in _logs(work) and "at step 10" in _logs(work)
  result = json.loads((work / "result.json").read_text())
  assert result["ranks_per_stage"] == [8, 4, 2] and result["steps"] == 24

  # The same training as one process: same steps, losses and final adapter (up to summation order).
  got, want = _losses(work), _losses(reference)
  assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 25))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  got, want = _adapter(work), _adapter(reference)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The evaluation ran on the 2-device mesh of the two processes and scored like one device.
  got, want = result["metrics"], json.loads((reference / "result.json").read_text())["metrics"]
  assert got["n"] == want["n"] == 16 and got["accuracy"] == want["accuracy"], (got, want)
  np.testing.assert_allclose(got["gold_nll"], want["gold_nll"], rtol=1e-4)

  # A Post-Squeeze run (evaluation only, eval_modes) on the two processes' mesh: each target rank scores like
  # one process squeezing the one-process adapter.
  post = {"mode": "post_squeeze", "target_ranks": (1,)}
  ref_post = tmp_path / "single_post"
  train.run(_smoke(**{"eval.enabled": True, "eval.limit": 16, "source_workdir": str(reference)}, **post), ref_post)
  post_work = tmp_path / "two_post"
  flags = ("--config.mode=post_squeeze", f"--config.source_workdir={work}", "--config.target_ranks=(1,)")
  codes = _wait(_launch(post_work, _free_port(), extra=flags), timeout=240)
  assert codes == [0, 0], (codes, _logs(post_work))
  got = json.loads((post_work / "result.json").read_text())["targets"]["1"]["metrics"]
  want = json.loads((ref_post / "result.json").read_text())["targets"]["1"]["metrics"]
  assert got["n"] == want["n"] == 16 and got["accuracy"] == want["accuracy"], (got, want)
  np.testing.assert_allclose(got["gold_nll"], want["gold_nll"], rtol=1e-4)


if __name__ == "__main__":
  if sys.argv[1:] == ["four_devices"]:
    _four_devices()
  else:
    raise SystemExit(f"usage: {sys.argv[0]} four_devices")
