"""Checkpoints of a run (orbax) and the finished adapter's files.

Checkpoints (orbax, ``workdir/checkpoints``): every ``config.checkpoint_every`` steps, at each stage's end
and right after each rank change. orbax step ids are ``2·global_step + phase`` (phase 1 = "just changed
rank"), so the end of a stage and the start of the next one (same global step) are distinct checkpoints.
Saves are synchronous and atomic (orbax writes a temporary directory and renames it), so a run killed at any
point restarts from the last complete checkpoint and, on CPU, ends bit-identical to an uninterrupted run:
everything random is a function of (seed, stage) or lives in the checkpoint (data iterator position).
A finished workdir (``result.json`` present) does no work when run again.

"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lora_squeeze import lora as lora_lib
from lora_squeeze import sharding as sharding_lib
from lora_squeeze import workdir as workdir_lib

ADAPTER_DIR = "adapter"


def encode_data_state(state: Any) -> Any:
  if isinstance(state, bytes):
    return {"bytes_b64": base64.b64encode(state).decode("ascii")}
  return {"json": state}


def decode_data_state(encoded: Mapping[str, Any]) -> Any:
  if "bytes_b64" in encoded:
    return base64.b64decode(encoded["bytes_b64"])
  return encoded["json"]


class Checkpoints:
  """orbax CheckpointManager around {state, meta}; ids are 2·global_step + phase (see module doc)."""

  SKIPPED_DIR = "skipped_checkpoints"

  def __init__(self, directory: Path, *, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy: only when used)

    self._ocp = ocp
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  @staticmethod
  def describe(ckpt_id: int) -> str:
    return f"step {ckpt_id // 2}" + (" (just after a rank change)" if ckpt_id % 2 else "")

  def save(self, state, meta: Mapping[str, Any]) -> None:
    ckpt_id = 2 * int(meta["global_step"]) + (1 if meta["phase"] == "changed" else 0)
    if ckpt_id in self.manager.all_steps():
      return
    self.manager.save(
        ckpt_id,
        args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(dict(meta))
        ),
    )
    self.manager.wait_until_finished()

  def latest(self) -> int | None:
    """The newest checkpoint's id (None: none)."""
    return self.manager.latest_step()

  def latest_meta(self) -> dict | None:
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore_latest(self, abstract_state: Callable[[Any], Any]) -> tuple[dict, Any] | None:
    """(meta, state) of the newest checkpoint that restores (None: there is none).

    ``abstract_state(ranks)``: the state's abstract tree for the ranks the meta records. A newer checkpoint
    that does not restore (a truncated array file, missing metadata, ...) is skipped with one line saying
    which and why, and moved to ``skipped_checkpoints/`` beside the checkpoint directory, so that the run
    can save that step again. If none restores: ``workdir.UserError``.
    """
    args = self._ocp.args
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = []
    for ckpt_id in steps:
      try:
        meta = dict(self.manager.restore(ckpt_id, args=args.Composite(meta=args.JsonRestore()))["meta"])
        state = self.manager.restore(
            ckpt_id, args=args.Composite(state=args.StandardRestore(abstract_state(meta["ranks"])))
        )["state"]
      except Exception as e:  # pylint: disable=broad-except  (any failure to restore: try an older one)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(
            f"[lora_squeeze] checkpoint {self.describe(ckpt_id)} in {self.directory} does not restore, "
            f"skipped: {reason}"
        )
        bad.append(ckpt_id)
        continue
      self._set_aside(bad)
      return meta, state
    if steps:
      raise workdir_lib.UserError(
          f"none of the {len(steps)} checkpoints in {self.directory} restores (newest: "
          f"{self.describe(steps[0])}); add --fresh to start the run afresh (the old files are kept aside)"
      )
    return None

  def discard_from(self, global_step: int, *, why: str) -> None:
    """Sets aside every checkpoint at ``global_step`` or later (a state that led to a non-finite loss)."""
    bad = [i for i in self.manager.all_steps() if i // 2 >= global_step]
    for ckpt_id in bad:
      print(f"[lora_squeeze] checkpoint {self.describe(ckpt_id)} set aside: {why}")
    self._set_aside(bad)

  def _set_aside(self, ckpt_ids) -> None:
    if not ckpt_ids:
      return
    if jax.process_index() == 0:
      dest = self.directory.parent / self.SKIPPED_DIR
      dest.mkdir(exist_ok=True)
      for ckpt_id in ckpt_ids:
        src = self.directory / str(ckpt_id)
        if src.exists():
          os.replace(src, dest / f"{ckpt_id}.{int(time.time())}")
    sharding_lib.sync(f"checkpoints:{self.directory}:set_aside")
    self.manager.reload()

  def close(self):
    self.manager.close()


def save_adapter(directory: Path, lora_params, lora_config: lora_lib.LoRAConfig, *, extra=None) -> None:
  """The final LoRA params as an orbax checkpoint plus ``lora_config.json``, written atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy: only when used)

  directory = Path(directory).absolute()
  # Several processes: all of them call orbax's save (it synchronises them) on ONE temporary path, and only
  # process 0 touches the filesystem around it, between barriers.
  multi = jax.process_count() > 1
  primary = jax.process_index() == 0
  tmp = directory.with_name(f".{directory.name}.tmp" + ("" if multi else str(os.getpid())))
  if primary:
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
  sharding_lib.sync(f"save_adapter:{directory}:tmp")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / "params", lora_params)
    ckptr.wait_until_finished()
  ranks = lora_lib.lora_ranks(lora_params)
  meta = {
      "rank": lora_lib.describe_ranks(ranks),
      "alpha": lora_config.alpha,
      "targets": list(lora_config.targets),
      "joint_kv": lora_config.joint_kv,
      "joint_gate_up": lora_config.joint_gate_up,
      **(extra or {}),
  }
  if primary:
    (tmp / "lora_config.json").write_text(json.dumps(meta, indent=2))
    if directory.exists():
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  sharding_lib.sync(f"save_adapter:{directory}:done")


def load_adapter(directory: Path) -> tuple[dict, lora_lib.LoRAConfig, dict]:
  """(LoRA params, LoRAConfig, the json metadata) of an adapter written by ``save_adapter``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy: only when used)

  directory = Path(directory).absolute()
  meta_path = directory / "lora_config.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"no adapter at {directory} (missing lora_config.json); is the source run " "finished?")
  meta = json.loads(meta_path.read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / "params")
  params = jax.tree.map(jnp.asarray, params)
  config = lora_lib.LoRAConfig(
      rank=meta["rank"],
      alpha=meta["alpha"],
      targets=tuple(meta["targets"]),
      joint_kv=meta["joint_kv"],
      joint_gate_up=meta["joint_gate_up"],
  )
  return params, config, meta
