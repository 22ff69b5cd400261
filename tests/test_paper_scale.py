"""Paper-scale programs built from abstract shapes (``lora_squeeze.aot``): no weights, no accelerator.

* Fast: the aot programs of the tiny model compile and describe themselves (memory, FLOPs); the collective
  parser; the fsdp check flags whole weights; a checkpoint restores straight onto the fsdp shardings.
* Slow (``bash launch/test.sh`` runs them; each program is lowered or compiled once):
  - every cell of every paper-scale artefact of configs/paper.py and configs/vl.py builds a valid run
    config, and one cell per artefact lowers the first program it runs (Gemma 3 1B for paper.py, the 4B with
    its vision tower for vl.py);
  - the 4B rank change (LoRA on the query projections) compiles once per rank signature (128 -> 64 twice: one
    trace, one compile; 128 -> 32: a new trace);
  - on a mesh of 8 CPU devices (a subprocess: the device count is fixed before jax starts) with fsdp = 8, the
    lowered 12B train step and the 4B vision tower's eval program take no base weight whole on one device.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  for k in ("LORA_SQUEEZE_FAULT", "XLA_FLAGS", "LORA_SQUEEZE_DISTRIBUTED"):
    env.pop(k, None)
  env.update(extra)
  return env


def _run_here(name, devices, timeout):
  proc = subprocess.run(
      [sys.executable, __file__, name],
      env=_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert proc.returncode == 0 and f"{name.upper()}_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------ fast


def test_tiny_programs_compile_with_memory_and_flops():
  from lora_squeeze import aot

  setting = aot.Setting(batch=2, max_len=32, max_target_tokens=4, eval_scored=8)
  programs = aot.Programs(aot.abstract_model("tiny", dtype="float32", num_layers=2), setting)
  lowered = programs.lower("train_step", rank=16)
  info = aot.describe(lowered.compile())
  m = info["memory"]
  assert m["arguments"] > 0 and m["temporaries"] > 0
  assert m["peak_estimate"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
  assert m["aliased"] > 0  # the donated state is reused for the new one
  assert aot.argument_bytes(lowered) == m["arguments"]  # known from the shardings before compiling
  # The LoRA products grow with the rank; the lowered count is the compiled one's, near enough.
  assert info["cost"]["flops"] > aot.cost(programs.lower("train_step", rank=1))["flops"] > 0
  assert abs(aot.cost(lowered)["flops"] / info["cost"]["flops"] - 1) < 0.05
  change = programs.lower("change_rank", rank=16, target_rank=4).compile()
  assert aot.memory(change)["outputs"] > 0
  for rank in (0, 4):  # zero-shot and with LoRA
    assert aot.cost(programs.lower("eval_step", rank=rank))["flops"] > 0
  with pytest.raises(ValueError, match="vision-language"):
    programs.lower("eval_images")


def test_collectives_parser_reads_sizes():
  from lora_squeeze import aot

  class Fake:

    def as_text(self):
      return (
          "  %all-gather.1 = bf16[262144,640]{1,0} all-gather(bf16[32768,640]{1,0} %p), dimensions={0}\n"
          "  %ags = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %q)\n"
          "  %ar = f32[128]{0} all-reduce(f32[128]{0} %g), to_apply=%add\n"
      )

  got = aot.collectives(Fake())
  assert got["all-gather"] == {"count": 2, "bytes": 262144 * 640 * 2 + 64 * 16 * 2, "largest": 262144 * 640 * 2}
  assert got["all-reduce"] == {"count": 1, "bytes": 512, "largest": 512}


def test_time_plan_counts_each_cells_own_training_steps():
  plan = _module(ROOT / "experiments" / "paper_scale_plan.py")
  config = _module(ROOT / "configs" / "paper.py").get_config("artefact=table1,tasks=arc_e,lrs=1:0.01+128:0.003")
  steps = {cell["name"]: plan.cell_steps(cell, config) for cell in config.sweep}
  assert steps["arc_e_s42_zero_shot"] == [] and steps["arc_e_s42_post_128to1"] == []
  assert steps["arc_e_s42_direct_r128_lr0.003"] == [(128, 10_000)]
  assert steps["arc_e_s42_cont_128to1_m200"] == [(1, 200)]  # the source's 10k steps are its own cell's
  in_min = steps["arc_e_s42_in_min_steps_128to1_m700"]
  assert [r for r, _ in in_min] == [128, 64, 32, 16, 8, 4, 2, 1] and sum(n for _, n in in_min) == 10_700
  assert plan.flops_at({1: 10.0, 128: 137.0}, 64) == pytest.approx(73.0)


def test_mesh_comparison_sets_the_same_rows_per_device_side_by_side():
  plan = _module(ROOT / "experiments" / "paper_scale_plan.py")

  def rec(devices, temps, largest, program="train_r128", status="compiled"):
    return {
        "model": "4b",
        "devices": devices,
        "program": program,
        "status": status,
        "memory": {"temporaries": temps},
        "collectives": {"all-gather": {"count": 3, "bytes": 3 * largest, "largest": largest}},
    }

  lines = plan.mesh_comparison([rec(8, 10e9, 80e6), rec(32, 15e9, 200e6), rec(32, 1e9, 1e6, "change_rank")])
  got = [x for x in lines if x.startswith("* ")]
  assert got == [
      "* 4b train_r128, one row per device on both meshes: temporaries 10.0 GB (1 x 8) vs 15.0 GB (4 x 8), "
      "1.50x; largest collective 80.0 MB vs 200.0 MB"
  ]
  assert plan.mesh_comparison([rec(8, 10e9, 80e6), rec(32, 15e9, 200e6, status="lowered")]) == []


def _fsdp_small() -> None:
  """4 devices: the fsdp check flags whole weights (data-only mesh) and passes fsdp-split ones; a checkpoint
  restores straight onto the fsdp rule's shardings (gemma's default: replicated)."""
  import tempfile
  import jax
  import orbax.checkpoint as ocp
  from lora_squeeze import aot
  from lora_squeeze import models
  from lora_squeeze import sharding

  assert jax.device_count() == 4
  model = aot.abstract_model("tiny", dtype="float32")
  setting = aot.Setting(batch=4, max_len=16, max_target_tokens=2)
  for sizes, whole in (({"data": 4, "fsdp": 1}, True), ({"data": 1, "fsdp": 4}, False)):
    programs = aot.Programs(model, setting, mesh=sharding.make_mesh(sizes))
    found = aot.unsharded_base_inputs(programs.lower("train_step", rank=2), programs.base(), min_elements=1)
    assert bool(found) == whole and (not whole or "['embedder']['input_embedding']" in found), (sizes, found)

  tiny = models.load("tiny")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4})
  with tempfile.TemporaryDirectory() as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(f"{tmp}/params", jax.device_get(tiny.params))
    for rule in (None, lambda abstract: sharding.base_shardings(abstract, mesh)):
      params = models._load_checkpoint(
          "tiny", f"{tmp}/params", tiny.transformer, text_only=True, sharding=rule  # pylint: disable=protected-access
      )
      emb = params["embedder"]["input_embedding"]
      np.testing.assert_array_equal(np.asarray(emb), np.asarray(tiny.params["embedder"]["input_embedding"]))
      shard_rows = emb.addressable_shards[0].data.shape[0]
      assert shard_rows == (emb.shape[0] if rule is None else emb.shape[0] // 4), (rule, emb.sharding)
  print("_FSDP_SMALL_OK")


def test_fsdp_check_and_sharded_checkpoint_restore_on_four_devices():
  _run_here("_fsdp_small", 4, timeout=300)


# ------------------------------------------------------------------------------------------ slow


def _paper_scale_cells():
  """(config file, artefact, run config of every cell) of every paper-scale artefact, model as the paper."""
  from lora_squeeze import sweep

  paper = _module(ROOT / "configs" / "paper.py")
  vl = _module(ROOT / "configs" / "vl.py")
  lrs = "lrs=1:0.01+2:0.01+4:0.01+8:0.01+16:0.003+32:0.003+64:0.003+128:0.001"
  out = []
  for artefact in paper.ARTEFACTS:
    config = paper.get_config(f"artefact={artefact},model=gemma3_1b,{lrs}")
    out.append(
        (
            "paper",
            artefact,
            config,
            [sweep.cell_config(config, c, pathlib.Path("/sweep")) for c in sweep.cells_of(config)],
        )
    )
  for artefact in vl.ARTEFACTS:
    config = vl.get_config(f"artefact={artefact},{lrs}")
    out.append(
        ("vl", artefact, config, [sweep.cell_config(config, c, pathlib.Path("/sweep")) for c in sweep.cells_of(config)])
    )
  return out


def _first_program(cell, config):
  """(program, rank, target rank, method) the cell's run compiles first."""
  from lora_squeeze import train

  if cell.mode == "zero_shot":
    return ("eval_step", 0, 0, "")
  if cell.mode == "post_squeeze":
    source = next(c for c in config.sweep if f"/sweep/cells/{c['name']}" == cell.source_workdir)
    src = int(source["overrides"]["lora.rank"])
    return ("change_rank", src, max(r for r in cell.target_ranks if r <= src), cell.squeeze.method)
  stage = train.plan_stages(cell)[0]
  if stage.squeeze_first:
    return ("change_rank", int(cell.source_rank), stage.rank, cell.squeeze.method)
  return ("train_step", stage.rank, 0, "")


@pytest.mark.slow
def test_every_paper_scale_cell_builds_and_one_cell_per_artefact_lowers():
  from lora_squeeze import aot
  from lora_squeeze import config_lib
  from lora_squeeze import lora_layout
  from lora_squeeze import train
  from lora_squeeze import models

  model_configs = {}
  lowered = {}
  for source, artefact, config, cells in _paper_scale_cells():
    assert cells, (source, artefact)
    for cell in cells:  # every cell: a valid run config at the paper's shapes
      config_lib.check_run_config(cell)
      assert (cell.data.batch_size, cell.data.max_len) == (8, 1024), (artefact, cell.data)
      assert cell.model == ("gemma3_4b" if source == "vl" else "gemma3_1b")
      assert bool(cell.model_options.get("text_only", True)) == (source == "paper")
      key = (cell.model, source == "paper")
      if key not in model_configs:
        model_configs[key] = models.model_config(cell.model, text_only=key[1])
      for stage in train.plan_stages(cell):
        assert lora_layout.lora_param_count(model_configs[key], aot.Setting().lora_config(stage.rank)) > 0
    # One cell per artefact: the most complex mode it has (in_squeeze > cont > post > direct > zero-shot).
    order = ("in_squeeze", "cont_squeeze", "post_squeeze", "direct", "zero_shot")
    cell = min(cells, key=lambda c: order.index(c.mode))
    program, rank, target, method = _first_program(cell, config)
    # The same kind of program as another artefact's cell (another rank only): lowered once.
    key = (cell.model, bool(cell.model_options.get("text_only", True)), program, method)
    if key in lowered:
      continue
    programs = aot.programs_for_config(cell)
    assert "func.func public @main" in programs.lower(program, rank=rank, target_rank=target).as_text()
    lowered[key] = (source, artefact, cell.mode, programs)
  # And each model's eval step (ChoiceScorer's for 1B, the greedy VL decoding step for 4B with images).
  for (model, text_only, _, _), (_, _, _, programs) in list(lowered.items()):
    if (model, text_only, "eval_step", "") not in lowered:
      assert "func.func public @main" in programs.lower("eval_step", rank=1).as_text()
      lowered[(model, text_only, "eval_step", "")] = ()
  assert set(lowered) == {
      ("gemma3_1b", True, "train_step", ""),
      ("gemma3_1b", True, "change_rank", "efficient"),
      ("gemma3_1b", True, "eval_step", ""),
      ("gemma3_4b", False, "train_step", ""),
      ("gemma3_4b", False, "change_rank", "efficient"),
      ("gemma3_4b", False, "eval_step", ""),
  }, lowered


@pytest.mark.slow
def test_rank_change_at_4b_compiles_once_per_rank_signature():
  """128 -> 64 lowered and compiled twice: one trace, one XLA compile. 128 -> 32 is another signature: a new
  trace. LoRA on the query projections only (34 modules): the program holding all 238 modules' squeezes
  compiles in about 10 minutes on 2 CPU cores (experiments/paper_scale_plan.py compiles it); the caching does
  not depend on the number of modules."""
  import jax
  from lora_squeeze import aot

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
  )
  model = aot.abstract_model("gemma3_4b")
  setting = aot.Setting(targets=("q",))
  programs = aot.Programs(model, setting)
  before = len(compiles)
  first = programs.lower("change_rank", rank=128, target_rank=64).compile()
  again = programs.lower("change_rank", rank=128, target_rank=64).compile()
  assert len(compiles) - before == 1 and programs.trainer.traces["change_rank"] == 1
  assert aot.memory(again) == aot.memory(first)
  # The output is the rank-64 state: its params and a fresh Adafactor state, unfactored below rank 128 (a
  # second moment per parameter), so twice the params' bytes.
  assert abs(aot.memory(first)["outputs"] - 2 * aot.lora_bytes(model, 64, setting)) < 1 << 16
  other = programs.lower("change_rank", rank=128, target_rank=32)
  assert programs.trainer.traces["change_rank"] == 2 and len(compiles) - before == 1
  assert aot.argument_bytes(other) == aot.memory(first)["arguments"]  # same input state, another output


def _fsdp_paper_scale() -> None:
  """8 devices, data 1 x fsdp 8: the 12B train step and the 4B image embedding hold no whole base weight."""
  import jax
  from lora_squeeze import aot
  from lora_squeeze import sharding

  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  for name, text_only, program in (("gemma3_12b", True, "train_step"), ("gemma3_4b", False, "eval_images")):
    programs = aot.Programs(aot.abstract_model(name, text_only=text_only), aot.Setting(), mesh=mesh)
    base = programs.base()
    whole = aot.unsharded_base_inputs(programs.lower(program, rank=1), base)
    assert whole == [], (name, program, whole[:8])
    big = [x for x in jax.tree.leaves(base) if x.size >= 1 << 20]
    assert big and all(x.sharding.shard_shape(x.shape) != x.shape for x in big)
  # The image embedding splits its 8 rows over the 8 devices (sharding.row_sharding): it gathers weights
  # (largest 19.8 MB) and all-reduces no activations. With host rows not split it all-reduced the tower's
  # attention tensor, 8.6 GB at once (240 GB in all), and held 17.2 GB of temporaries per device (3.8 GB now).
  compiled = programs.lower("eval_images").compile()
  comm = aot.collectives(compiled)
  assert "all-reduce" not in comm and comm["all-gather"]["largest"] < 1 << 26, comm
  assert aot.memory(compiled)["temporaries"] < 8e9, aot.memory(compiled)
  print("_FSDP_PAPER_SCALE_OK")


@pytest.mark.slow
def test_fsdp_mesh_of_8_holds_no_whole_base_weight_at_12b_and_4b_vision():
  _run_here("_fsdp_paper_scale", 8, timeout=900)


if __name__ == "__main__":
  {"_fsdp_small": _fsdp_small, "_fsdp_paper_scale": _fsdp_paper_scale}[sys.argv[1]]()
