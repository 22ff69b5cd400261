"""Why the command reads and writes .safetensors with its own small reader/writer, not the safetensors library.

    PYTHONPATH=. python experiments/safetensors_io_memory.py [--mib 400] [--repeats 2]

Builds a Gemma-3-4B-shaped bfloat16 PEFT-style file (rank 64 pairs of all seven projections, as many layers
as fit in about ``--mib`` MiB) with ``adapters.SafetensorsWriter``, then, each in a fresh subprocess (so peak
RSS is that one job's), reads every tensor one at a time and converts it to float32, as the squeeze does:

* ``hand reader``: ``adapters.SafetensorsReader`` (``readinto`` of one tensor's bytes);
* ``safe_open numpy``: ``safetensors.safe_open(path, framework="numpy")`` and ``get_tensor`` per name;
* ``load_file numpy``: ``safetensors.numpy.load_file`` (the whole file at once), for reference;

and writes the same tensors again, one module's pair in memory at a time where the API allows it:

* ``hand writer``: ``adapters.SafetensorsWriter`` (header first, then each tensor as it is made);
* ``save_file numpy``: ``safetensors.numpy.save_file``, which needs the whole dict in memory.

Peak RSS is ``ru_maxrss`` of the subprocess (includes the interpreter and numpy, about 30-40 MiB; pages of a
memory-mapped file that were touched count, though the kernel can drop them); time is wall time of the job
alone (imports excluded), median of ``--repeats`` runs. It also records what each path does with a bf16 and
an F8_E4M3 tensor, the order ``keys()`` gives, and the error message on a truncated and a corrupt file.
Writes a markdown table to experiments/results/safetensors_io_memory.md (and prints it). The files live in a
temporary directory that is deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "safetensors_io_memory.md"
# Gemma 3 4B's text projections: (in, out) features.
SHAPES = {
    "q_proj": (2560, 2048),
    "k_proj": (2560, 1024),
    "v_proj": (2560, 1024),
    "o_proj": (2048, 2560),
    "gate_proj": (2560, 10240),
    "up_proj": (2560, 10240),
    "down_proj": (10240, 2560),
}
RANK = 64


def entries_for(n_layers: int) -> list[tuple[str, str, tuple[int, ...]]]:
  out = []
  for layer in range(n_layers):
    for proj, (n_in, n_out) in SHAPES.items():
      group = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
      prefix = f"base_model.model.model.language_model.layers.{layer}.{group}.{proj}"
      out += [(f"{prefix}.lora_A.weight", "BF16", (RANK, n_in)), (f"{prefix}.lora_B.weight", "BF16", (n_out, RANK))]
  return out


def build(path: Path, mib: float) -> int:
  """Writes the file with the streaming writer (one tensor in memory at a time); returns its layer count."""
  from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top

  per_layer = sum(2 * RANK * (n_in + n_out) for n_in, n_out in SHAPES.values())  # bf16: 2 bytes
  n_layers = max(1, round(mib * 2**20 / per_layer))
  entries = entries_for(n_layers)
  writer = adapters.SafetensorsWriter(path, entries, {"format": "pt"})
  rng = np.random.default_rng(0)
  for name, _, shape in entries:
    writer.write(name, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
  writer.close()
  return n_layers


# --------------------------------------------------------------------------------------------------------
# The jobs, each run in its own subprocess: `python this.py --job NAME PATH [OUT]`.
# --------------------------------------------------------------------------------------------------------


def job(name: str, path: str, out: str | None) -> dict:
  from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  checksum = 0.0
  start = time.perf_counter()
  if name == "hand reader":
    with adapters.SafetensorsReader(path) as reader:
      for key in reader.tensors:
        checksum += float(reader.read(key).astype(np.float32)[0].sum())
  elif name == "safe_open numpy":
    with safetensors.safe_open(path, framework="numpy") as f:
      for key in f.keys():
        checksum += float(f.get_tensor(key).astype(np.float32)[0].sum())
  elif name == "load_file numpy":
    for x in safetensors.numpy.load_file(path).values():
      checksum += float(x.astype(np.float32)[0].sum())
  elif name == "hand writer":
    with adapters.SafetensorsReader(path) as reader:
      entries = [(k, info.dtype, info.shape) for k, info in reader.tensors.items()]
      writer = adapters.SafetensorsWriter(out, entries, reader.metadata)
      for key in reader.tensors:
        writer.write(key, reader.read(key))
      writer.close()
  elif name == "save_file numpy":
    with adapters.SafetensorsReader(path) as reader:
      tensors = {key: reader.read(key) for key in reader.tensors}
      safetensors.numpy.save_file(tensors, out, metadata=reader.metadata)
  else:
    raise ValueError(name)
  seconds = time.perf_counter() - start
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"seconds": seconds, "peak_mib": peak_kib / 1024, "checksum": checksum}


def run_job(name: str, path: Path, out: Path) -> dict:
  proc = subprocess.run(
      [sys.executable, __file__, "--job", name, str(path), str(out)],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  out.unlink(missing_ok=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_mib() -> float:
  """Peak RSS of a subprocess that imports the same modules and does nothing else."""
  code = (
      "import resource, numpy, ml_dtypes, safetensors, safetensors.numpy; from lora_squeeze import adapters; "
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  return float(proc.stdout.strip())


# --------------------------------------------------------------------------------------------------------
# What each reader does with dtypes, order and broken files.
# --------------------------------------------------------------------------------------------------------


def _outcome(fn, tmp: Path) -> str:
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}".replace(str(tmp) + "/", "").replace("|", "/").splitlines()[0][:160]


def capabilities(tmp: Path) -> list[tuple[str, str, str]]:
  from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top

  path = tmp / "dtypes.safetensors"
  tensors = {
      "z_bf16": np.ones((2, 3), ml_dtypes.bfloat16),
      "a_f8": np.ones((4,), ml_dtypes.float8_e4m3fn),
      "m_f32": np.ones((65536,), np.float32),  # so that a cut at 2/3 falls in the data, past the header
  }
  adapters.save_safetensors(path, tensors, {"format": "pt"})
  data = path.read_bytes()
  truncated, corrupt = tmp / "truncated.safetensors", tmp / "corrupt.safetensors"
  truncated.write_bytes(data[: len(data) * 2 // 3])
  broken = bytearray(data)
  broken[8:12] = b"\xff\xfe{["
  corrupt.write_bytes(bytes(broken))

  def hand(key):
    return lambda: (lambda x: f"{x.dtype} {list(x.shape)}")(adapters.SafetensorsReader(path).read(key))

  def lib(key):
    def read():
      with safetensors.safe_open(str(path), framework="numpy") as f:
        x = f.get_tensor(key)
      return f"{x.dtype} {list(x.shape)}"

    return read

  def hand_keys():
    return ", ".join(adapters.SafetensorsReader(path).tensors)

  def lib_keys():
    with safetensors.safe_open(str(path), framework="numpy") as f:
      return ", ".join(f.keys())

  def hand_open(p):
    return lambda: (adapters.SafetensorsReader(p), "opened")[1]

  def lib_open(p):
    return lambda: (safetensors.safe_open(str(p), framework="numpy"), "opened")[1]

  return [
      ("BF16 tensor", _outcome(hand("z_bf16"), tmp), _outcome(lib("z_bf16"), tmp)),
      ("F8_E4M3 tensor", _outcome(hand("a_f8"), tmp), _outcome(lib("a_f8"), tmp)),
      ("tensor order (written z, a, m)", _outcome(hand_keys, tmp), _outcome(lib_keys, tmp)),
      ("file cut to 2/3", _outcome(hand_open(truncated), tmp), _outcome(lib_open(truncated), tmp)),
      ("header bytes 0-3 garbled", _outcome(hand_open(corrupt), tmp), _outcome(lib_open(corrupt), tmp)),
  ]


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mib", type=float, default=400.0, help="about this many MiB of adapter")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", type=Path, default=RESULTS)
  parser.add_argument("--job", nargs=3, metavar=("NAME", "PATH", "OUT"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.job:
    print(json.dumps(job(*args.job)))
    return 0

  import safetensors  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    src = tmp / "adapter_model.safetensors"
    n_layers = build(src, args.mib)
    size_mib = src.stat().st_size / 2**20
    base = baseline_mib()
    rows = []
    for name in ("hand reader", "safe_open numpy", "load_file numpy", "hand writer", "save_file numpy"):
      runs = [run_job(name, src, tmp / "out.safetensors") for _ in range(args.repeats)]
      peak = max(r["peak_mib"] for r in runs)
      seconds = statistics.median(r["seconds"] for r in runs)
      rows.append((name, seconds, peak, peak - base))
      print(f"{name}: {seconds:.2f} s, peak RSS {peak:.0f} MiB", file=sys.stderr)
    caps = capabilities(tmp)
  load_after = os.getloadavg()

  lines = [
      "# safetensors I/O: the command's own reader/writer vs the safetensors library (numpy API)",
      "",
      f"`experiments/safetensors_io_memory.py --mib {args.mib:g} --repeats {args.repeats}`, "
      f"{datetime.date.today().isoformat()}. A Gemma-3-4B-shaped bf16 PEFT-style file: {n_layers} layers x 7 "
      f"projections, rank {RANK}, {size_mib:.0f} MiB. Each job in a fresh subprocess; peak RSS = ru_maxrss "
      f"(the bare interpreter with the same imports: {base:.0f} MiB); time = median wall time of the job, "
      "imports excluded.",
      "",
      "## Reading every tensor one at a time (as the squeeze does), and writing them again",
      "",
      "| path | time (s) | peak RSS (MiB) | above the bare interpreter (MiB) |",
      "|---|---:|---:|---:|",
  ]
  lines += [f"| {n} | {s:.2f} | {p:.0f} | {d:.0f} |" for n, s, p, d in rows]
  lines += [
      "",
      "(Writers: both read the input with the hand reader; the hand writer holds one tensor at a time and "
      "fsyncs the file at the end (the atomic rename needs the data on disk), `save_file` needs the whole dict "
      "and does not fsync. safe_open maps the file: pages it touched count in RSS though the kernel may drop "
      "them under pressure.)",
      "",
      f"## What each reader does (safetensors {safetensors.__version__})",
      "",
      '| input | hand reader (adapters.SafetensorsReader) | safe_open(framework="numpy") |',
      "|---|---|---|",
  ]
  lines += [f"| {what} | {a} | {b} |" for what, a, b in caps]
  lines += [
      "",
      f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}; Python "
      f"{platform.python_version()}, numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}. Load average "
      f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (the machine was shared with other jobs).",
      "",
  ]
  text = "\n".join(lines)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
