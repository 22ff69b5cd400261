"""Workdirs, sweep stores and the command line cannot be silently corrupted (the README's guarantees):

a resume gives the same result; a changed config is refused (``--fresh`` moves the old run aside); one
writer per workdir; a corrupt checkpoint falls back to an older one; a divergent state is never kept; a
user error is one line with exit status 2 and creates nothing; a plain CPU run prints no harmless native
error lines. Real subprocesses, real orbax checkpoints, the tiny model.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lora_squeeze import runtime
from lora_squeeze import sweep
from lora_squeeze import data
from lora_squeeze import train
from lora_squeeze import checkpoints as checkpoints_lib
from lora_squeeze import trainer as trainer_lib
from lora_squeeze import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.py"


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  for k in ("LORA_SQUEEZE_FAULT", runtime.VERBOSE_ENV):
    env.pop(k, None)
  env.update(extra)
  return env


def _main(workdir, *args, config=f"{SMOKE}:steps=24", fault=None, timeout=600):
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      f"--config={config}",
      f"--workdir={workdir}",
      "--config.progress=False",
      *args,
  ]
  return subprocess.run(
      cmd, env=_env(**({"LORA_SQUEEZE_FAULT": fault} if fault else {})), capture_output=True, text=True, timeout=timeout
  )


def _one_error_line(proc, *patterns):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for p in patterns:
    assert p in lines[0], (p, lines[0])
  return lines[0]


def _smoke(**overrides):
  import importlib.util

  spec = importlib.util.spec_from_file_location("smoke", SMOKE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("steps=24")
  config.progress = False
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _leaves(workdir):
  params, _, _ = checkpoints_lib.load_adapter(pathlib.Path(workdir) / checkpoints_lib.ADAPTER_DIR)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted smoke run (3-stage In-Squeeze) through the command line."""
  work = tmp_path_factory.mktemp("ref") / "w"
  proc = _main(work)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work


# ------------------------------------------------------------------------- 1. a changed config on resume


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_fresh_moves_the_old_run_aside(tmp_path, reference):
  work = tmp_path / "w"
  killed = _main(work, fault="after_save:10")
  assert killed.returncode == -signal.SIGKILL
  before = sorted(p.name for p in (work / "checkpoints").iterdir())
  # Another source rank and another step count: refused, one line naming both keys, nothing touched.
  line = _one_error_line(
      _main(work, "--config.source_rank=16", "--config.steps=30"), "source_rank: 8 -> 16", "steps: 24 -> 30", "--fresh"
  )
  assert "lora.rank" not in line
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before
  # A finished workdir is refused too when the settings differ (it used to print "nothing to do").
  _one_error_line(_main(reference, "--config.learning_rate=0.1"), "learning_rate: 0.03 -> 0.1")
  # Presentation keys may differ: the resume goes on, and ends as the uninterrupted run did.
  resumed = _main(work, "--config.log_every=3", "--config.checkpoint_every=7")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want, got = _leaves(reference), _leaves(work)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # --fresh: the old run moves to superseded/, intact; the new one starts at step 0 with its own settings.
  fresh = _main(work, "--config.source_rank=4", "--fresh")
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  (old,) = (work / "superseded").iterdir()
  assert (old / "result.json").exists() and (old / "checkpoints").is_dir() and (old / "adapter").is_dir()
  assert json.loads((old / "config.json").read_text())["source_rank"] == 8
  result = json.loads((work / "result.json").read_text())
  assert result["ranks_per_stage"] == [4, 2] and result["steps"] == 24
  steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 25))


def test_settings_differences_and_nearest_keys():
  old = {"lora": {"rank": 8, "targets": ["q", "v"]}, "steps": 10, "model_options": {}}
  new = {
      "lora": {"rank": 4, "targets": ["q", "v"]},
      "steps": 10,
      "model_options": {"checkpoint": "/x"},
      "data": {"pack": False},
  }
  assert workdir_lib.differences(old, new) == [
      "lora.rank: 8 -> 4",
      'model_options: {} -> "<absent>"',
      'model_options.checkpoint: "<absent>" -> "/x"',
  ]
  keys = ["learning_rate", "lora.rank", "data.task", "steps", "extra_steps"]
  assert workdir_lib.nearest_keys("lr", keys)[0] == "learning_rate"
  assert workdir_lib.nearest_keys("lora.rnak", keys)[0] == "lora.rank"
  assert workdir_lib.nearest_keys("stpes", keys)[0] == "steps"
  assert workdir_lib.nearest_keys("zzz", keys) == []


# ------------------------------------------------------------------------- 2. sweep cells with changed settings


def test_sweep_reruns_a_changed_cell_and_keeps_the_old_record(tmp_path):
  config = _smoke(mode="direct", steps=4, checkpoint_every=2)
  config.sweep = [
      {"name": "a", "overrides": {"lora.rank": 4}},
      {"name": "post", "overrides": {"mode": "post_squeeze", "source_workdir": "@a", "target_ranks": (2,)}},
  ]
  evaluate = lambda model, params, cfg: {}  # pylint: disable=unnecessary-lambda-assignment
  run = lambda cfg, wd, **kw: train.run(cfg, wd, evaluate_fn=evaluate, **kw)  # pylint: disable=unnecessary-lambda-assignment
  first = sweep.run_sweep(config, tmp_path, run_fn=run)
  assert {n: r["status"] for n, r in first.items()} == {"a": "ok", "post": "ok"}
  assert first["a"]["settings"]["steps"] == 4 and first["a"]["result"]["steps"] == 4

  # Unchanged: nothing runs (a run_fn that fails would record an error).
  def must_not_run(cfg, wd, **kw):
    raise AssertionError(f"ran {wd}")

  again = sweep.run_sweep(config, tmp_path, run_fn=must_not_run)
  for name in ("a", "post"):  # the stored records, untouched
    assert (again[name]["fingerprint"], again[name]["seconds"]) == (first[name]["fingerprint"], first[name]["seconds"])
  # Another step count: cell a reruns afresh, and so does post, whose source changed.
  config.steps = 6
  second = sweep.run_sweep(config, tmp_path, run_fn=run)
  assert second["a"]["status"] == "ok" and second["a"]["result"]["steps"] == 6
  assert second["post"]["status"] == "ok" and second["post"]["sources"]["a"] == second["a"]["fingerprint"]
  kept = sorted(p.name.split(".")[0] for p in (tmp_path / "results" / "superseded").iterdir())
  assert kept == ["a", "post"]
  old_a = json.loads(next((tmp_path / "results" / "superseded").glob("a.*.json")).read_text())
  assert old_a["result"]["steps"] == 4
  assert (tmp_path / "cells" / "a" / "superseded").is_dir()  # the old workdir's files, set aside


# ------------------------------------------------------------------------- 3. one writer per workdir


@pytest.mark.slow
def test_second_process_on_a_busy_workdir_exits_naming_the_holder(tmp_path, reference):
  work = tmp_path / "w"
  cmd = [
      sys.executable,
      "-m",
      "lora_squeeze.main",
      f"--config={SMOKE}:steps=24",
      f"--workdir={work}",
      "--config.progress=False",
  ]
  first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "metrics.jsonl").exists():
      time.sleep(0.05)
    assert first.poll() is None
    second = _main(work)
    _one_error_line(second, f"is in use by pid {first.pid} on ")
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The kernel released the lock with the killed process: the next run resumes and finishes.
  resumed = _main(work)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for k, v in _leaves(reference).items():
    np.testing.assert_array_equal(_leaves(work)[k], v, err_msg=k)


def test_lock_is_exclusive_and_released(tmp_path):
  with workdir_lib.Lock(tmp_path):
    with pytest.raises(workdir_lib.UserError, match=f"in use by pid {os.getpid()} on "):
      with workdir_lib.Lock(tmp_path):
        pass
    with workdir_lib.Lock(tmp_path, primary=False):  # other processes of a multi-host run take no lock
      pass
  with workdir_lib.Lock(tmp_path):  # released
    pass


# ------------------------------------------------------------------------- 4. a corrupt newest checkpoint


def _corrupt_newest(work: pathlib.Path, how: str) -> int:
  ckpts = work / "checkpoints"
  newest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  if how == "truncate":  # every array data file of the state (ocdbt's d/ directories) cut in half
    data = [p for p in (ckpts / str(newest) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  else:  # the metadata of every item removed
    for p in (ckpts / str(newest)).rglob("*metadata*"):
      if p.is_file():
        p.unlink()
      else:
        import shutil

        shutil.rmtree(p)
  return newest


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "metadata"])
def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path, reference, how):
  work = tmp_path / "w"
  killed = _main(work, fault="after_save:20")
  assert killed.returncode == -signal.SIGKILL
  newest = _corrupt_newest(work, how)
  resumed = _main(work)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  said = resumed.stdout + resumed.stderr
  assert f"checkpoint step {newest // 2}" in said and "does not restore, skipped" in said, said[-2000:]
  assert "Traceback" not in said and len(said.splitlines()) < 10
  for k, v in _leaves(reference).items():  # the run redid the lost steps and ended as the reference
    np.testing.assert_array_equal(_leaves(work)[k], v, err_msg=k)
  assert (work / checkpoints_lib.Checkpoints.SKIPPED_DIR).is_dir()


@pytest.mark.slow
def test_no_checkpoint_restores_is_one_clear_error(tmp_path):
  work = tmp_path / "w"
  assert _main(work, fault="after_save:10").returncode == -signal.SIGKILL
  for ckpt in (work / "checkpoints").iterdir():
    for p in ckpt.rglob("_METADATA"):
      p.unlink()
  _one_error_line(_main(work), "none of the", "restores", "--fresh")


# ------------------------------------------------------------------------- 5. divergence


def test_divergence_never_keeps_the_state_that_diverged(tmp_path):
  # At this rate the tiny run's loss turns NaN at step 3; the state after step 2 (saved: checkpoint_every=1)
  # is the one that diverged, so only step 1's may be kept.
  config = _smoke(
      mode="direct", steps=12, learning_rate=1e8, checkpoint_every=1, log_every=1, warmup_steps=0, keep_checkpoints=20
  )
  with pytest.raises(FloatingPointError) as e:
    train.run(config, tmp_path / "w")
  message = str(e.value)
  lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  bad_step = lines[-1]["step"] + 1  # the first step whose loss was not finite
  assert f"non-finite loss nan at step {bad_step}" in message
  ckpts = checkpoints_lib.Checkpoints(tmp_path / "w" / "checkpoints", keep=20)
  kept = ckpts.latest()
  assert kept is not None and kept // 2 == bad_step - 2
  assert f"the newest checkpoint, step {kept // 2}," in message
  # The kept state's own loss is finite.
  trainer = trainer_lib.Trainer(trainer_lib.load_model(config), trainer_lib.lora_config_from(config), max_targets=16)
  _, state = ckpts.restore_latest(trainer.abstract_state)
  ckpts.close()
  batch = next(data.make_train_iterator(config.data, trainer.model.tokenizer, seed=config.seed))
  assert np.isfinite(float(trainer.eval_loss(state["params"], trainer.model.params, batch)[0]))


def test_non_finite_parameters_are_never_saved(tmp_path):
  # At 1e30 the first update already overflows: the loss of step 1 is finite, its new state is not.
  config = _smoke(mode="direct", steps=12, learning_rate=1e30, checkpoint_every=1, log_every=1, warmup_steps=0)
  with pytest.raises(
      FloatingPointError,
      match="non-finite parameters after the update at step 1 .* no " "checkpoint was saved before it",
  ):
    train.run(config, tmp_path / "w")
  assert not any((tmp_path / "w" / "checkpoints").iterdir())


# ------------------------------------------------------------------------- 7. user errors: one line, exit 2


_BAD_RUNS = {
    "config argument typo": ([f"--config={SMOKE}:stpes=5"], "'stpes' is not one of"),
    "unknown key --config.lr": (["--config.lr=abc"], "did you mean 'learning_rate'"),
    "bad value": (["--config.learning_rate=abc"], "--config.learning_rate=abc"),
    "rank 0": ([f"--config={ROOT / 'configs' / 'direct.py'}:rank=0", "--config.model=tiny"], "lora.rank=0"),
    "negative steps": (["--config.steps=-3"], "config.steps=-3"),
    "unknown task": (["--config.data.source=olmo", "--config.data.task=arc_ee"], "did you mean 'arc_e'"),
    "task with the synthetic source": (["--config.data.task=arc_e"], "synthetic task and source go together"),
    "missing config file": ([f"--config={ROOT / 'configs' / 'nope.py'}"], "no such config file"),
}


@pytest.mark.parametrize("case", sorted(_BAD_RUNS))
def test_user_errors_are_one_line_and_create_nothing(tmp_path, case):
  args, expected = _BAD_RUNS[case]
  config = [a for a in args if a.startswith("--config=")]
  rest = [a for a in args if not a.startswith("--config=")]
  work = tmp_path / "new" / "w"
  proc = _main(work, *rest, **({"config": config[0].split("=", 1)[1]} if config else {}))
  _one_error_line(proc, "error:", expected)
  assert not (tmp_path / "new").exists()


def test_workdir_that_is_a_file_or_read_only(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  _one_error_line(_main(a_file), "is a file, not a directory")
  ro = tmp_path / "ro"
  ro.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
  if mounted.returncode != 0:  # no mount rights: a non-writable directory does for a non-root user
    if os.geteuid() == 0:
      pytest.skip("cannot make a read-only directory here: " + mounted.stderr.decode()[:200])
    ro.chmod(0o555)
  try:
    _one_error_line(_main(ro / "w"), "is not writable")
  finally:
    if mounted.returncode == 0:
      subprocess.run(["umount", str(ro)], check=True)


def _sweep_cli(*args):
  cmd = [sys.executable, "-m", "lora_squeeze.sweep", *args]
  return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_sweep_user_errors_are_one_line(tmp_path):
  _one_error_line(_sweep_cli(f"--config={SMOKE}", f"--workdir={tmp_path / 's1'}"), "no 'sweep' cells")
  _one_error_line(
      _sweep_cli(f"--config={ROOT / 'configs' / 'quickstart.py'}", f"--workdir={tmp_path / 's2'}", "--cell=direct_r9"),
      "unknown cell 'direct_r9'",
      "did you mean 'direct_r2'",
  )
  assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


# ------------------------------------------------------------------------- 8. result.json after a resume


@pytest.mark.slow
def test_result_after_a_resume_equals_the_uninterrupted_one_but_timings(tmp_path, reference):
  work = tmp_path / "w"
  assert _main(work, fault="after_change_saved:2").returncode == -signal.SIGKILL
  assert _main(work).returncode == 0
  timing_keys = {"wall_seconds", "timing"}
  want = {k: v for k, v in json.loads((reference / "result.json").read_text()).items() if k not in timing_keys}
  got = {k: v for k, v in json.loads((work / "result.json").read_text()).items() if k not in timing_keys}
  assert all(s["final_loss"] is not None for s in got["stages"])
  assert got == want


# ------------------------------------------------------------------------- 9. quiet by default


def test_a_plain_cpu_run_prints_no_harmless_native_lines(tmp_path, reference):
  # Twice: the second run loads its programs from the persistent compile cache (XLA:CPU's AOT loader lines).
  cache = {"LORA_SQUEEZE_JAX_CACHE": str(tmp_path / "cache")}
  for i in range(2):
    cmd = [
        sys.executable,
        "-m",
        "lora_squeeze.main",
        f"--config={SMOKE}:steps=6",
        f"--workdir={tmp_path / str(i)}",
        "--config.progress=False",
    ]
    proc = subprocess.run(cmd, env=_env(**cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]


def test_the_filter_drops_only_the_known_harmless_lines():
  script = (
      "import os, sys, warnings\n"
      "from lora_squeeze import runtime\n"
      "runtime.quiet_native_logs()\n"
      "os.write(2, b'E0000 00:00:1.2 4127 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\\n')\n"
      "os.write(2, b'E1202 02:18:13.722 7775 cpu_aot_loader.cc:195] Loading XLA:CPU AOT result. Target machine "
      "feature +prefer-no-gather is not  supported on the host machine.\\n')\n"
      "os.write(2, b'train:  50%|#####     | 3/6\\rE1202 02:18:13.7 1 cpu_aot_loader.cc:195] Loading XLA:CPU AOT "
      "result. Target machine feature +prefer-no-scatter is not  supported\\n')\n"
      "os.write(2, b'E1202 02:18:13.722 7775 some_kernel.cc:1] a real native error\\n')\n"
      "import asyncio, threading\n"
      "loop = asyncio.new_event_loop(); loop.close()\n"
      "class Callback:  # what orbax/tensorstore do once a failed restore closed its loop: unraisable errors\n"
      "  def __del__(self): loop.call_soon_threadsafe(print)\n"
      "class Real:\n"
      "  def __del__(self): raise KeyError('a real unraisable error')\n"
      "threads = [threading.Thread(target=lambda: [Callback() for _ in range(20)]) for _ in range(4)]\n"
      "[t.start() for t in threads]; [t.join() for t in threads]\n"
      "Real()\n"
      "print('a line after them', file=sys.stderr, flush=True)\n"
      "os.write(2, b'Traceback (most recent call last):\\n  File \"/x/y.py\", line 1, in f\\nKeyError: 7\\n')\n"
      "warnings.warn('a real warning')\n"
      "raise SystemExit('the end')\n"
  )
  proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
  assert "cuInit" not in proc.stderr and "prefer-no-" not in proc.stderr
  assert "train:  50%|#####     | 3/6" in proc.stderr  # the progress bar before the dropped part stays
  assert "a real native error" in proc.stderr and "a real warning" in proc.stderr and "the end" in proc.stderr
  assert "Event loop is closed" not in proc.stderr and proc.stderr.count("Traceback") == 2, proc.stderr
  assert "a line after them" in proc.stderr and "a real unraisable error" in proc.stderr
  assert 'File "/x/y.py", line 1, in f\nKeyError: 7' in proc.stderr  # a real traceback, whole
  loud = subprocess.run(
      [sys.executable, "-c", script],
      env=_env(**{runtime.VERBOSE_ENV: "1"}),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert "cuInit" in loud.stderr and "prefer-no-gather" in loud.stderr and "Event loop is closed" in loud.stderr
