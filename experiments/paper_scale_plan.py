"""Paper scale on paper: the 1B / 4B / 12B programs compiled from abstract shapes, a memory table and a time plan.

For Gemma 3 1B, 4B (text, and with its SigLIP tower as configs/vl.py runs it) and 12B at the paper's settings
(batch 8 x 1024, LoRA on all seven projections, bfloat16 base) this lowers, and where asked compiles, the
project's own programs (``lora_squeeze.aot``): the jitted train step at ranks 1 and 128, the rank change
128 -> 64 and the eval step, on one device and on meshes of 8 and 32 CPU devices standing in for
accelerators (``--xla_force_host_platform_device_count``; each mesh size runs in its own subprocess since
the flag must be set before jax starts). It records XLA's memory analysis per device and its FLOP count,
then writes

  experiments/results/paper_scale_plan.md     the memory table (fits 16 / 40 / 80 / 141 GB?) and the time plan
  experiments/results/paper_scale_plan.json   every raw number

Meshes: 8 devices = data 1 x fsdp 8 (the base split 8 ways, one row per device); 32 devices = data 4 x fsdp 8.
The paper's batch of 8 rows cannot be split over 32 devices (``sharding.check_batch_size``), so the 32-device
programs run batch 32 (one row per device, as on 8); their FLOPs are not used for the time plan.

  python experiments/paper_scale_plan.py                        # everything in PLAN order (hours on 2 cores)
  python experiments/paper_scale_plan.py --only 4b:1,4b:8       # some (model:devices) items
  python experiments/paper_scale_plan.py --report               # tables from the raw records so far
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
RAW = RESULTS / "paper_scale_plan.json"

# model key -> (models name, text_only)
MODELS = {
    "1b": ("gemma3_1b", True),
    "4b": ("gemma3_4b", True),
    "4b_vl": ("gemma3_4b", False),
    "12b": ("gemma3_12b", True),
}
# devices -> (mesh sizes, global batch)
MESHES = {1: (None, 8), 8: ({"data": 1, "fsdp": 8}, 8), 32: ({"data": 4, "fsdp": 8}, 32)}
# What each item lowers; "compile" lists those also compiled (all of them: the ask; a run restricted with
# --programs does the rest later, the records accumulate). Order = priority (the slow machine runs the first
# ones first). Program names: aot.PROGRAMS, train_step at rank 128 ("train_r128") and 1 ("train_r1"), and at rank 128 with config.remat ("train_r128_remat").
ALL = ("train_r128", "train_r1", "change_rank", "eval_step", "train_r128_remat")
ALL_VL = ALL + ("eval_images",)
PLAN = (
    ("4b", 1, ALL, ALL),
    ("4b", 8, ALL, ALL),
    ("1b", 1, ALL, ALL),
    ("12b", 8, ALL, ALL),
    ("4b_vl", 1, ALL_VL, ALL_VL),
    ("12b", 1, ALL, ALL),
    ("1b", 8, ALL, ALL),
    ("4b_vl", 8, ALL_VL, ALL_VL),
    ("1b", 32, ALL, ALL),
    ("4b", 32, ALL, ALL),
    ("4b_vl", 32, ALL_VL, ALL_VL),
    ("12b", 32, ALL, ALL),
)
CAPACITIES_GB = (("v5e", 16), ("A100", 40), ("A100/H100", 80), ("H200", 141))
# bf16 dense peak per chip (TFLOP/s) and the utilisation the plan assumes.
CHIPS = (("H100", 990.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0))
MFU = 0.40
GB = 1e9


# --------------------------------------------------------------------------------------------------------
# Worker: one (model, mesh) in this process.
# --------------------------------------------------------------------------------------------------------


def worker(model_key: str, devices: int, lower_list, compile_list, out_path: pathlib.Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from lora_squeeze import aot  # pylint: disable=g-import-not-at-top
  from lora_squeeze import sharding  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == devices, (jax.device_count(), devices)
  name, text_only = MODELS[model_key]
  sizes, batch = MESHES[devices]
  model = aot.abstract_model(name, text_only=text_only)
  mesh = None if sizes is None else sharding.make_mesh(sizes)
  plain = aot.Programs(model, aot.Setting(batch=batch), mesh=mesh)
  base = plain.base()
  for prog in lower_list:
    rec = {
        "model": model_key,
        "devices": devices,
        "mesh": sizes,
        "batch": batch,
        "program": prog,
        "base_bytes": aot.base_bytes(model),
        "lora_bytes_r128": aot.lora_bytes(model, 128),
    }
    # "train_r128_remat": the train step with config.remat (each block rematerialised in the backward).
    remat = prog.endswith("_remat")
    programs = aot.Programs(model, aot.Setting(batch=batch, remat=True), mesh=mesh) if remat else plain
    kind, rank = (
        ("train_step", int(prog.removesuffix("_remat")[len("train_r") :]))
        if prog.startswith("train_r")
        else (prog, 128)
    )
    rec["rank"] = rank
    try:
      t = time.time()
      lowered = programs.lower(kind, rank=rank, target_rank=64)
      rec["lower_seconds"] = time.time() - t
      rec["lowered_cost"] = aot.cost(lowered)
      rec["argument_bytes"] = aot.argument_bytes(lowered)
      if mesh is not None and sizes["fsdp"] > 1 and kind != "change_rank":  # (the rank change takes no base)
        rec["unsharded_base_inputs"] = aot.unsharded_base_inputs(lowered, base)
      if prog in compile_list:
        t = time.time()
        compiled = lowered.compile()
        rec["compile_seconds"] = time.time() - t
        rec.update(aot.describe(compiled))
        del compiled
      rec["status"] = "compiled" if prog in compile_list else "lowered"
    except Exception as e:  # pylint: disable=broad-except  (a failure is a finding: record it, go on)
      rec["status"] = "failed"
      rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    with open(out_path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    print(
        json.dumps(
            {
                k: rec.get(k)
                for k in ("model", "devices", "program", "status", "lower_seconds", "compile_seconds", "error")
            }
        ),
        flush=True,
    )


def run_item(model_key, devices, lower_list, compile_list, scratch, timeout):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [
      sys.executable,
      __file__,
      "--worker",
      model_key,
      str(devices),
      "--lower",
      ",".join(lower_list),
      "--compile",
      ",".join(compile_list),
      "--scratch",
      str(scratch),
  ]
  t = time.time()
  try:
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    print(f"[{model_key}:{devices}] exit {proc.returncode} in {time.time() - t:.0f}s")
    if proc.returncode:
      print(proc.stderr[-3000:])
  except subprocess.TimeoutExpired:
    print(f"[{model_key}:{devices}] stopped after {timeout}s (the records written so far are kept)")


# --------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------


def mesh_comparison(records) -> list[str]:
  """The 8- and 32-device train steps of one model side by side: both hold one row per device (batch 8 on
  1 x 8, batch 32 on 4 x 8), so their temporaries should match; where they do not, say by how much."""
  by = {(r["model"], r["devices"], r["program"]): r for r in records if r["status"] == "compiled"}
  out = []
  for (model, devices, program), r32 in sorted(by.items()):
    r8 = by.get((model, 8, program))
    if devices != 32 or r8 is None or not program.startswith("train_r"):
      continue
    t8, t32 = r8["memory"]["temporaries"], r32["memory"]["temporaries"]
    g8, g32 = (max((v["largest"] for v in r.get("collectives", {}).values()), default=0) for r in (r8, r32))
    out.append(
        f"* {model} {program}, one row per device on both meshes: temporaries {t8 / 1e9:.1f} GB (1 x 8) vs "
        f"{t32 / 1e9:.1f} GB (4 x 8), {t32 / t8:.2f}x; largest collective {g8 / 1e6:,.1f} MB vs {g32 / 1e6:,.1f} MB"
    )
  if out:
    out = [
        "",
        "Same rows per device, other mesh (XLA:CPU's partitioning and schedule; see the caveats below):",
        "",
        *out,
    ]
  return out


def load_records(paths) -> list[dict]:
  """The newest record of each (model, devices, program) from the JSON-lines files and the raw JSON."""
  latest = {}
  for path in paths:
    path = pathlib.Path(path)
    if not path.exists():
      continue
    if path.suffix == ".json":
      rows = json.loads(path.read_text()).get("records", [])
    else:
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
      key = (r["model"], r["devices"], r["program"])
      old = latest.get(key)
      rank = {"failed": 0, "lowered": 1, "compiled": 2}
      if old is None or rank[r["status"]] >= rank[old["status"]]:
        latest[key] = r
  order = {k: i for i, k in enumerate(MODELS)}
  return sorted(latest.values(), key=lambda r: (order[r["model"]], r["devices"], r["program"]))


def train_flops(records, model_key) -> dict[int, float] | None:
  """{rank: FLOPs of one train step at batch 8 x 1024} (one device's program: the whole step), from the
  compiled program where there is one, else the lowered one's count."""
  out = {}
  for r in records:
    if r["model"] == model_key and r["devices"] == 1 and r["program"].startswith("train_r") and r["status"] != "failed":
      if r["program"].endswith("_remat"):
        continue  # the same step plus the recomputed forward: not the plan's FLOPs
      out[r["rank"]] = (r.get("cost") or r["lowered_cost"])["flops"]
  return out if {1, 128} <= set(out) else None


def flops_at(table: dict[int, float], rank: int) -> float:
  """LoRA FLOPs grow linearly with the rank: interpolate between the measured ranks 1 and 128."""
  return table[1] + (table[128] - table[1]) * (rank - 1) / 127


def cell_steps(cell, config) -> list[tuple[int, int]]:
  """[(rank, steps)] a sweep cell trains: its own stages only (a ``@source`` cell is counted once, as its
  own cell; Post-Squeeze and zero-shot cells train nothing)."""
  from lora_squeeze import sweep  # pylint: disable=g-import-not-at-top
  from lora_squeeze import train  # pylint: disable=g-import-not-at-top

  return [(s.rank, s.steps) for s in train.plan_stages(sweep.cell_config(config, cell, pathlib.Path("/none")))]


def artefact_cost(config_path, arg, table) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("plan_cfg", ROOT / config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  flops = steps = trained = 0
  for cell in config.sweep:
    stages = cell_steps(cell, config)
    trained += bool(stages)
    for rank, n in stages:
      flops += n * flops_at(table, rank)
      steps += n
  return {"cells": len(config.sweep), "trained_cells": trained, "steps": steps, "flops": flops}


ARTEFACTS = (
    ("lr_grid", "configs/paper.py", "artefact=lr_grid"),
    ("fig3", "configs/paper.py", "artefact=fig3"),
    ("heatmap", "configs/paper.py", "artefact=heatmap"),
    ("table1", "configs/paper.py", "artefact=table1"),
    ("heatmap+table1", "configs/paper.py", "artefact=heatmap+table1"),
)


def caveats(probe: dict) -> list[str]:
  ratio = probe["temporaries_ratio_bf16_over_f32"]
  dots = probe["bfloat16"]["dots"]
  return [
      "",
      "## Where XLA:CPU's memory figures may differ from a TPU's or GPU's",
      "",
      f"* **bfloat16 runs as float32 on XLA:CPU.** Measured here (`cpu_dtype_probe`: a 2-layer Gemma-3-shaped "
      f"model, d 256, F 1024, batch 8 x 1024): the compiled bfloat16 train step has {dots['f32']} float32 dots "
      f"and {dots['bf16']} bfloat16 ones (XLA:CPU converts the operands), and its temporaries are "
      f"{ratio:.0%} of the float32 program's. TPUs and GPUs keep the dots and most activations in bfloat16 "
      "(softmax, the loss and the LoRA products stay float32 everywhere: lora.py computes the delta in "
      f"float32). If everything not float32 by design halved, an accelerator's temporaries would be up to "
      f"{1 - 0.5 / ratio:.0%} below the table's (0.5 / {ratio:.2f}); arguments and outputs are exact (same "
      "dtypes on every backend).",
      "* **Rematerialisation.** The train step saves every layer's activations for the backward pass (no "
      "`jax.checkpoint`), which is what the temporaries are. XLA:TPU rematerialises when a program exceeds "
      "HBM (slower, may then fit); XLA:GPU does not by default (out of memory). The `train_r128_remat` rows "
      "(`config.remat`: `jax.checkpoint` per block) show that it compiles on every mesh and what it costs in "
      "FLOPs (the recomputed forward), not what it saves: XLA:CPU's buffer assignment does not honour it "
      "(its temporaries come out higher), while JAX's own residual count drops 20-30x "
      "(`experiments/results/remat_memory.md`).",
      "* **The 4 x 8 mesh's train step** holds more per device than the 1 x 8 one at the same rows per device "
      "(section above): its largest all-gather is a layer's gate and up projections whole in float32 "
      "(12B: 2 x 15360 x 3840 x 4 bytes = 471.9 MB). The difference is about what keeping every layer's "
      "gathered MLP weights from the forward to the backward pass would take (12B: 48 x (471.9 + 235.9) MB "
      "= 34 GB against 34.8 GB measured; 4B: 10.7 GB against 8.6 GB): an inference from the sizes, not read "
      "from the schedule. An accelerator gathers bfloat16 (half that) and its scheduler may gather again "
      "instead; read the 4 x 8 rows as an upper bound.",
      "* **Runtime reserve.** JAX on GPU preallocates 75% of the memory by default "
      "(`XLA_PYTHON_CLIENT_MEM_FRACTION`); the CUDA context and cuBLAS/cuDNN workspaces take a few hundred MB "
      "to ~2 GB more; a TPU runtime keeps some HBM too. A 'fits' within ~10% of a capacity is marginal.",
      "* **Collectives.** On an fsdp mesh XLA gathers each weight where it is used; on TPU/GPU the "
      "latency-hiding scheduler may prefetch the next layer's gathered weights, adding about one layer's "
      "weights to the peak. XLA:CPU's schedule is not the accelerators'.",
      "* **Buffer assignment, not a measurement.** `peak` is XLA's own accounting of the live buffers; "
      "allocator fragmentation comes on top.",
  ]


def gb(x) -> str:
  return f"{x / GB:.2f}"


def report(records, out_md: pathlib.Path, out_json: pathlib.Path, machine: str, probe: dict) -> str:
  lines = [
      "# Paper scale on paper: compiled programs, memory per device and a time plan",
      "",
      f"Machine: {machine}. Made by `experiments/paper_scale_plan.py` from abstract shapes (no weights): "
      "the project's own train step, rank change and eval step (`lora_squeeze.aot`), bfloat16 base, "
      "LoRA on all seven projections, batch 8 x 1024 (32 devices: batch 32, see below).",
      "",
      "## Programs and memory per device (XLA:CPU's memory analysis)",
      "",
      "`peak` = arguments + outputs - aliased (donated) + temporaries, per device. Fits: peak <= capacity "
      "(no allowance for the runtime's own reserve; see the caveats). `lowered` = traced and lowered to "
      "StableHLO only (shapes and shardings checked; the arguments per device are exact from the "
      "shardings, the rest needs a compile); `compiled` = XLA compiled it too. GFLOP `(lowered)`: XLA's "
      "count on the unoptimised, unpartitioned program (within 0.5% of the compiled one where both exist), "
      "divided by the devices on a mesh.",
      "",
      "| model | devices (mesh) | program | status | args GB | outputs GB | temps GB | peak GB | "
      + " | ".join(f"{c} GB ({n})" for n, c in CAPACITIES_GB)
      + " | GFLOP/step/device | lower s | compile s |",
      "|" + "---|" * (11 + len(CAPACITIES_GB)),
  ]
  for r in records:
    mesh = "1" if not r["mesh"] else f"{r['devices']} ({r['mesh']['data']}x{r['mesh']['fsdp']})"
    mem = r.get("memory")
    cost = r.get("cost") or r.get("lowered_cost") or {}
    cells = [r["model"], mesh, r["program"], r["status"] if r["status"] != "failed" else "FAILED"]
    if mem:
      cells += [gb(mem["arguments"]), gb(mem["outputs"]), gb(mem["temporaries"]), gb(mem["peak_estimate"])]
      cells += ["fits" if mem["peak_estimate"] <= c * GB else "no" for _, c in CAPACITIES_GB]
    elif r.get("argument_bytes"):  # lowered only: the arguments are known exactly from the shardings
      args = r["argument_bytes"]
      cells += [gb(args), "-", "-", "-"]
      cells += ["no (args alone)" if args > c * GB else "?" for _, c in CAPACITIES_GB]
    else:
      cells += ["-"] * (4 + len(CAPACITIES_GB))
    if r.get("cost"):
      flops = f"{cost['flops'] / 1e9:,.0f}"
    elif cost:  # a lowered program's count is the whole (unpartitioned) step's: shown per device, evenly split
      flops = f"{cost['flops'] / r['devices'] / 1e9:,.0f} (lowered" + (
          f", /{r['devices']})" if r["devices"] > 1 else ")"
      )
    else:
      flops = "-"
    cells += [
        flops,
        f"{r.get('lower_seconds', 0):.0f}",
        f"{r['compile_seconds']:.0f}" if "compile_seconds" in r else "-",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  noted = [r for r in records if r.get("note")]
  if noted:
    lines += ["", "Notes:", ""] + [
        f"* {r['model']} on {r['devices']} device(s), {r['program']}: {r['note']}" for r in noted
    ]
  failed = [r for r in records if r["status"] == "failed"]
  if failed:
    lines += ["", "Failures:", ""] + [
        f"* {r['model']} on {r['devices']} device(s), {r['program']}: " f"`{r['error'][:400]}`" for r in failed
    ]
  sharded = [r for r in records if "unsharded_base_inputs" in r]
  if sharded:
    bad = [r for r in sharded if r["unsharded_base_inputs"]]
    lines += [
        "",
        f"fsdp check: {len(sharded)} lowered programs on fsdp meshes; base weights of >= 1M values "
        f"taken whole on one device: {sum(len(r['unsharded_base_inputs']) for r in bad)}"
        + "".join(f"\n* {r['model']}:{r['devices']} {r['program']}: {r['unsharded_base_inputs'][:4]}" for r in bad),
    ]
  coll = [r for r in records if r.get("collectives")]
  if coll:
    lines += ["", "Collectives in the compiled programs (per device: count, largest result):", ""]
    for r in coll:
      parts = [f"{k} {v['count']}x, largest {v['largest'] / 1e6:,.1f} MB" for k, v in sorted(r["collectives"].items())]
      lines.append(f"* {r['model']}:{r['devices']} {r['program']}: " + "; ".join(parts))
  lines += mesh_comparison(records)
  lines += caveats(probe)
  # Time plan.
  lines += [
      "",
      "## Time plan",
      "",
      f"Assumption: every chip runs at {MFU:.0%} of its bf16 dense peak ("
      + ", ".join(f"{n} {p:g} TFLOP/s" for n, p in CHIPS)
      + "). Step FLOPs are XLA's count of the "
      "one-device train step at batch 8 x 1024 (ranks in between 1 and 128 interpolated linearly: the LoRA "
      "part grows with r). Device-hours are training steps only: the evaluations, the rank changes and "
      "data loading are not counted (one eval batch of 8 rows x 1024 is about half a train step's FLOPs: see "
      "eval_step above). More chips divide the wall-clock time, not the device-hours, and only while they "
      "add rows (batch 8: at most 8-way data parallelism). Artefacts share cells: `heatmap+table1` (what "
      "the README runs) counts the shared direct cells once.",
      "",
  ]
  plan = {"assumption": {"mfu": MFU, "chips_tflops": dict(CHIPS)}, "step": {}, "artefacts": {}}
  lines += [
      "| model | rank | TFLOP/step | " + " | ".join(f"{n} s/step" for n, _ in CHIPS) + " |",
      "|" + "---|" * (3 + len(CHIPS)),
  ]
  for key in MODELS:
    table = train_flops(records, key)
    if not table:
      continue
    for rank in (1, 128):
      f = table[rank]
      secs = [f / (p * 1e12 * MFU) for _, p in CHIPS]
      plan["step"][f"{key}_r{rank}"] = {"flops": f, **{n: s for (n, _), s in zip(CHIPS, secs)}}
      lines.append(f"| {key} | {rank} | {f / 1e12:.1f} | " + " | ".join(f"{s:.3f}" for s in secs) + " |")
  lines += [
      "",
      "| model | artefact | cells (trained) | train steps | PFLOP | "
      + " | ".join(f"{n} device-hours" for n, _ in CHIPS)
      + " |",
      "|" + "---|" * (5 + len(CHIPS)),
  ]
  for key, model in (("1b", "gemma3_1b"), ("4b", "gemma3_4b")):
    table = train_flops(records, key)
    if not table:
      continue
    for art, path, arg in ARTEFACTS:
      c = artefact_cost(path, f"{arg},model={model}", table)
      hours = [c["flops"] / (p * 1e12 * MFU) / 3600 for _, p in CHIPS]
      plan["artefacts"][f"{key}:{art}"] = {**c, **{n: h for (n, _), h in zip(CHIPS, hours)}}
      lines.append(
          f"| {key} | {art} | {c['cells']} ({c['trained_cells']}) | {c['steps']:,} | "
          f"{c['flops'] / 1e15:,.0f} | " + " | ".join(f"{h:,.0f}" for h in hours) + " |"
      )
  text = "\n".join(lines) + "\n"
  out_md.write_text(text)
  out_json.write_text(
      json.dumps({"machine": machine, "records": records, "plan": plan, "cpu_dtype_probe": probe}, indent=1)
  )
  return text


def cpu_dtype_probe() -> dict:
  """How much of XLA:CPU's bfloat16 program stays bfloat16: a 2-layer Gemma-3-architecture model (d 256, F
  1024) at batch 8 x 1024, train step compiled with a float32 and with a bfloat16 base. XLA:CPU runs every dot
  in float32 (it converts bfloat16 operands), where TPUs and GPUs keep them in bfloat16."""
  from lora_squeeze import aot  # pylint: disable=g-import-not-at-top

  out = {}
  for dt in ("float32", "bfloat16"):
    model = aot.abstract_model(
        "tiny", dtype=dt, num_layers=2, embed_dim=256, hidden_dim=1024, num_heads=4, num_kv_heads=2, head_dim=64
    )
    compiled = aot.Programs(model, aot.Setting()).lower("train_step", rank=16).compile()
    lines = compiled.as_text().splitlines()
    out[dt] = {
        "memory": aot.memory(compiled),
        "dots": {t: sum(1 for l in lines if " dot(" in l and f"= {t}[" in l) for t in ("bf16", "f32")},
    }
  out["temporaries_ratio_bf16_over_f32"] = (
      out["bfloat16"]["memory"]["temporaries"] / out["float32"]["memory"]["temporaries"]
  )
  return out


def machine_line() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = os.getloadavg()[0]
  return (
      f"{cpu}, {os.cpu_count()} cores, {platform.system()}, jax {_jax_version()}; shared with other jobs "
      f"(load average {load:.0f} when the report was written): the lower/compile seconds are wall time "
      "on that busy machine"
  )


def _jax_version() -> str:
  try:
    import jax  # pylint: disable=g-import-not-at-top

    return jax.__version__
  except ImportError:
    return "?"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--worker", nargs=2, metavar=("MODEL", "DEVICES"))
  p.add_argument("--lower", default="")
  p.add_argument("--compile", default="")
  p.add_argument("--scratch", default="/tmp/paper_scale_plan.jsonl", help="raw records, one JSON per line")
  p.add_argument("--only", default="", help="model:devices items of PLAN, comma-separated")
  p.add_argument("--programs", default="", help="only these programs of each item, comma-separated")
  p.add_argument("--lower-only", action="store_true", help="compile nothing")
  p.add_argument("--timeout", type=int, default=7200, help="seconds per item")
  p.add_argument("--report", action="store_true", help="only write the tables from the records so far")
  args = p.parse_args()
  scratch = pathlib.Path(args.scratch)
  if args.worker:
    worker(
        args.worker[0],
        int(args.worker[1]),
        [x for x in args.lower.split(",") if x],
        [x for x in args.compile.split(",") if x],
        scratch,
    )
    return
  if not args.report:
    only = {x for x in args.only.split(",") if x}
    for key, devices, lower_list, compile_list in PLAN:
      if only and f"{key}:{devices}" not in only:
        continue
      keep = {x for x in args.programs.split(",") if x}
      lower_list = [x for x in lower_list if not keep or x in keep]
      run_item(key, devices, lower_list, () if args.lower_only else compile_list, scratch, args.timeout)
  records = load_records([RAW, scratch])
  probe = json.loads(RAW.read_text()).get("cpu_dtype_probe") if RAW.exists() else None
  print(report(records, RESULTS / "paper_scale_plan.md", RAW, machine_line(), probe or cpu_dtype_probe()))


if __name__ == "__main__":
  main()
