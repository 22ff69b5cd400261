"""A PEFT LoRA adapter directory opened for reading: its config, its LoRA modules, and their factors.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per adapted
module, ``<prefix>.lora_A.weight`` (r, in) and ``<prefix>.lora_B.weight`` (out, r) (``lora_embedding_A``
(r, num_embeddings) / ``lora_embedding_B`` (dim, r) for embeddings; conv layers add kernel dims to A and 1s to
B). Any base model works: we act on whatever lora_A/lora_B pairs the file holds; every other tensor
(``modules_to_save``, DoRA magnitudes, LoRA biases) is passed through.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.peft_config import CONFIG_NAME, PEFT_PREFIX, TORCH_WEIGHTS_NAME, WEIGHTS_NAME
from lora_squeeze.adapters.peft_config import PeftAdapterConfig
from lora_squeeze.adapters.safetensors_io import FLOAT_CODES, SafetensorsReader

# lora_A/lora_B are Linear/Conv layers (".weight"); embeddings hold raw parameters. Files saved by
# PeftModel.save_pretrained drop the adapter name; raw state dicts keep it (".lora_A.default.weight").
_LORA_KEY = re.compile(
    r"^(?P<prefix>.+)\.(?P<kind>lora_A|lora_B)(?P<adapter>\.[^.]+)?\.weight$"
    r"|^(?P<eprefix>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)(?P<eadapter>\.[^.]+)?$"
)


@dataclasses.dataclass(frozen=True)
class LoraModule:
  """One adapted layer: ΔW_eff (out, in) = scale · B.reshape(out, r) @ A.reshape(r, in).

  Attributes:
    name: the module name PEFT matches patterns against (the tensor prefix without ``base_model.model.``).
    key_a, key_b: the tensor names of A (r, *in_dims) and B (out, r, 1, ...).
    shape_a, shape_b: their shapes; in_dims are () for Linear/Embedding, (in_channels, kh, kw) for Conv2d.
    dtype_a, dtype_b: safetensors dtype codes.
    scale: lora_alpha / r (or / √r) for this module, from the config.
  """

  name: str
  key_a: str
  key_b: str
  shape_a: tuple[int, ...]
  shape_b: tuple[int, ...]
  dtype_a: str
  dtype_b: str
  scale: float

  @property
  def r(self) -> int:
    return self.shape_a[0]

  @property
  def in_features(self) -> int:
    return math.prod(self.shape_a[1:])

  @property
  def out_features(self) -> int:
    return self.shape_b[0]

  @property
  def full_rank(self) -> int:
    """min(out_features, in_features): no ΔW of this module has a higher rank, so no target rank need be higher."""
    return min(self.out_features, self.in_features)

  @property
  def kind(self) -> str:
    """The module's type for summaries: its last name component (q_proj, down_proj, ...)."""
    return self.name.rsplit(".", 1)[-1]

  def new_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (rank, *self.shape_a[1:]), (self.shape_b[0], rank, *self.shape_b[2:])


def _find_modules(reader: SafetensorsReader, config: PeftAdapterConfig) -> tuple[list[LoraModule], list[str]]:
  """Pairs every lora_A with its lora_B and checks their shapes against each other and the config."""
  halves: dict[tuple[str, str, str], dict[str, str]] = collections.defaultdict(dict)
  passthrough = []
  for key in reader.tensors:
    match = _LORA_KEY.match(key)
    if not match:
      passthrough.append(key)
      continue
    kind = match["kind"] or match["ekind"]
    ident = (match["prefix"] or match["eprefix"], match["adapter"] or match["eadapter"] or "", kind[:-2])
    halves[ident][kind[-1]] = key

  where = reader.path.name
  modules = []
  for (prefix, _, family), sides in halves.items():
    name = prefix[len(PEFT_PREFIX) :] if prefix.startswith(PEFT_PREFIX) else prefix
    if "A" not in sides or "B" not in sides:
      have, miss = ("A", "B") if "A" in sides else ("B", "A")
      raise AdapterError(f"{where}: module '{name}' has {family}_{have} ('{sides[have]}') but no " f"{family}_{miss}")
    info_a, info_b = reader.tensors[sides["A"]], reader.tensors[sides["B"]]
    shape_a, shape_b = info_a.shape, info_b.shape
    if info_a.dtype not in FLOAT_CODES or info_b.dtype not in FLOAT_CODES:
      raise AdapterError(
          f"{where}: module '{name}': LoRA factors must be F64/F32/F16/BF16, got " f"A {info_a.dtype}, B {info_b.dtype}"
      )
    if (
        len(shape_a) < 2
        or len(shape_b) < 2
        or shape_a[0] != shape_b[1]
        or shape_a[0] == 0
        or any(d != 1 for d in shape_b[2:])
    ):
      raise AdapterError(
          f"{where}: module '{name}': shape mismatch, A {list(shape_a)} and B "
          f"{list(shape_b)} (expected A (r, in, ...) and B (out, r, 1, ...) with the same r)"
      )
    r_config = config.rank(name)
    if r_config != shape_a[0]:
      raise AdapterError(
          f"{where}: module '{name}': {CONFIG_NAME} gives r={r_config} but A is "
          f"{list(shape_a)} and B is {list(shape_b)} (r={shape_a[0]})"
      )
    modules.append(
        LoraModule(
            name=name,
            key_a=sides["A"],
            key_b=sides["B"],
            shape_a=shape_a,
            shape_b=shape_b,
            dtype_a=info_a.dtype,
            dtype_b=info_b.dtype,
            scale=config.scale(name),
        )
    )
  return modules, passthrough


class PeftAdapter:
  """A PEFT LoRA adapter directory opened for reading: config and tensor index now, factors on demand.

  Attributes:
    directory: the adapter directory.
    config: its PeftAdapterConfig.
    reader: the open SafetensorsReader of adapter_model.safetensors.
    modules: the LoRA modules, in file order.
    passthrough: names of all other tensors (copied unchanged on squeeze).
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    if not self.directory.is_dir():
      raise AdapterError(f"{self.directory}: no such adapter directory")
    config_path = self.directory / CONFIG_NAME
    if not config_path.is_file():
      raise AdapterError(f"{self.directory}: missing {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
      raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise AdapterError(f"{config_path}: cannot read JSON ({e})") from None
    if not isinstance(raw, dict):
      raise AdapterError(f"{config_path}: expected a JSON object")
    self.config = PeftAdapterConfig.from_dict(raw, str(config_path))
    weights = self.directory / WEIGHTS_NAME
    if not weights.is_file():
      if (self.directory / TORCH_WEIGHTS_NAME).is_file():
        raise AdapterError(
            f"{self.directory}: only {TORCH_WEIGHTS_NAME} (a torch pickle) is present; this "
            f"tool reads {WEIGHTS_NAME} (save with safe_serialization=True)"
        )
      raise AdapterError(f"{self.directory}: missing {WEIGHTS_NAME}")
    self.reader = SafetensorsReader(weights)
    try:
      self.modules, self.passthrough = _find_modules(self.reader, self.config)
      if not self.modules:
        raise AdapterError(f"{weights}: no lora_A/lora_B tensor pairs found")
    except BaseException:
      self.reader.close()
      raise

  def factors(self, module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """a = √scale·Aᵀ (in, r) and b = √scale·Bᵀ (r, out) in float32: a @ b = ΔW_effᵀ, the scale split evenly.

    (A negative scale goes to b as its sign.)"""
    half = math.sqrt(abs(module.scale))
    out = []
    for key in (module.key_a, module.key_b):
      x = self.reader.read(key)
      x32 = x.astype(np.float32)
      finite = np.isfinite(x if x.dtype == np.float64 else x32)  # (on float32: 10x faster than on bfloat16)
      if not finite.all():
        raise AdapterError(
            f"{self.reader.path.name}: module '{module.name}': '{key}' {list(x.shape)} contains "
            f"{finite.size - int(finite.sum())} NaN/Inf values"
        )
      out.append(x32)
    a_mat = out[0].reshape(module.r, -1).T * np.float32(half)
    b_mat = out[1].reshape(module.out_features, module.r).T * np.float32(math.copysign(half, module.scale))
    return a_mat, b_mat

  def close(self) -> None:
    self.reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
