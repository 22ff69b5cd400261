"""The device mesh, the sharding rules and multi-host set-up (one module, so the rules read in one place).

Mesh (``config.mesh``): two named axes, ``data`` and ``fsdp``, with sizes from the config (``-1`` = every
device the other axis leaves). Default ``data=-1, fsdp=1``: pure data parallelism, the fastest layout when
the frozen base fits on one device (270M / 1B, and 4B in bfloat16 on 16 GB+ accelerators). For 12B (or 4B on
small chips) set ``--config.mesh.fsdp=N``: the base weights are then split N ways and XLA gathers each one
where it is used.

Rules (``*_shardings`` below; every rule is a pure function of shapes, so it can also be applied inside a
traced function, which is how the rank-change step gets its output shardings):

* Frozen base params: each leaf split over ``fsdp`` on its largest dimension that ``fsdp`` divides (ties: the
  first such dimension); replicated when none does (norm scales, small biases) or when ``fsdp == 1``.
  Replicated over ``data``.
* LoRA params and their Adafactor state: REPLICATED by default (``config.mesh.shard_lora=False``). Why: they
  are small next to the base (Gemma 3 12B, all seven projections at r = 128: 524M float32 values, 2.1 GB;
  at the paper's typical r <= 16 a few hundred MB), the gradient all-reduce over the batch axes is the only
  communication they add, and the rank change (QR / SVD of every factor) needs whole factors: replicated
  factors let every device run the squeeze locally with no collectives. ``shard_lora=True`` applies the base
  rule to them and to the optimizer state as well (for very large ranks on small chips): the train step and
  ``squeeze.squeeze_lora`` then run on sharded factors, XLA gathering each factor for its factorisation,
  and the new factors are sharded again by the same rule (tests/test_sharding.py checks both layouts).
* Batches: the batch dimension split over ``("data", "fsdp")`` (every device sees different rows, as in
  big_vision's FSDP), the sequence dimension whole. ``config.data.batch_size`` is the GLOBAL batch; it must
  be divisible by the number of devices.
* Evaluation batches (host arrays, the same on every process): split inside the jitted evaluation programs
  over as many batch axes as their rows divide (``row_sharding``), outputs replicated (``whole``).

Multi-host: ``initialize_distributed()`` (called by ``main.py`` behind ``--distributed`` /
``LORA_SQUEEZE_DISTRIBUTED=1``) wraps ``jax.distributed.initialize``. Each process reads only its rows of
every global batch (``process_batch_shard`` says which block; the iterators in ``lora_squeeze.data`` take it
as ``shard=(index, count)``) and ``global_batch`` assembles the global array with
``jax.make_array_from_process_local_data``. Host values that every process holds in full (the base params,
a restored adapter) are placed with ``jax.make_array_from_callback``: each device receives only its own
slice, so nothing is first gathered on one device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


# --------------------------------------------------------------------------------------------------------
# Multi-host set-up.
# --------------------------------------------------------------------------------------------------------


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` with its arguments from the environment when given there.

  On Cloud TPU VMs and under SLURM every argument is detected by JAX itself (nothing to set). Elsewhere
  (several processes on one machine, tests, plain clusters) set ``JAX_COORDINATOR_ADDRESS=host:port`` and
  ``LORA_SQUEEZE_NUM_PROCESSES`` / ``LORA_SQUEEZE_PROCESS_ID``. ``LORA_SQUEEZE_HEARTBEAT_TIMEOUT`` (seconds,
  JAX's default 100) bounds how long the survivors wait before failing when a process dies.
  CPU processes talk through gloo (JAX's default CPU collectives; set explicitly so an older default
  cannot silently leave cross-process CPU collectives unimplemented).
  """
  env = os.environ
  kwargs: dict[str, Any] = {}
  if env.get("LORA_SQUEEZE_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["LORA_SQUEEZE_NUM_PROCESSES"])
  if env.get("LORA_SQUEEZE_PROCESS_ID"):
    kwargs["process_id"] = int(env["LORA_SQUEEZE_PROCESS_ID"])
  if env.get("LORA_SQUEEZE_HEARTBEAT_TIMEOUT"):
    kwargs["heartbeat_timeout_seconds"] = int(env["LORA_SQUEEZE_HEARTBEAT_TIMEOUT"])
    kwargs["shutdown_timeout_seconds"] = int(env["LORA_SQUEEZE_HEARTBEAT_TIMEOUT"])
  if env.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def sync(name: str) -> None:
  """A barrier across processes (no-op with one): filesystem steps that only process 0 performs (renames,
  deletions) must be complete before the others go on."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------------------
# The mesh.
# --------------------------------------------------------------------------------------------------------


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int]:
  """(data, fsdp) from the config's sizes; one of them may be -1 (= the devices the other leaves)."""
  data, fsdp = int(sizes.get(DATA, -1)), int(sizes.get(FSDP, 1))
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data / fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 and num_devices % fsdp == 0 else 0
  elif fsdp == -1:
    fsdp = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(
        f"config.mesh: data={sizes.get(DATA, -1)} x fsdp={sizes.get(FSDP, 1)} does not use "
        f"exactly the {num_devices} devices"
    )
  return data, fsdp


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A (data, fsdp) mesh over ``devices`` (default: all devices of all processes).

  ``mesh_utils.create_device_mesh`` orders the devices by the physical topology on TPUs (neighbours along
  the fsdp axis, whose gathers are the hot collectives); on CPU and GPU it keeps JAX's process-major order.
  The axes are Auto (GSPMD propagation), not Explicit: gemma's modules carry no sharding annotations.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(sizes or {}), len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # a device subset the topology code refuses
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, (DATA, FSDP))


def mesh_from_config(config) -> Mesh:
  """``make_mesh(config.mesh)``; a config without ``mesh`` gets the default (all devices on ``data``)."""
  sizes = config.get("mesh", None) if hasattr(config, "get") else getattr(config, "mesh", None)
  sizes = {k: sizes[k] for k in (DATA, FSDP) if k in sizes} if sizes else {}
  return make_mesh(sizes)


def shard_lora_enabled(config) -> bool:
  sizes = config.get("mesh", None) if hasattr(config, "get") else None
  return bool(sizes.get("shard_lora", False)) if sizes else False


# --------------------------------------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------------------------------------


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Split the largest dimension ``fsdp`` divides (the first among equals); replicate if none does."""
  if fsdp <= 1:
    return P()
  best = None
  for i, n in enumerate(shape):
    if n % fsdp == 0 and (best is None or n > shape[best]):
      best = i
  if best is None:
    return P()
  # Without trailing Nones: a jitted program's outputs carry the spec in that normal form, and an input with
  # P('fsdp', None) instead of the equivalent P('fsdp',) is another compile (the state init's layout must
  # equal the train step's output layout, or the second step compiles the step again).
  return P(*([None] * best), FSDP)


def _shape(leaf) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def base_shardings(tree, mesh: Mesh):
  """NamedShardings for the frozen base params (arrays or ShapeDtypeStructs): the fsdp rule."""
  fsdp = mesh.shape[FSDP]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(_shape(x), fsdp)), tree)


def state_shardings(tree, mesh: Mesh, *, shard_lora: bool = False):
  """NamedShardings for the train state (LoRA params, optimizer state, step): replicated, or the fsdp rule
  on every leaf when ``shard_lora`` (see the module doc for why replicated is the default)."""
  if not shard_lora:
    return jax.tree.map(lambda x: NamedSharding(mesh, P()), tree)
  return base_shardings(tree, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def mesh_of(tree) -> Mesh | None:
  """The mesh a tree's arrays are laid out on (its first leaf with a NamedSharding over several devices), else
  None: host arrays, one device, abstract shapes without shardings."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def row_sharding(mesh: Mesh | None, rows: int) -> NamedSharding | None:
  """How an evaluation program splits ``rows`` batch rows on ``mesh``: over the batch axes (data, then
  fsdp) as far as ``rows`` divides, e.g. 8 rows on a 4 x 8 mesh go over ``data`` only (2 rows per data
  group, the fsdp devices of a group sharing them). None off a mesh or when no axis divides ``rows``.

  Evaluation feeds host arrays (the same on every process): without a split, every device would compute
  every row and XLA would partition the work along the fsdp-sharded weights instead, all-reducing whole
  activations (the 4B vision tower on 4 x 8 devices: a 34 GB attention tensor per device)."""
  if mesh is None:
    return None
  axes, ways = [], 1
  for ax in BATCH_AXES:
    if mesh.shape[ax] > 1 and rows % (ways * mesh.shape[ax]) == 0:
      axes.append(ax)
      ways *= mesh.shape[ax]
  return NamedSharding(mesh, P(tuple(axes))) if axes else None


def split_rows(mesh: Mesh | None, *xs):
  """``xs`` (host batch arrays inside a jitted evaluation program) constrained to ``row_sharding``: each
  device keeps its own rows (a local slice of replicated inputs, no communication)."""
  if mesh is None:
    return xs
  out = []
  for x in xs:
    sh = row_sharding(mesh, x.shape[0])
    out.append(x if sh is None else jax.lax.with_sharding_constraint(x, sh))
  return tuple(out)


def whole(mesh: Mesh | None, x):
  """``x`` constrained to be replicated on ``mesh`` (an evaluation program's small outputs, which every
  process reads back as numpy); ``x`` itself off a mesh."""
  return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA] * mesh.shape[FSDP]
  if global_batch % n:
    raise ValueError(
        f"config.data.batch_size={global_batch} (the global batch) is not divisible by the "
        f"{n} devices of the mesh {dict(mesh.shape)}"
    )


def process_batch_shard(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(index, count): this process holds rows [index·B/count, (index+1)·B/count) of every global batch.

  Read off the batch sharding itself, so it is right for any device order (TPU meshes need not put process
  0's devices first). The rows of one process must be one contiguous block (true for a (data, fsdp) mesh
  whose axes both shard the batch).
  """
  check_batch_size(global_batch, mesh)
  idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({r for s in idx.values() for r in range(*s[0].indices(global_batch))})
  start, stop = rows[0], rows[-1] + 1
  if rows != list(range(start, stop)) or global_batch % (stop - start):
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {rows[:8]}...: not one contiguous "
        "block; use a mesh whose devices are process-major along (data, fsdp)"
    )
  per = stop - start
  return start // per, global_batch // per


# --------------------------------------------------------------------------------------------------------
# Placing values.
# --------------------------------------------------------------------------------------------------------


def put(tree, shardings):
  """Host (or single-device) values that every process holds in full → global arrays with ``shardings``.

  Each device gets only its slice (``make_array_from_callback``), so a large base is never gathered on one
  device first, and this works with several processes (where ``jax.device_put`` of a local value onto
  other processes' devices would not).
  """

  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows (the block ``process_batch_shard`` names) → the global batch arrays."""
  sharding = batch_sharding(mesh)
  count = jax.process_count()
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
  return out


def to_host(tree):
  """Fully replicated (or fully addressable) global arrays → numpy on every process (for evaluation and
  the adapter files, which are per-process, host-side work)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(one, tree)
