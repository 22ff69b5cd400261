"""Hugging Face PEFT LoRA adapters without torch, and the ``lora-squeeze`` command.

    lora-squeeze squeeze IN OUT --rank R  [--method efficient|rsvd|svd] [--dtype keep|float32|...]
    lora-squeeze squeeze IN OUT --energy E [--per-module] [--max-rank N] [--dry-run] [--force]
    lora-squeeze squeeze IN OUT --sv-ratio R | --sv-fro F | --sv-cumulative C [--max-rank N]
    lora-squeeze inspect IN [--plot retention.png|.pdf|.svg|...]
    lora-squeeze convert PEFT_DIR OUT.gguf [--arch gemma3]  |  lora-squeeze convert IN.gguf PEFT_DIR

IN is a PEFT adapter directory (this module), a single-file kohya / LyCORIS / diffusers LoRA
(``lora_files.py``, which reuses this module's reader, writer, planning and squeeze) or a GGUF LoRA of
llama.cpp / ollama (``gguf_lora.py``, also the ``convert`` command). The ``--sv-*`` rules are
kohya sd-scripts' dynamic resize rules (``DYNAMIC_RULES``, ``squeeze.rank_sv_*``), each module's rank from
its own spectrum. The command imports jax, numpy and ml_dtypes only (and gguf for GGUF files): the training
stack (flax, gemma, tensorflow) is the ``[train]`` extra, imported by ``export_peft`` / ``import_peft`` alone.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per adapted
module, ``<prefix>.lora_A.weight`` (r, in) and ``<prefix>.lora_B.weight`` (out, r) (``lora_embedding_A``
(r, num_embeddings) / ``lora_embedding_B`` (dim, r) for embeddings; conv layers add kernel dims to A and 1s to
B). PEFT applies ΔW_eff = scale · B @ A with scale = lora_alpha / r (lora_alpha / √r with ``use_rslora``),
r and lora_alpha overridden per module by ``rank_pattern`` / ``alpha_pattern`` (matched as in
``get_pattern_key``). Any base model works: we act on whatever lora_A/lora_B pairs the file holds; every other
tensor (``modules_to_save``, DoRA magnitudes, LoRA biases) is copied byte for byte.

The squeeze (Post-Squeeze, the paper's Sec. 3) replaces each module's ΔW_eff by its best rank-r_tgt
approximation (Eckart–Young) via ``squeeze.squeeze_factors``. We hand it a = √scale·Aᵀ (in, r) and
b = √scale·Bᵀ (r, out), so a @ b = ΔW_effᵀ: the transpose has the same singular values, and it keeps
squeeze.py's convention that ``a`` is the input side, which is also the side PEFT initialises randomly (a
rank increase adds random A rows and zero B columns, like a fresh PEFT LoRA).

Scale folding (the rule this tool writes): the output has scale = 1 for every module, i.e. lora_alpha = r
for each module's new r (``alpha_pattern`` mirrors ``rank_pattern`` key for key) and ``use_rslora`` = false;
the old scale is folded into the factors, split evenly: B' = U_r Σ_r^½, A' = Σ_r^½ V_rᵀ for
ΔW_eff = U Σ Vᵀ. So B' @ A' *is* the new ΔW_eff, and old and new PEFT versions resolve the same r and alpha
for every module. (With rsLoRA, scale 1 would need the irrational alpha √r; switching rsLoRA off is exact.)

Memory: the adapter is streamed, one module's factors at a time, through a small safetensors reader/writer
of our own (numpy + ml_dtypes, so bfloat16 works without torch): all output shapes are known before the
first module is squeezed, so the header is written first and each tensor's bytes follow. Peak memory is
about one module's factors plus the JAX runtime, whatever the adapter's size. The output directory is
built next to OUT_DIR and renamed into place at the end: on any error OUT_DIR does not exist.

Safety (``_check_out_dir``, ``_atomic_dir``): an OUT_DIR that is IN_DIR, contains it or lies inside it is
refused before any work, --force or not (symlinks resolved): replacing it would delete the input. A rank
above a module's full rank min(out, in) is capped there (``plan_ranks``; one note on stderr), since ΔW is
exact at full rank. The scratch directory (``.OUT_DIR.<pid>@<host>.<random>.partial``) carries its writer's
PID, so a later write of the same OUT_DIR removes those of killed runs and never a live writer's; it is
made like ``mkdir`` makes directories (0777 minus the umask), so OUT_DIR does not end up 0700.

Speed (experiments/peft_squeeze_speed.py, squeeze_speed.py, flux_squeeze_speed.py: whole adapters in
seconds on 2 CPU cores, where the full-ΔW SVD route takes hours): the efficient route costs milliseconds
per module, so fixed costs would dominate. It runs on squeeze's host route (numpy/LAPACK: no XLA compile,
no per-call dispatch), and ``squeeze_modules``, the one loop of the PEFT and single-file paths, reads and
squeezes modules side by side in threads (``squeeze.host_map``) while the caller writes the results in
order.

Gemma 3 LoRAs in and out (our tree, lora.py's layout, <-> a PEFT directory that PEFT and vLLM load on the
Hugging Face Gemma 3 checkpoint)::

    export_peft(lora_params, out_dir, *, lora_config, model_config, base_model_name_or_path=None,
                layout="causal_lm" | "conditional_generation", dtype="float32", force=False) -> config dict
    import_peft(in_dir, *, model_config, joint_kv=False, joint_gate_up=False, keep_alpha=True)
        -> (lora_params, lora.LoRAConfig)

* Names: ``base_model.model.<stem>.{i}.self_attn.{q,k,v,o}_proj`` / ``.mlp.{gate,up,down}_proj`` +
  ``.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r). ``<stem>`` is ``model.layers`` for
  Gemma3ForCausalLM (270M, 1B; layout "causal_lm") and ``model.language_model.layers`` for
  Gemma3ForConditionalGeneration (4B, 12B, 27B; "conditional_generation", transformers >= 4.52). Import
  also reads the pre-4.52 ``language_model.model.layers`` and a bare ``layers``. ``HF_BASE_MODELS`` gives
  the hub id and layout of each of our model names.
* Layout: A = a.reshape(-1, r).T and B = b.reshape(r, -1).T for every projection (q: a (d, r),
  b (r, N, H) -> B (N*H, r); o: a (N, H, r) -> A (r, N*H); ...), because gemma's (N, H) head axes flatten
  row-major into Hugging Face's n*H + h features (``_to_hf`` cites the checkpoint conversion this follows).
  No rope permutation: both rotate split halves.
* Joint adapters (``joint_kv`` / ``joint_gate_up``): exported as two PEFT modules (k_proj and v_proj, gate_proj
  and up_proj) with the same lora_A, each of rank r: exact. Imported as separate adapters by default; with
  the joint flag, two modules with bitwise-identical lora_A and equal scale become one rank-r pair (what our
  export writes), any other two become a = [a_1 | a_2] (d, r_1 + r_2) with a block-diagonal b: rank
  r_1 + r_2, each half's ΔW exact, twice the parameters.
* Scale. Export: with ``alpha`` set and one rank for all modules, lora_alpha = alpha (PEFT's alpha / r is
  ours) and the factors are written as they are. Otherwise every module gets scale 1: lora_alpha = r,
  ``alpha_pattern`` mirrors ``rank_pattern`` (``output_config``, the rule the squeeze writes), use_rslora
  false, and a float alpha's alpha / r_m is folded into each module's factors (√ on each side). Why not
  lora_alpha = alpha with a rank_pattern: vLLM reads one scale, lora_alpha / r, for every module (it ignores
  both patterns), so mixed ranks must share a scale to load right there. Import: PEFT's per-module scale
  (lora_alpha / r or / √r with rsLoRA, patterns resolved by ``get_pattern_key``) is kept as the config's
  alpha when one lora_alpha serves every module (no rsLoRA; scale 1 everywhere gives alpha None), so the
  factors come back bit for bit; otherwise (or ``keep_alpha=False``) it is folded into the factors
  (√ on each side) and alpha is None. Mixed ranks come back as a {module path: rank} ``LoRAConfig.rank``.
* Errors (AdapterError, naming the file, module and shapes): params or tensors that do not fit the model
  config, missing halves, NaN/Inf, module names that are not Gemma 3 text projections, layer indices out of
  range, tensors we cannot represent (modules_to_save, DoRA, LoRA biases). Export writes atomically, like
  the squeeze: on any error ``out_dir`` does not exist. ``lora.py`` (flax, gemma) is imported only by these
  two functions, so the command stays light.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lora_squeeze import runtime
from lora_squeeze import squeeze

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "adapter_model.bin"
# PEFT saves LoRA weights under the PeftModel, whose base model is at `base_model.model`; PEFT matches
# rank_pattern/alpha_pattern keys against module names *inside* the base model, so without this prefix.
PEFT_PREFIX = "base_model.model."
# LoraConfig defaults, for configs that leave a field out.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False}

METHODS = squeeze.METHODS
DTYPES = ("keep", "float32", "bfloat16", "float16")


class AdapterError(Exception):
  """A user error (bad input files or arguments): the CLI prints its one-line message and exits 2."""


# --------------------------------------------------------------------------------------------------------
# safetensors without torch: read and write one tensor at a time.
# --------------------------------------------------------------------------------------------------------

_NP_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in _NP_DTYPES.items()}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_OUT_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One header entry: dtype code ("F32", "BF16", ...), shape, and byte span within the data section."""

  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


class SafetensorsReader:
  """A .safetensors file opened for reading tensors one at a time (numpy; any dtype, bfloat16 included).

  Why not ``safetensors.safe_open``: its numpy backend handles bfloat16 only in recent releases, and we
  need a writer of our own anyway (it has no streaming writer). Reading the documented format (8-byte
  header length, JSON header, raw little-endian data) costs a few lines and lets us check the whole file up
  front, so a truncated or corrupt file fails with a message that says what is wrong before any work.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._lock = threading.Lock()
    try:
      self._file = open(self.path, "rb")
    except OSError as e:
      raise AdapterError(f"{self.path}: cannot open ({e.strerror})") from None
    try:
      self._parse_header()
    except BaseException:
      self._file.close()
      raise

  def _corrupt(self, why: str) -> AdapterError:
    return AdapterError(f"{self.path}: not a valid safetensors file ({why})")

  def _parse_header(self) -> None:
    size = os.fstat(self._file.fileno()).st_size
    if size < 8:
      raise self._corrupt(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", self._file.read(8))
    if n > _MAX_HEADER or 8 + n > size:
      raise self._corrupt(f"header length {n} does not fit in the file's {size} bytes; truncated?")
    try:
      header = json.loads(self._file.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise self._corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
      raise self._corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
      raise self._corrupt("__metadata__ must map strings to strings")
    self.metadata: dict[str, str] | None = meta
    self.data_start = 8 + n
    self.tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
      try:
        code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        ok = (
            code in _NP_DTYPES
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
        )
      except (KeyError, TypeError, ValueError):
        ok = False
      if not ok:
        raise self._corrupt(f"bad header entry for tensor '{name}': {entry!r}")
      if math.prod(shape) * _NP_DTYPES[code].itemsize != end - begin:
        raise self._corrupt(
            f"tensor '{name}' {code}{list(shape)} needs "
            f"{math.prod(shape) * _NP_DTYPES[code].itemsize} bytes, header gives {end - begin}"
        )
      self.tensors[name] = TensorInfo(code, shape, begin, end)
    # The format requires the byte spans to tile the data section exactly.
    pos = 0
    for info in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
      if info.begin != pos:
        raise self._corrupt(f"tensor data spans overlap or leave a gap at byte {pos}")
      pos = info.end
    if self.data_start + pos > size:
      raise AdapterError(
          f"{self.path}: truncated: the header describes {self.data_start + pos} bytes, " f"the file has {size}"
      )
    if self.data_start + pos < size:
      raise self._corrupt(f"{size - self.data_start - pos} trailing bytes after the last tensor")
    self.file_size = size

  def read(self, name: str) -> np.ndarray:
    """The tensor as a numpy array of its own dtype (ml_dtypes.bfloat16 for BF16)."""
    info = self.tensors[name]
    buf = np.empty(info.end - info.begin, np.uint8)
    with self._lock:  # squeeze_modules reads from several threads
      self._file.seek(self.data_start + info.begin)
      got = self._file.readinto(buf)
    if got != buf.size:
      raise AdapterError(f"{self.path}: truncated while reading tensor '{name}' (file changed on disk?)")
    return buf.view(_NP_DTYPES[info.dtype]).reshape(info.shape)

  def close(self) -> None:
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _header_bytes(
    entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
  """The serialised header (length prefix excluded, space-padded to 8 bytes) and each entry's byte size."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  sizes, offset = [], 0
  for name, code, shape in entries:
    nbytes = math.prod(shape) * _NP_DTYPES[code].itemsize
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    sizes.append(nbytes)
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return raw + b" " * (-len(raw) % 8), sizes


def safetensors_size(
    entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> int:
  """Exact size in bytes of the .safetensors file ``SafetensorsWriter`` writes for these entries."""
  raw, sizes = _header_bytes(entries, metadata)
  return 8 + len(raw) + sum(sizes)


class SafetensorsWriter:
  """Streams tensors into a new .safetensors file in a fixed order.

  Every entry (name, dtype code, shape) is declared up front, so the header goes out first and each
  tensor's bytes follow as soon as they exist: a whole adapter never has to sit in memory.
  """

  def __init__(
      self,
      path: str | os.PathLike,
      entries: Sequence[tuple[str, str, tuple[int, ...]]],
      metadata: Mapping[str, str] | None = None,
  ):
    raw, sizes = _header_bytes(entries, metadata)
    self._pending = [(name, code, tuple(shape), n) for (name, code, shape), n in zip(entries, sizes)]
    self._pending.reverse()
    self.path = Path(path)
    self._file = open(self.path, "wb")
    self._file.write(struct.pack("<Q", len(raw)))
    self._file.write(raw)

  def write(self, name: str, data: np.ndarray | bytes) -> None:
    """Writes the next declared tensor: an array of the declared dtype and shape, or its raw bytes."""
    want, code, shape, nbytes = self._pending.pop()
    if name != want:
      raise RuntimeError(f"SafetensorsWriter: expected tensor '{want}' next, got '{name}'")
    if isinstance(data, np.ndarray):
      if data.shape != shape or _CODES.get(data.dtype) != code:
        raise RuntimeError(
            f"SafetensorsWriter: '{name}' declared {code}{list(shape)}, got " f"{data.dtype}{list(data.shape)}"
        )
      data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if len(data) != nbytes:
      raise RuntimeError(f"SafetensorsWriter: '{name}' should be {nbytes} bytes, got {len(data)}")
    self._file.write(data)

  def close(self) -> None:
    """Flushes to disk; raises if a declared tensor was never written."""
    if self._pending:
      self._file.close()
      raise RuntimeError(
          f"SafetensorsWriter: {len(self._pending)} tensors never written, e.g. " f"'{self._pending[-1][0]}'"
      )
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()

  def abort(self) -> None:
    self._file.close()


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
  """Writes a dict of numpy arrays (bfloat16 included) as one .safetensors file."""
  entries = [(name, _CODES[np.asarray(x).dtype], tuple(np.shape(x))) for name, x in tensors.items()]
  writer = SafetensorsWriter(path, entries, metadata)
  try:
    for name, x in tensors.items():
      writer.write(name, np.asarray(x))
  except BaseException:
    writer.abort()
    raise
  writer.close()


# --------------------------------------------------------------------------------------------------------
# PEFT config: per-module r, alpha and scale.
# --------------------------------------------------------------------------------------------------------


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
  """The rank_pattern/alpha_pattern key that applies to ``module_name``, or None.

  PEFT's rule (``peft.utils.other.get_pattern_key``): the first key, in the dict's order, for which
  ``re.match(rf"(.*\\.)?({key})$", module_name)`` matches, i.e. the key, read as a regex, matches the whole
  name or a dot-separated tail of it. (Releases before ~0.14 used ``rf".*\\.{key}$"`` and one lookup for both
  dicts; the patterns this module writes resolve identically under both rules.)
  """
  for key in pattern_keys:
    try:
      if re.match(rf"(.*\.)?({key})$", module_name):
        return key
    except re.error as e:
      raise AdapterError(
          f"{CONFIG_NAME}: rank_pattern/alpha_pattern key {key!r} is not a valid regex " f"({e})"
      ) from None
  return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The fields of a PEFT ``LoraConfig`` that decide each module's ΔW_eff; ``raw`` is the whole JSON."""

  raw: dict
  r: int
  lora_alpha: float
  use_rslora: bool
  rank_pattern: dict
  alpha_pattern: dict

  @classmethod
  def from_dict(cls, raw: dict, where: str = CONFIG_NAME) -> "LoraConfig":
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
      raise AdapterError(f'{where}: peft_type is {peft_type!r}; only LoRA adapters ("LORA") are supported')
    fields = {k: d if raw.get(k) is None else raw[k] for k, d in PEFT_DEFAULTS.items()}
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    if not (isinstance(fields["r"], int) and fields["r"] >= 1):
      raise AdapterError(f"{where}: r must be a positive integer, got {fields['r']!r}")
    if not isinstance(fields["lora_alpha"], (int, float)) or isinstance(fields["lora_alpha"], bool):
      raise AdapterError(f"{where}: lora_alpha must be a number, got {fields['lora_alpha']!r}")
    if not (isinstance(rank_pattern, dict) and isinstance(alpha_pattern, dict)):
      raise AdapterError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    for key, value in rank_pattern.items():
      if not (isinstance(value, int) and value >= 1):
        raise AdapterError(f"{where}: rank_pattern[{key!r}] must be a positive integer, got {value!r}")
    return cls(
        raw=raw,
        r=fields["r"],
        lora_alpha=fields["lora_alpha"],
        use_rslora=bool(fields["use_rslora"]),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )

  def rank(self, module_name: str) -> int:
    key = get_pattern_key(self.rank_pattern, module_name)
    return self.r if key is None else self.rank_pattern[key]

  def alpha(self, module_name: str) -> float:
    key = get_pattern_key(self.alpha_pattern, module_name)
    return self.lora_alpha if key is None else self.alpha_pattern[key]

  def scale(self, module_name: str) -> float:
    """PEFT's ``scaling``: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
    r = self.rank(module_name)
    return self.alpha(module_name) / (math.sqrt(r) if self.use_rslora else r)


def pattern_keys(names: Sequence[str]) -> dict[str, str]:
  """A rank_pattern key per module name that PEFT resolves to that module alone (among ``names``).

  The shortest dot-separated tail of the name that no other module ends with and that starts with a word
  (``layers.3.mlp.down_proj``, not ``3.mlp.down_proj``, for people reading the config), but never the whole
  name when it has more than one component: old PEFT releases (``.*\\.{key}$``) need a dot before the key.
  Falls back to the whole name when no tail qualifies. ``output_config`` checks the result under PEFT's
  regex rule (where ``.`` matches any character).
  """
  parts = {n: n.split(".") for n in names}
  keys = {}
  for k in range(1, max((len(p) for p in parts.values()), default=1)):
    tails = collections.Counter(".".join(p[-k:]) for p in parts.values() if len(p) >= k)
    for n in names:
      if n not in keys and len(parts[n]) > k and not parts[n][-k].isdigit():
        tail = ".".join(parts[n][-k:])
        if tails[tail] == 1:
          keys[n] = tail
  for n in names:
    keys.setdefault(n, n)
  return keys


# --------------------------------------------------------------------------------------------------------
# Adapter directories.
# --------------------------------------------------------------------------------------------------------

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


def _find_modules(reader: SafetensorsReader, config: LoraConfig) -> tuple[list[LoraModule], list[str]]:
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
    if info_a.dtype not in _FLOAT_CODES or info_b.dtype not in _FLOAT_CODES:
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
    config: its LoraConfig.
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
    self.config = LoraConfig.from_dict(raw, str(config_path))
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


# --------------------------------------------------------------------------------------------------------
# Squeezing modules.
# --------------------------------------------------------------------------------------------------------


def squeeze_matrices(
    a: np.ndarray,
    b: np.ndarray,
    rank: int,
    *,
    method: str = "efficient",
    key: jax.Array | np.ndarray | None = None,
    where: str = "",
    compute_rank: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``squeeze.squeeze_factors`` for one module: (a' (m, rank), b' (rank, n), singular values), numpy float32.

  "efficient" takes squeeze's host route (numpy/LAPACK, nothing compiled). "svd" and "rsvd" run compiled
  XLA programs, where every distinct (shape, rank) costs a compile of seconds on CPU, so "svd" computes at
  ``compute_rank`` (>= rank; one value for a whole adapter) and keeps the first ``rank`` directions: it
  computes the full spectrum and treats each direction on its own, so this is the rank-``rank`` result (also
  for directions re-initialised for lack of energy). "rsvd" sketches with rank + k_o columns, so it always
  runs at ``rank``. ``key``: a PRNG key or its raw key data (``squeeze_factors``).
  """
  if method == "efficient":
    out = squeeze.squeeze_factors(a, b, rank, method=method, key=key, where=where, route="host")
    return out.a, out.b, out.singular_values
  k = rank if method == "rsvd" or compute_rank is None else max(rank, compute_rank)
  # numpy in and out: on a jax.Array every a[None] or slice is a dispatch (~1 ms on CPU) or even a compile.
  out = squeeze.squeeze_factors(a, b, k, method=method, key=key, where=where, route="xla")
  return (np.array(np.asarray(out.a)[:, :rank]), np.array(np.asarray(out.b)[:rank]), np.asarray(out.singular_values))


def _progress(iterable, total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (only on a terminal: None lets tqdm decide), or the bare iterable."""
  if not enabled:
    return iterable
  from tqdm import tqdm

  return tqdm(iterable, total=total, desc=desc, unit="module", file=sys.stderr, disable=None, leave=False)


def squeeze_modules(
    source,
    modules: Sequence[LoraModule],
    ranks: Mapping[str, int],
    *,
    method: str,
    seed: int = 0,
    progress: bool = True,
) -> Iterable[tuple[int, LoraModule, np.ndarray, np.ndarray, np.ndarray]]:
  """(i, module, a', b', singular values) for every module in order: the squeeze of the command, for a PEFT
  directory and a single file alike (``source`` has ``factors(module)``, as PeftAdapter and LoraFile do).

  "efficient": modules are read and squeezed in ``squeeze.host_map``'s threads (one per core, at most 8),
  each on the host route with BLAS on one thread; the caller writes each result as it comes, so about one
  module per thread is in memory at a time. "svd"/"rsvd" run one module at a time in this thread
  (``squeeze_matrices``, all at one compute rank, the largest target: ranks are capped at each module's
  full rank, so it never exceeds the largest min(m, n)). Module i's key is
  ``jax.random.split(jax.random.key(seed), len(modules))[i]`` (made in one dispatch, not one per module).
  """
  key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), len(modules))))
  compute_rank = max(ranks[m.name] for m in modules)

  def one(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = modules[i]
    a, b = source.factors(m)
    return squeeze_matrices(
        a, b, ranks[m.name], method=method, where=m.name, key=key_data[i], compute_rank=compute_rank
    )

  indices = range(len(modules))
  results = squeeze.host_map(one, indices) if method == "efficient" else map(one, indices)
  for i, (new_a, new_b, s) in enumerate(_progress(results, len(modules), "squeeze", progress)):
    yield i, modules[i], new_a, new_b, s


def adapter_spectra(adapter: PeftAdapter, *, progress: bool = True) -> dict[str, np.ndarray]:
  """{module name: all r singular values of its ΔW_eff} (efficient route, never forming ΔW), reading one
  module at a time in ``squeeze.host_map``'s threads."""
  values = squeeze.host_map(lambda m: squeeze.singular_values(*adapter.factors(m), route="host"), adapter.modules)
  return {m.name: s for m, s in zip(adapter.modules, _progress(values, len(adapter.modules), "spectra", progress))}


# kohya sd-scripts' dynamic rank rules (networks/resize_lora.py), each choosing every module's rank from
# its own spectrum: the squeeze.rank_* function, and the command's flag.
DYNAMIC_RULES = {
    "sv_ratio": squeeze.rank_sv_ratio,
    "sv_fro": squeeze.rank_sv_fro,
    "sv_cumulative": squeeze.rank_sv_cumulative,
}


def check_target(
    rank: int | None,
    energy: float | None,
    per_module: bool,
    *,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> None:
  """Raises AdapterError unless exactly one rule is given: rank (>= 1), energy (in (0, 1]) or a ``dynamic``
  kohya rule (name in DYNAMIC_RULES, value); per_module only with energy; max_rank (>= 1) only with energy
  or a dynamic rule. Run before any work, so a typo fails in a second, not after a pass over the adapter."""
  given = [x for x in (rank, energy, dynamic) if x is not None]
  if len(given) != 1:
    raise AdapterError("give exactly one of --rank, --energy, --sv-ratio, --sv-fro and --sv-cumulative")
  if per_module and energy is None:
    raise AdapterError(
        "--per-module needs --energy (with --rank every module gets the same rank; the --sv-* "
        "rules are always per module)"
    )
  if max_rank is not None:
    if rank is not None:
      raise AdapterError("--max-rank goes with --energy or an --sv-* rule, not --rank")
    if max_rank < 1:
      raise AdapterError(f"--max-rank must be >= 1, got {max_rank}")
  if rank is not None:
    if rank < 1:
      raise AdapterError(f"--rank must be >= 1, got {rank}")
  elif energy is not None:
    if not 0.0 < energy <= 1.0:
      raise AdapterError(f"--energy must be in (0, 1], got {energy}")
  else:
    name, value = dynamic
    if name not in DYNAMIC_RULES:
      raise AdapterError(f"unknown rank rule {name!r}; choose one of {', '.join(DYNAMIC_RULES)}")
    ok = value >= 1.0 if name == "sv_ratio" else 0.0 < value <= 1.0
    if not ok:
      flag = "--" + name.replace("_", "-")
      raise AdapterError(f"{flag} must be {'>= 1' if name == 'sv_ratio' else 'in (0, 1]'}, got {value}")


def _wanted_ranks(
    modules: Sequence[LoraModule],
    spectra: Mapping[str, np.ndarray] | None,
    *,
    rank: int | None,
    energy: float | None,
    per_module: bool,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
  """``plan_ranks`` before the full-rank cap (``max_rank`` already applied)."""
  check_target(rank, energy, per_module, dynamic=dynamic, max_rank=max_rank)
  if rank is not None:
    return {m.name: rank for m in modules}
  if dynamic is not None:
    rule, value = DYNAMIC_RULES[dynamic[0]], dynamic[1]
    wanted = {m.name: rule(spectra[m.name], value) for m in modules}
  elif per_module:
    wanted = {m.name: squeeze.choose_rank(spectra[m.name], energy) for m in modules}
  else:
    r = squeeze.choose_homogeneous_rank({m.name: spectra[m.name] for m in modules}, energy)
    wanted = {m.name: r for m in modules}
  return {n: min(r, max_rank) if max_rank else r for n, r in wanted.items()}


def plan_ranks(
    modules: Sequence[LoraModule],
    spectra: Mapping[str, np.ndarray] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    per_module: bool = False,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
  """Each module's target rank: ``rank`` everywhere, from the retention target ``energy``, or from a kohya
  ``dynamic`` rule (``DYNAMIC_RULES``: each module from its own spectrum), at most ``max_rank``.

  ``energy`` alone: one rank for all, the largest of the per-module choices (``choose_homogeneous_rank``);
  with ``per_module``: each module's own smallest rank with V_r >= energy (``choose_rank``). Every rank is
  capped at the module's full rank min(out, in) (``LoraModule.full_rank``): ΔW_eff is then kept exactly,
  and a higher rank would only add random A rows with zero B columns, bytes that change nothing (``--rank
  1000000`` wrote a 1.9 GiB adapter). A rank above r_src but within the full rank is kept (it grows the
  adapter, ΔW exact).
  """
  wanted = _wanted_ranks(
      modules, spectra, rank=rank, energy=energy, per_module=per_module, dynamic=dynamic, max_rank=max_rank
  )
  return {m.name: min(wanted[m.name], m.full_rank) for m in modules}


def _cap_note(
    modules: Sequence[LoraModule],
    wanted: Mapping[str, int],
    ranks: Mapping[str, int],
    rank: int | None,
    energy: float | None,
) -> str | None:
  """The one-line note that ``plan_ranks`` capped some modules' ranks (None when it capped none)."""
  capped = [m for m in modules if ranks[m.name] < wanted[m.name]]
  if not capped:
    return None
  what = (
      f"--rank {rank}"
      if rank is not None
      else f"the rank chosen for --energy {energy:g}"
      if energy is not None
      else "the rank chosen by the --sv-* rule"
  )
  return (
      f"{what} exceeds the full rank of {len(capped)} modules; capped at min(m, n) per module (largest "
      f"{max(ranks[m.name] for m in capped)})"
  )


def output_config(config: LoraConfig, ranks: Mapping[str, int]) -> dict:
  """The new adapter_config.json: the input's, with r, lora_alpha, rank/alpha_pattern for scale 1.

  The most common new rank becomes ``r`` (= ``lora_alpha``); every other module gets a ``rank_pattern``
  entry and the same key in ``alpha_pattern`` with alpha = its rank; rsLoRA is switched off. Every module
  then has scale 1 under both old and new PEFT matching rules, which is checked here.
  """
  counts = collections.Counter(ranks.values())
  default = max(counts, key=lambda r: (counts[r], r))
  others = [n for n, r in ranks.items() if r != default]
  keys = pattern_keys(list(ranks))
  rank_pattern = {keys[n]: ranks[n] for n in others}
  new = dict(config.raw)
  new.update(
      r=default, lora_alpha=default, use_rslora=False, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern)
  )
  check = LoraConfig.from_dict(new)
  for n, r in ranks.items():
    if check.rank(n) != r or check.scale(n) != 1.0:
      raise RuntimeError(
          f"output_config: module '{n}' would resolve to r={check.rank(n)}, "
          f"scale={check.scale(n)} (want r={r}, scale 1)"
      )
  return new


@dataclasses.dataclass
class ModuleReport:
  """One module's squeeze: its name, (out, in), old and new rank, old scale, retention V_{r_tgt}."""

  name: str
  shape: tuple[int, int]
  r_src: int
  r_tgt: int
  scale: float
  retention: float


@dataclasses.dataclass
class SqueezeReport:
  """What ``squeeze_adapter`` did (or, for a dry run, would do)."""

  in_dir: Path
  out_dir: Path
  method: str
  dry_run: bool
  modules: list[ModuleReport]
  passthrough: list[str]
  copied_files: list[str]
  config: dict
  in_bytes: int
  out_bytes: int
  seconds: float = 0.0
  note: str | None = None  # e.g. that ranks were capped at full rank: the command prints it on stderr
  # Single-file formats (lora_files.py): their own line about the written scale and metadata, the file
  # written (no WEIGHTS_NAME inside a directory), and the line about the tensors copied unchanged.
  config_line: str | None = None
  weights_name: str | None = WEIGHTS_NAME
  passthrough_line: str | None = None

  def table(self) -> str:
    width = max(len(m.name) for m in self.modules)
    lines = [f"{'module':<{width}}  {'out x in':>13}  {'r':>4} -> {'r_new':<5}  {'retention':>9}"]
    for m in self.modules:
      lines.append(
          f"{m.name:<{width}}  {m.shape[0]:>6}x{m.shape[1]:<6}  {m.r_src:>4} -> {m.r_tgt:<5}  " f"{m.retention:>9.5f}"
      )
    return "\n".join(lines)

  def summary(self) -> str:
    ret = np.array([m.retention for m in self.modules])
    changes = collections.Counter((m.r_src, m.r_tgt) for m in self.modules)
    grown = sum(1 for m in self.modules if m.r_tgt > m.r_src)
    verb = "would write" if self.dry_run else "wrote"
    lines = [
        f"{len(self.modules)} LoRA modules, ranks "
        + ", ".join(f"{a}->{b} ({c})" for (a, b), c in sorted(changes.items())),
        f"retention V_r: min {ret.min():.5f}, mean {ret.mean():.5f} (fraction of each ΔW's energy kept)",
        self.config_line
        or f"config: r={self.config['r']}, lora_alpha={self.config['lora_alpha']} (scale 1, folded into the "
        f"factors), {len(self.config['rank_pattern'])} rank_pattern entries",
        f"{verb} {self.out_dir}{': ' + self.weights_name if self.weights_name else ''} "
        f"{_fmt_bytes(self.out_bytes)} (input {_fmt_bytes(self.in_bytes)})"
        + (f", {len(self.passthrough)} other tensors copied" if self.passthrough else "")
        + (f", {len(self.copied_files)} other files copied" if self.copied_files else ""),
    ]
    if self.passthrough_line:
      lines.append(self.passthrough_line)
    if grown:
      lines.append(
          f"note: {grown} modules grew in rank: ΔW is kept exactly, the new directions are "
          "random A rows with zero B columns"
      )
    if not self.dry_run:
      lines.append(f"method {self.method}, {self.seconds:.1f} s")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def _cast(x: np.ndarray, code: str, where: str) -> np.ndarray:
  y = x.astype(_NP_DTYPES[code])
  if code in ("F16", "BF16") and not np.isfinite(y).all():
    raise AdapterError(f"module '{where}': new factors overflow {code}; use --dtype float32")
  return y


def squeeze_adapter(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    per_module: bool = False,
    method: str = "efficient",
    dtype: str = "keep",
    dry_run: bool = False,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> SqueezeReport:
  """Writes a copy of the PEFT adapter ``in_dir`` at new ranks to ``out_dir`` (see the module docstring).

  Args:
    in_dir, out_dir: adapter directories; ``out_dir`` must not exist unless ``force``, and may never be
      ``in_dir``, contain it or lie inside it.
    rank: one target rank for every module (capped at each module's full rank min(out, in): see
      ``plan_ranks``; the report's ``note`` says when); or
    energy: a retention target (0, 1]: one rank for all modules (the largest per-module choice), or with
      ``per_module`` each module's own rank (written as rank_pattern/alpha_pattern); or
    dynamic: a kohya rule (``DYNAMIC_RULES`` name, value), each module's rank from its own spectrum;
    max_rank: with energy or dynamic, no module's rank above this.
    method: "efficient" (Alg. 2, never forms ΔW), "rsvd" (Alg. 1) or "svd" (full SVD of ΔW).
    dtype: "keep" (each factor's input dtype) or float32/bfloat16/float16 for the new factors.
    dry_run: compute the plan (ranks, retention, sizes) and write nothing.
    seed: PRNG seed (rsvd sketches, init of directions without energy); module i (in file order) uses
      ``jax.random.split(jax.random.key(seed), n_modules)[i]``.

  Returns:
    A SqueezeReport.

  Raises:
    AdapterError: bad input or arguments; ``out_dir`` is then left absent (or untouched).
  """
  start = time.perf_counter()
  if method not in METHODS:
    raise AdapterError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
  if dtype not in DTYPES:
    raise AdapterError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
  check_target(rank, energy, per_module, dynamic=dynamic, max_rank=max_rank)
  in_dir, out_dir = Path(in_dir), Path(out_dir)
  if not in_dir.is_dir():
    # A single file: kohya / diffusers LoRAs (lora_files.py, which imports this module: hence here).
    from lora_squeeze import lora_files  # pylint: disable=g-import-not-at-top

    return lora_files.squeeze_file(
        in_dir,
        out_dir,
        rank=rank,
        energy=energy,
        per_module=per_module,
        method=method,
        dtype=dtype,
        dry_run=dry_run,
        force=force,
        seed=seed,
        progress=progress,
        dynamic=dynamic,
        max_rank=max_rank,
    )
  # Before opening anything: an OUT_DIR that is, holds or lies in IN_DIR is refused even for a dry run.
  _check_out_dir(out_dir, force, inputs=(in_dir,), dry_run=dry_run)
  with PeftAdapter(in_dir) as adapter:
    need_spectra = rank is None or dry_run or method == "rsvd"
    spectra = adapter_spectra(adapter, progress=progress) if need_spectra else None
    targets = dict(rank=rank, energy=energy, per_module=per_module, dynamic=dynamic, max_rank=max_rank)
    wanted = _wanted_ranks(adapter.modules, spectra, **targets)
    ranks = plan_ranks(adapter.modules, spectra, **targets)
    config = output_config(adapter.config, ranks)

    def code(original: str) -> str:
      return original if dtype == "keep" else _OUT_CODES[dtype]

    entries = []
    for m in adapter.modules:
      shape_a, shape_b = m.new_shapes(ranks[m.name])
      entries += [(m.key_a, code(m.dtype_a), shape_a), (m.key_b, code(m.dtype_b), shape_b)]
    entries += [(k, adapter.reader.tensors[k].dtype, adapter.reader.tensors[k].shape) for k in adapter.passthrough]
    metadata = adapter.reader.metadata if adapter.reader.metadata is not None else {"format": "pt"}
    extra_files = sorted(
        p.name
        for p in in_dir.iterdir()
        if p.is_file() and p.name not in (CONFIG_NAME, WEIGHTS_NAME, TORCH_WEIGHTS_NAME)
    )
    report = SqueezeReport(
        in_dir=in_dir,
        out_dir=out_dir,
        method=method,
        dry_run=dry_run,
        modules=[],
        passthrough=list(adapter.passthrough),
        copied_files=extra_files,
        config=config,
        in_bytes=adapter.reader.file_size,
        out_bytes=safetensors_size(entries, metadata),
        note=_cap_note(adapter.modules, wanted, ranks, rank, energy),
    )

    def module_report(m: LoraModule, s: np.ndarray) -> ModuleReport:
      return ModuleReport(
          name=m.name,
          shape=(m.out_features, m.in_features),
          r_src=m.r,
          r_tgt=ranks[m.name],
          scale=m.scale,
          retention=float(squeeze.retention(np.asarray(s), ranks[m.name])),
      )

    if dry_run:
      report.modules = [module_report(m, spectra[m.name]) for m in adapter.modules]
      report.seconds = time.perf_counter() - start
      return report

    with _atomic_dir(out_dir) as tmp:
      writer = SafetensorsWriter(tmp / WEIGHTS_NAME, entries, metadata)
      try:
        for i, m, new_a, new_b, s in squeeze_modules(
            adapter, adapter.modules, ranks, method=method, seed=seed, progress=progress
        ):
          shape_a, shape_b = m.new_shapes(ranks[m.name])
          writer.write(m.key_a, _cast(new_a.T.reshape(shape_a), code(m.dtype_a), m.name))
          writer.write(m.key_b, _cast(new_b.T.reshape(shape_b), code(m.dtype_b), m.name))
          report.modules.append(module_report(m, spectra[m.name] if spectra is not None else s))
          _fault_point(f"squeeze_after_module:{i}")
        for k in adapter.passthrough:
          writer.write(k, adapter.reader.read(k))
      except BaseException:
        writer.abort()
        raise
      writer.close()
      (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
      for name in extra_files:
        shutil.copy2(in_dir / name, tmp / name)
  report.seconds = time.perf_counter() - start
  return report


def _fault_point(name: str) -> None:
  """Fault injection for the kill tests: ``LORA_SQUEEZE_FAULT=name`` SIGKILLs this process here (as in
  train.py; a SIGKILL runs no cleanup, which is what leaves a partial directory behind)."""
  if os.environ.get("LORA_SQUEEZE_FAULT") == name:
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------
# Writing output directories: guarded, atomic, with normal permissions, and no debris from killed runs.
# --------------------------------------------------------------------------------------------------------

# Scratch directories (a ``.partial`` being written, an ``.old`` being deleted) sit next to OUT_DIR and are
# named ``.<OUT_DIR name>.<pid>@<host>.<random>.<kind>``: the writer's PID and a hash of its host name let a
# later run tell a dead writer's leftovers (removed) from a live writer's (kept), also on a file system that
# several machines share, where a PID means something only on its own host.
_HOST_ID = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_SCRATCH_KINDS = ("partial", "old")


def _scratch_dir(out_dir: Path, kind: str) -> Path:
  """Creates an empty scratch directory of ``kind`` next to ``out_dir`` for this process.

  ``os.mkdir(path, 0o777)`` applies the umask as ``mkdir`` does (0755 under umask 022); tempfile.mkdtemp
  would create it 0700, and the final rename would give OUT_DIR that mode.
  """
  while True:
    path = out_dir.parent / f".{out_dir.name}.{os.getpid()}@{_HOST_ID}.{secrets.token_hex(4)}.{kind}"
    try:
      os.mkdir(path, 0o777)
      return path
    except FileExistsError:
      continue


def _pid_alive(pid: int) -> bool:
  """Whether a process ``pid`` exists on this host. Errs towards True: a live writer's files must stay."""
  if pid <= 0:  # os.kill(0, ...) would address our process group; no writer has such a PID
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: alive, another user's
    return True
  return True


def _remove_stale_scratch(out_dir: Path) -> list[Path]:
  """Removes the scratch directories of ``out_dir`` (same name only) whose writer on this host is dead.

  A SIGKILLed run (or a power cut) gets no chance to remove its ``.partial``; without this they stay next to
  OUT_DIR forever. Returns the directories removed. (Scratch directories written before PIDs were in the
  name, ``.<name>.<random>.partial``, cannot be attributed and are left alone.)
  """
  pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)@{_HOST_ID}\.[0-9a-z]+\.({'|'.join(_SCRATCH_KINDS)})")
  removed = []
  try:
    entries = list(os.scandir(out_dir.parent))
  except OSError:
    return removed
  for entry in entries:
    match = pattern.fullmatch(entry.name)
    if match and entry.is_dir(follow_symlinks=False) and not _pid_alive(int(match[1])):
      shutil.rmtree(entry.path, ignore_errors=True)
      removed.append(Path(entry.path))
  return removed


def _replace_dir(tmp: Path, out_dir: Path) -> None:
  """Moves the finished ``tmp`` to ``out_dir`` with a rename (atomic); an old ``out_dir`` is moved aside first."""
  if out_dir.exists():
    old = _scratch_dir(out_dir, "old")
    os.rename(out_dir, old / "x")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, out_dir)


def _dir_ids(path: Path) -> list[tuple[int, int]]:
  """(st_dev, st_ino) of ``path`` and of each of its ancestors that exists, nearest first."""
  ids = []
  for p in (path, *path.parents):
    try:
      st = p.stat()
    except OSError:
      continue
    ids.append((st.st_dev, st.st_ino))
  return ids


def _check_not_input(out_dir: Path, in_dir: Path) -> None:
  """Raises AdapterError if ``out_dir`` is ``in_dir``, contains it, or lies inside it.

  Why: replacing OUT_DIR (--force) deletes it, so an OUT_DIR above IN_DIR would delete the input and every
  file beside it, and one inside IN_DIR would put the output among the input's files. Paths are compared as
  given (made absolute), with symlinks resolved, and by inode for the parts that exist (bind mounts, case-
  insensitive file systems).
  """
  outs = {Path(os.path.abspath(out_dir)), out_dir.resolve()}
  ins = {Path(os.path.abspath(in_dir)), in_dir.resolve()}
  same = any(o == i for o in outs for i in ins)
  contains = any(o in i.parents for o in outs for i in ins)
  inside = any(i in o.parents for o in outs for i in ins)
  in_ids, out_ids = _dir_ids(in_dir.resolve()), _dir_ids(out_dir.resolve())
  if in_ids and in_dir.exists():
    if out_dir.exists():
      same |= out_ids[0] == in_ids[0]
      contains |= out_ids[0] in in_ids[1:]
      inside |= in_ids[0] in out_ids[1:]
    else:
      inside |= in_ids[0] in out_ids
  if same:
    raise AdapterError(f"{out_dir}: output directory is the input directory; choose another OUT_DIR")
  if contains:
    raise AdapterError(
        f"{out_dir}: output directory contains the input directory {in_dir} (replacing it would "
        "delete the input); choose another OUT_DIR"
    )
  if inside:
    raise AdapterError(
        f"{out_dir}: output directory lies inside the input directory {in_dir}; choose one " "outside it"
    )


# --------------------------------------------------------------------------------------------------------
# Inspect.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InspectReport:
  """Per-module spectra of an adapter's ΔW_eff (``modules`` and ``spectra`` in file order)."""

  directory: Path
  modules: list[LoraModule]
  spectra: dict[str, np.ndarray]

  def table(self, top: int = 4) -> str:
    width = max(len(m.name) for m in self.modules)
    head = (
        f"{'module':<{width}}  {'out x in':>13}  {'r':>4}  {'scale':>7}  {'top singular values':<{9 * top}}"
        f"  {'V(r/2)':>8}  {'V(r/4)':>8}  {'V(r/8)':>8}"
    )
    lines = [head]
    for m in self.modules:
      s = self.spectra[m.name]
      sv = " ".join(f"{x:8.3g}" for x in s[:top])
      rets = "  ".join(f"{float(squeeze.retention(s, max(1, m.r // d))):8.5f}" for d in (2, 4, 8))
      lines.append(
          f"{m.name:<{width}}  {m.out_features:>6}x{m.in_features:<6}  {m.r:>4}  {m.scale:>7.4g}  "
          f"{sv:<{9 * top}}  {rets}"
      )
    return "\n".join(lines)

  def summary(self) -> str:
    by_kind = collections.defaultdict(list)
    for m in self.modules:
      by_kind[m.kind].append(m)
    params = sum(m.r * (m.in_features + m.out_features) for m in self.modules)
    ranks = collections.Counter(m.r for m in self.modules)
    lines = [
        f"{len(self.modules)} LoRA modules, {params:,} LoRA parameters, ranks "
        + ", ".join(f"{r} ({c})" for r, c in sorted(ranks.items())),
        "mean retention by module type (V at r/2, r/4, r/8):",
    ]
    for kind, ms in sorted(by_kind.items()):
      means = [
          np.mean([float(squeeze.retention(self.spectra[m.name], max(1, m.r // d))) for m in ms]) for d in (2, 4, 8)
      ]
      lines.append(f"  {kind:<16} ({len(ms):>3})  " + "  ".join(f"{v:.5f}" for v in means))
    homo = ", ".join(f"{e:g} -> r={squeeze.choose_homogeneous_rank(self.spectra, e)}" for e in (0.9, 0.95, 0.99))
    lines.append(f"one rank for all modules keeping energy E (lora-squeeze squeeze --energy E): {homo}")
    return "\n".join(lines)

  def plot(self, path: str | os.PathLike) -> None:
    """Retention curves V_k (k = 1..r): the mean over all modules and the mean per module type."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r_max = max(m.r for m in self.modules)
    ks = np.arange(1, r_max + 1)

    def curve(s):
      s2 = np.asarray(s, np.float64) ** 2
      c = np.cumsum(s2) / s2.sum() if s2.sum() > 0 else np.ones_like(s2)
      return np.concatenate([c, np.ones(r_max - len(c))])[:r_max]

    curves = {m.name: curve(self.spectra[m.name]) for m in self.modules}
    by_kind = collections.defaultdict(list)
    for m in self.modules:
      by_kind[m.kind].append(curves[m.name])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, cs in sorted(by_kind.items()):
      ax.plot(ks, np.mean(cs, axis=0), lw=1.2, label=kind)
    ax.plot(ks, np.mean(list(curves.values()), axis=0), color="black", lw=2.5, label="mean (all)")
    for e in (0.9, 0.99):
      ax.axhline(e, color="gray", lw=0.6, ls="--")
    ax.set(
        xlabel="rank $k$",
        ylabel=r"retention $V_k = \sum_{i \leq k} \sigma_i^2 / \sum_i \sigma_i^2$",
        ylim=(0, 1.02),
        xlim=(1, r_max),
        title=f"LoRA energy retention: {self.directory.name}",
    )
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_plot_path(path: str | os.PathLike) -> None:
  """Raises AdapterError unless matplotlib can save a figure to ``path``: an extension it knows (matplotlib's
  own list) in an existing directory. The command runs this before the spectra, so a typo costs no pass
  over the adapter (an unknown format used to end in matplotlib's traceback after all the work; no
  extension would make matplotlib append ".png" to the name)."""
  try:
    from matplotlib.backend_bases import FigureCanvasBase  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise AdapterError("--plot needs matplotlib (pip install matplotlib)") from None
  formats = sorted(FigureCanvasBase.get_supported_filetypes())
  valid = ", ".join(f".{f}" for f in formats)
  path = Path(path)
  suffix = path.suffix.lower()[1:]
  if not suffix:
    raise AdapterError(f"--plot {path}: no file extension; use one of {valid}")
  if suffix not in formats:
    raise AdapterError(f"--plot {path}: unknown plot format '.{suffix}'; use one of {valid}")
  if not path.parent.is_dir():
    raise AdapterError(f"--plot {path}: no such directory {path.parent}")


def inspect_adapter(directory: str | os.PathLike, *, progress: bool = True) -> InspectReport:
  """Spectra of every module's ΔW_eff (efficient route: never forms ΔW); a PEFT directory or a single
  kohya / diffusers file."""
  if not Path(directory).is_dir():
    from lora_squeeze import lora_files  # pylint: disable=g-import-not-at-top

    with lora_files.open_lora_file(directory) as adapter:
      return InspectReport(
          directory=Path(directory), modules=list(adapter.modules), spectra=adapter_spectra(adapter, progress=progress)
      )
  with PeftAdapter(directory) as adapter:
    return InspectReport(
        directory=Path(directory), modules=list(adapter.modules), spectra=adapter_spectra(adapter, progress=progress)
    )


# --------------------------------------------------------------------------------------------------------
# Gemma 3 LoRA (our tree, lora.py) <-> PEFT adapters.
# --------------------------------------------------------------------------------------------------------

# Our module kind -> (sub-module, projection) inside a Hugging Face Gemma3DecoderLayer.
HF_PROJECTIONS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
# Where the text decoder layers sit in each Hugging Face class (module names inside PEFT's base model):
# Gemma3ForCausalLM (270M, 1B) and Gemma3ForConditionalGeneration (4B, 12B, 27B; transformers >= 4.52).
HF_LAYOUTS = {"causal_lm": "model.layers", "conditional_generation": "model.language_model.layers"}
# Hub ids of the pretrained checkpoints (the "-it" ones have the same module names) and their class.
HF_BASE_MODELS = {
    "gemma3_270m": ("google/gemma-3-270m", "causal_lm"),
    "gemma3_1b": ("google/gemma-3-1b-pt", "causal_lm"),
    "gemma3_4b": ("google/gemma-3-4b-pt", "conditional_generation"),
    "gemma3_12b": ("google/gemma-3-12b-pt", "conditional_generation"),
}
# Read as well: Gemma3ForConditionalGeneration before transformers 4.52 (``language_model.model.layers``)
# and a bare Gemma3TextModel (``layers``).
_HF_MODULE = re.compile(
    r"^(?P<stem>model\.layers|model\.language_model\.layers|language_model\.model\.layers"
    r"|layers)\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\.(?P<proj>[a-z]+_proj)$"
)
_KIND_OF_PROJ = {proj: (group, kind) for kind, (group, proj) in HF_PROJECTIONS.items()}
_JOINT = {"kv": ("k", "v"), "gate_up": ("gate", "up")}


def _hf_dims(cfg) -> dict[str, tuple[int, int]]:
  """(in_features, out_features) of each Hugging Face projection of a gemma TransformerConfig."""
  d, f = cfg.embed_dim, cfg.hidden_dim
  nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (d, nh), "k": (d, kh), "v": (d, kh), "o": (nh, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def hf_module_name(layer: int, kind: str, layout: str = "causal_lm") -> str:
  """The Hugging Face module name of one projection, e.g. ``model.layers.3.self_attn.q_proj``.

  ``kind``: one of q, k, v, o, gate, up, down (joint kinds are two modules). This is the name PEFT matches
  rank_pattern keys against; the tensors are ``base_model.model.<name>.lora_{A,B}.weight``."""
  if layout not in HF_LAYOUTS:
    raise AdapterError(f"unknown layout {layout!r}; choose one of {', '.join(HF_LAYOUTS)}")
  group, proj = HF_PROJECTIONS[kind]
  return f"{HF_LAYOUTS[layout]}.{layer}.{group}.{proj}"


def _target_modules(kinds: Sequence[str], layout: str) -> list[str] | str:
  """adapter_config.json's target_modules: the projection names, or for the multimodal class a regex.

  Gemma3ForConditionalGeneration's SigLIP tower also has ``q_proj``/``k_proj``/``v_proj`` modules, which a
  list would make PEFT wrap too (with zero B, so harmless, but with missing-key warnings). The regex,
  matched by PEFT with ``re.fullmatch`` against full module names, keeps PEFT on the language model; its
  last group lists the projections, the form vLLM's ``is_regex_target_modules`` reads.
  """
  projs = [HF_PROJECTIONS[k][1] for k in kinds]
  if layout == "causal_lm":
    return projs
  return rf".*language_model.*\.({'|'.join(projs)})"


def _lora_alpha_json(alpha: float) -> int | float:
  """PEFT types lora_alpha as int: write an integral value as one."""
  return int(alpha) if float(alpha).is_integer() else float(alpha)


def _check_out_dir(out_dir: Path, force: bool, inputs: Sequence[Path] = (), *, dry_run: bool = False) -> None:
  """Raises unless ``out_dir`` may be written: absent, or (with ``force``) a directory to replace; and never
  one of ``inputs``, a directory holding one, or one inside one (``_check_not_input``, also for a dry run).
  Every writer of an output directory calls this before any work."""
  for in_dir in inputs:
    _check_not_input(out_dir, Path(in_dir))
  if dry_run or not out_dir.exists():
    return
  if not force:
    raise AdapterError(f"{out_dir}: already exists (use --force / force=True to replace it)")
  if not out_dir.is_dir():
    raise AdapterError(f"{out_dir}: exists and is not a directory")


@contextlib.contextmanager
def _atomic_dir(out_dir: Path):
  """Yields a fresh scratch directory next to ``out_dir``; renamed to ``out_dir`` when the block ends,
  removed if it raises, so ``out_dir`` either appears complete or not at all (``_replace_dir``). Dead
  writers' scratch directories of the same ``out_dir`` are removed first (``_remove_stale_scratch``)."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_scratch(out_dir)
  tmp = _scratch_dir(out_dir, "partial")
  try:
    yield tmp
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _checked_pairs(lora_params: Mapping, lora_config, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{canonical module path: (a, b) as numpy} in lora_shapes order, after checking the tree against the
  config's modules and the model's projection shapes (ranks are free, as in ``lora.LoRA``)."""
  from lora_squeeze import lora  # pylint: disable=g-import-not-at-top

  try:
    expected = lora.lora_shapes(cfg, dataclasses.replace(lora_config, rank=1))  # ranks come from the params
  except ValueError as e:
    raise AdapterError(f"LoRA config: {e}") from None
  pairs = squeeze.lora_pairs(lora_params)
  if not pairs:
    raise AdapterError("LoRA params: no {'a', 'b'} pairs found")
  found: dict[str, tuple[str, Mapping]] = {}
  for path, pair in pairs.items():
    try:
      layer, kind = lora.module_kind(path)
    except ValueError as e:
      raise AdapterError(f"LoRA params: {e}") from None
    canon = lora.module_path(layer, kind)
    if canon in found:
      raise AdapterError(f"LoRA params: module {canon} appears twice ({found[canon][0]!r} and {path!r})")
    found[canon] = (path, pair)
  missing, extra = [p for p in expected if p not in found], sorted(set(found) - set(expected))
  if missing or extra:
    raise AdapterError(
        f"LoRA params do not match {lora_config} on a {cfg.num_layers}-layer model: missing "
        f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
        f"{' ...' if len(extra) > 3 else ''} (joint_kv / joint_gate_up / targets / model config?)"
    )
  out = {}
  for canon, (a_shape, b_shape) in expected.items():
    path, pair = found[canon]
    a, b = np.asarray(pair["a"]), np.asarray(pair["b"])
    if (
        a.ndim != len(a_shape)
        or b.ndim != len(b_shape)
        or a.shape[:-1] != a_shape[:-1]
        or b.shape[1:] != b_shape[1:]
        or a.shape[-1] != b.shape[0]
        or a.shape[-1] < 1
    ):
      raise AdapterError(
          f"LoRA params at {path}: a{list(a.shape)}, b{list(b.shape)} do not fit this model "
          f"config (expected a{list(a_shape[:-1]) + ['r']}, b{['r'] + list(b_shape[1:])})"
      )
    for name, x in (("a", a), ("b", b)):
      finite = np.isfinite(x.astype(np.float32))
      if not finite.all():
        raise AdapterError(
            f"LoRA params at {path}/{name} {list(x.shape)}: {finite.size - int(finite.sum())} " "NaN/Inf values"
        )
    out[canon] = (a, b)
  return out


def _to_hf(kind: str, a: np.ndarray, b: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """[(projection kind, A (r, in), B (out, r))] of one of our pairs: one entry, two for a joint pair.

  Why plain reshapes are right: gemma's einsum weights keep heads as (N, H) axes and Hugging Face's
  checkpoint conversion (transformers' convert_gemma3_weights_orbax_to_hf.py: q_einsum (N, d, H) ->
  ``transpose(0, 2, 1).reshape(N*H, d)``, attn_vec_einsum (N, H, d) -> ``transpose(2, 0, 1).reshape(d,
  N*H)``, kv_einsum[0/1] like q, gating_einsum[0/1] = gate/up, linear -> ``.T``) flattens them row-major,
  feature n*H + h, exactly what ``reshape`` does to our a (N, H, r) and b (r, N, H). No rope permutation:
  both implementations rotate split halves of each head.
  """
  r = a.shape[-1]
  a_t = a.reshape(-1, r).T
  if kind in _JOINT:  # b (r, 2, ...): both halves share A (one input subspace), each its own B
    return [(half, a_t, b[:, i].reshape(r, -1).T) for i, half in enumerate(_JOINT[kind])]
  return [(kind, a_t, b.reshape(r, -1).T)]


def export_peft(
    lora_params: Mapping,
    out_dir: str | os.PathLike,
    *,
    lora_config,
    model_config,
    base_model_name_or_path: str | None = None,
    layout: str = "causal_lm",
    dtype: str = "float32",
    force: bool = False,
) -> dict:
  """Writes a Gemma 3 LoRA (our tree) as a PEFT adapter directory that PEFT and vLLM load on the HF model.

  Args:
    lora_params: the LoRA tree (``init_lora`` / ``split_params(params)[1]`` layout, an optional ``params/``
      prefix allowed). Ranks are read from its shapes, as ``lora.LoRA`` does.
    out_dir: the adapter directory; must not exist unless ``force``. Written atomically.
    lora_config: the ``lora.LoRAConfig`` it was trained with (modules, joint flags, alpha).
    model_config: the gemma TransformerConfig (or a transformer module): checks every shape.
    base_model_name_or_path: written to the config, e.g. ``HF_BASE_MODELS["gemma3_1b"][0]``.
    layout: "causal_lm" (Gemma3ForCausalLM: 270M, 1B) or "conditional_generation"
      (Gemma3ForConditionalGeneration: 4B, 12B, 27B, ``model.language_model.layers``).
    dtype: of the written factors: "float32" (exact), "bfloat16" or "float16".
    force: replace an existing ``out_dir``.

  Returns:
    The adapter_config.json written.

  Raises:
    AdapterError: params that do not fit the config/model (names the module and shapes), NaN/Inf, bad
      arguments; ``out_dir`` is then left absent (or untouched).
  """
  from lora_squeeze import lora  # pylint: disable=g-import-not-at-top

  if layout not in HF_LAYOUTS:
    raise AdapterError(f"unknown layout {layout!r}; choose one of {', '.join(HF_LAYOUTS)}")
  if dtype not in _OUT_CODES:
    raise AdapterError(f"unknown dtype {dtype!r}; choose one of {', '.join(_OUT_CODES)}")
  cfg = lora.text_config(model_config)
  out_dir = Path(out_dir)
  _check_out_dir(out_dir, force)
  pairs = _checked_pairs(lora_params, lora_config, cfg)

  modules = []  # (HF name, A, B, our scale): layer order, then q, k, v, o, gate, up, down
  for path, (a, b) in pairs.items():
    layer, kind = lora.module_kind(path)
    scale = lora_config.scale(int(a.shape[-1]))
    for half, a_hf, b_hf in _to_hf(kind, a, b):
      modules.append((hf_module_name(layer, half, layout), a_hf, b_hf, scale))
  ranks = {name: int(a_hf.shape[0]) for name, a_hf, _, _ in modules}

  base = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "r": 8,
      "lora_alpha": 8,
      "lora_dropout": 0.0,
      "target_modules": _target_modules(lora_config.targets, layout),
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "modules_to_save": None,
      "use_rslora": False,
      "use_dora": False,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  if lora_config.alpha is not None and len(set(ranks.values())) == 1:
    # One scale alpha/r for every module: PEFT's own formula, factors written as they are.
    r = next(iter(ranks.values()))
    config = {**base, "r": r, "lora_alpha": _lora_alpha_json(lora_config.alpha)}
    fold = {name: 1.0 for name in ranks}
  else:
    # Scale 1 everywhere (lora_alpha = r, alpha_pattern = rank_pattern); alpha/r_m of mixed ranks folded.
    config = output_config(LoraConfig.from_dict(base), ranks)
    fold = {name: scale for name, _, _, scale in modules}
  check = LoraConfig.from_dict(config)
  for name, _, _, scale in modules:
    got = check.scale(name) * fold[name]
    if not math.isclose(got, scale, rel_tol=1e-12):
      raise RuntimeError(f"export_peft: module '{name}' would get scale {got}, want {scale}")

  code = _OUT_CODES[dtype]
  tensors = {}
  for name, a_hf, b_hf, _ in modules:
    half = np.float32(math.sqrt(fold[name]))
    for key, x in ((f"{PEFT_PREFIX}{name}.lora_A.weight", a_hf), (f"{PEFT_PREFIX}{name}.lora_B.weight", b_hf)):
      x = x.astype(np.float32) if half == 1 else x.astype(np.float32) * half
      tensors[key] = np.ascontiguousarray(_cast(x, code, name))
  with _atomic_dir(out_dir) as tmp:
    save_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
  return config


def import_peft(
    in_dir: str | os.PathLike,
    *,
    model_config,
    joint_kv: bool = False,
    joint_gate_up: bool = False,
    keep_alpha: bool = True,
) -> tuple[dict, Any]:
  """Reads a PEFT Gemma 3 LoRA adapter directory into our tree and its ``lora.LoRAConfig``.

  Args:
    in_dir: the adapter directory (adapter_config.json + adapter_model.safetensors), any of the layouts in
      the module docstring (detected per module).
    model_config: the gemma TransformerConfig (or transformer) the adapter must fit.
    joint_kv, joint_gate_up: build ``kv_lora`` / ``gate_up_lora`` from the two PEFT modules (see the module
      docstring: rank r when they share lora_A, else rank r_k + r_v with a block-diagonal b).
    keep_alpha: when one lora_alpha (no rsLoRA) describes every module, return it as the config's alpha and
      keep the factors as written; otherwise, or with False, fold each module's scale into its factors.

  Returns:
    (lora params as nested dicts of float32 jax arrays, LoRAConfig): ``rank`` is an int, or a
    {module path: rank} mapping when ranks differ; ``targets`` the projections present.

  Raises:
    AdapterError: a file that is not a Gemma 3 text LoRA for this model config (names the module and shape),
      missing halves, NaN/Inf, tensors we cannot represent (modules_to_save, DoRA, LoRA biases).
  """
  from lora_squeeze import lora  # pylint: disable=g-import-not-at-top

  cfg = lora.text_config(model_config)
  dims = _hf_dims(cfg)
  with PeftAdapter(in_dir) as adapter:
    where = adapter.reader.path
    if adapter.config.raw.get("use_dora"):
      raise AdapterError(f"{adapter.directory / CONFIG_NAME}: use_dora is set; DoRA adapters cannot be imported")
    if adapter.passthrough:
      raise AdapterError(
          f"{where}: tensor '{adapter.passthrough[0]}' is not a lora_A/lora_B factor (modules_to_"
          f"save, LoRA biases and DoRA magnitudes cannot be imported; {len(adapter.passthrough)} "
          "such tensors)"
      )
    found: dict[tuple[int, str], LoraModule] = {}
    for m in adapter.modules:
      match = _HF_MODULE.match(m.name)
      group_kind = _KIND_OF_PROJ.get(match["proj"]) if match else None
      if group_kind is None or group_kind[0] != match["group"] or ".lora_embedding_" in m.key_a:
        raise AdapterError(
            f"{where.name}: module '{m.name}' is not a Gemma 3 text projection (expected "
            f"'{HF_LAYOUTS['causal_lm']}.N.self_attn.{{q,k,v,o}}_proj' or '...mlp.{{gate,up,"
            f"down}}_proj', also under {HF_LAYOUTS['conditional_generation']} or "
            "language_model.model.layers)"
        )
      layer, kind = int(match["layer"]), group_kind[1]
      if layer >= cfg.num_layers:
        raise AdapterError(
            f"{where.name}: module '{m.name}': layer {layer} is out of range for a " f"{cfg.num_layers}-layer model"
        )
      if (layer, kind) in found:
        raise AdapterError(
            f"{where.name}: module '{m.name}' has two adapters ('{found[layer, kind].key_a}' " f"and '{m.key_a}')"
        )
      n_in, n_out = dims[kind]
      if m.shape_a != (m.r, n_in) or m.shape_b != (n_out, m.r):
        raise AdapterError(
            f"{where.name}: module '{m.name}': A {list(m.shape_a)}, B {list(m.shape_b)} do not fit "
            f"this model config (expected A [r, {n_in}], B [{n_out}, r])"
        )
      found[layer, kind] = m

    targets = tuple(k for k in lora.TARGETS if any(key[1] == k for key in found))
    for layer in range(cfg.num_layers):
      have = tuple(k for k in targets if (layer, k) in found)
      if have != targets:
        raise AdapterError(
            f"{where.name}: layer {layer} adapts {list(have)} but other layers {list(targets)}; "
            "our LoRA adapts the same projections in every layer"
        )
    for flag, (x, y) in (("joint_kv", _JOINT["kv"]), ("joint_gate_up", _JOINT["gate_up"])):
      if {"joint_kv": joint_kv, "joint_gate_up": joint_gate_up}[flag] and (x in targets) != (y in targets):
        raise AdapterError(
            f"{where.name}: {flag} needs both {x}_proj and {y}_proj adapted; the adapter has "
            f"{[HF_PROJECTIONS[k][1] for k in targets]}"
        )

    alphas = {adapter.config.alpha(m.name) for m in found.values()}
    if all(m.scale == 1.0 for m in found.values()):
      alpha = None
    elif (
        keep_alpha
        and not adapter.config.use_rslora
        and len(alphas) == 1
        and isinstance(next(iter(alphas)), (int, float))
        and next(iter(alphas)) > 0
    ):
      alpha = float(next(iter(alphas)))
    else:
      alpha = None
    our_config = lora.LoRAConfig(rank=1, alpha=alpha, targets=targets, joint_kv=joint_kv, joint_gate_up=joint_gate_up)

    def factors(m: LoraModule, our_rank: int) -> tuple[np.ndarray, np.ndarray]:
      # a (in, r), b (r, out) with PEFT's scale over ours folded, split evenly (1: the factors as stored).
      return adapter.factors(dataclasses.replace(m, scale=m.scale / our_config.scale(our_rank)))

    flat: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    for path, (a_shape, b_shape) in lora.lora_shapes(cfg, our_config).items():  # rank 1: just the dims
      layer, kind = lora.module_kind(path)
      in_dims, out_dims = a_shape[:-1], b_shape[1:]
      if kind in _JOINT:
        m1, m2 = (found[layer, k] for k in _JOINT[kind])
        shared = (
            m1.r == m2.r
            and m1.scale == m2.scale
            and m1.dtype_a == m2.dtype_a
            and np.array_equal(adapter.reader.read(m1.key_a), adapter.reader.read(m2.key_a))
        )
        if shared:  # one input subspace: rank r, exactly the pair it was exported from
          r = m1.r
          a, b1 = factors(m1, r)
          _, b2 = factors(m2, r)
          b = np.stack([b1.reshape(r, *out_dims[1:]), b2.reshape(r, *out_dims[1:])], axis=1)
        else:  # a = [a_1 | a_2], b block-diagonal: rank r_1 + r_2, ΔW of each half exact
          r = m1.r + m2.r
          a1, b1 = factors(m1, r)
          a2, b2 = factors(m2, r)
          a = np.concatenate([a1, a2], axis=1)
          b = np.zeros((r, *out_dims), np.float32)
          b[: m1.r, 0] = b1.reshape(m1.r, *out_dims[1:])
          b[m1.r :, 1] = b2.reshape(m2.r, *out_dims[1:])
      else:
        m = found[layer, kind]
        r = m.r
        a, b = factors(m, r)
      flat[path] = (a.reshape(*in_dims, r), b.reshape(r, *out_dims))
      ranks[path] = r

  rank = next(iter(ranks.values())) if len(set(ranks.values())) == 1 else dict(ranks)
  params: dict = {}
  for path, (a, b) in flat.items():
    node = params
    for k in path.split("/"):
      node = node.setdefault(k, {})
    node["a"], node["b"] = jax.numpy.asarray(a), jax.numpy.asarray(b)
  return params, dataclasses.replace(our_config, rank=rank)


# --------------------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="lora-squeeze",
      description="Change the rank of LoRA adapters with SVD (LoRA-Squeeze, arXiv "
      "2602.10993): Hugging Face PEFT adapter directories, single .safetensors files in kohya sd-scripts / "
      "LyCORIS (lora_down/lora_up/alpha) or diffusers / ComfyUI (lora_A/lora_B[/alpha]) form, detected from "
      "the keys, and GGUF LoRAs of llama.cpp / ollama (detected by the GGUF magic), each written back in the "
      "same form. No torch needed.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser(
      "squeeze",
      help="write a copy of an adapter at a new rank",
      description="Write IN's adapter at a new rank to OUT (a PEFT directory to a directory, a "
      ".safetensors file to a file). Each module's effective ΔW = scale·B@A is replaced by its "
      "best rank-r approximation; the output has scale 1 (alpha = r), the old scale folded "
      "evenly into both factors. Tensors that are not a low-rank product (LoHa, LoKr, full "
      "diffs, DoRA magnitudes) are copied unchanged.",
  )
  s.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory, a LoRA .safetensors file or a GGUF LoRA")
  s.add_argument("out_dir", metavar="OUT", help="the output directory (PEFT), .safetensors or .gguf file")
  target = s.add_mutually_exclusive_group(required=True)
  target.add_argument(
      "--rank",
      type=int,
      help="the new rank of every module, capped at each module's full "
      "rank min(out, in) (where ΔW is exact; a note on stderr says so). A rank above the "
      "input's r is allowed: ΔW stays exact, the new directions are random A rows with zero "
      "B columns",
  )
  target.add_argument(
      "--energy",
      type=float,
      help="keep this fraction of each module's energy (retention "
      "V_r = Σ_{i≤r} s_i² / Σ s_i² >= E): one rank for all, the largest needed (or per "
      "module with --per-module)",
  )
  target.add_argument(
      "--sv-ratio",
      type=float,
      metavar="R",
      help="kohya's sv_ratio, per module: keep the " "singular values s_i > s_max / R (R >= 1; at least 1)",
  )
  target.add_argument(
      "--sv-fro",
      type=float,
      metavar="F",
      help="kohya's sv_fro, per module: the smallest r "
      "with sqrt(Σ_{i≤r} s_i² / Σ s_i²) >= F (0 < F <= 1; same as --energy F² --per-module)",
  )
  target.add_argument(
      "--sv-cumulative",
      type=float,
      metavar="C",
      help="kohya's sv_cumulative, per module: " "the smallest r with Σ_{i≤r} s_i / Σ s_i >= C (0 < C <= 1)",
  )
  s.add_argument("--max-rank", type=int, metavar="N", help="with --energy or --sv-*: no module above rank N")
  s.add_argument(
      "--per-module",
      action="store_true",
      help="with --energy: each module its own rank (written as rank_pattern/alpha_pattern)",
  )
  s.add_argument(
      "--method",
      choices=METHODS,
      default="efficient",
      help="efficient: never forms ΔW (default); rsvd: randomized SVD of ΔW; svd: full SVD of ΔW",
  )
  s.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype of the new factors (default: as input)")
  s.add_argument("--dry-run", action="store_true", help="print the plan (ranks, retention, size); write nothing")
  s.add_argument(
      "--force",
      action="store_true",
      help="replace OUT if it exists (never IN itself, nor a "
      "directory that is, contains or lies inside IN: refused)",
  )
  s.add_argument("--seed", type=int, default=0, help="PRNG seed (rsvd sketches, init of energy-free directions)")
  s.add_argument("--no-progress", action="store_true", help="no progress bar")
  # GGUF LoRAs (llama.cpp / ollama): gguf_lora.py.
  c = sub.add_parser(
      "convert",
      help="PEFT adapter directory <-> GGUF LoRA file (llama.cpp --lora, ollama " "ADAPTER)",
      description="Convert a PEFT adapter directory to a GGUF LoRA file (OUT ends in "
      ".gguf; as llama.cpp's convert_lora_to_gguf.py writes it, without torch or the base model) "
      "or a GGUF LoRA file to a PEFT adapter directory (any other OUT).",
  )
  c.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory or a GGUF LoRA file")
  c.add_argument("out_dir", metavar="OUT", help="OUT.gguf, or the PEFT adapter directory to write")
  c.add_argument(
      "--arch",
      help="PEFT -> GGUF: llama.cpp's architecture name (gemma3, llama, ...; default: "
      "from base_model_name_or_path in adapter_config.json)",
  )
  c.add_argument(
      "--layout",
      default="causal_lm",
      choices=tuple(HF_LAYOUTS),
      help="GGUF -> PEFT: module "
      "names of Gemma3ForCausalLM / Llama-style models (causal_lm: model.layers) or of "
      "Gemma3ForConditionalGeneration (model.language_model.layers)",
  )
  c.add_argument(
      "--dtype",
      choices=DTYPES,
      help="dtype of the written factors (default: float32 for GGUF, as " "llama.cpp's converter; keep for PEFT)",
  )
  c.add_argument("--force", action="store_true", help="replace OUT if it exists (never IN)")
  i = sub.add_parser("inspect", help="print each module's spectrum and retention at r/2, r/4, r/8")
  i.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory, a LoRA .safetensors file or a GGUF LoRA")
  i.add_argument(
      "--plot",
      metavar="PATH.png",
      help="also write retention curves to this file; its extension "
      "picks the format (.png, .pdf, .svg, ... : matplotlib's formats), checked before any work",
  )
  i.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The ``lora-squeeze`` command; returns the exit status (2 for user errors, message on stderr).

  Being the command, it also turns on the on-disk compile cache (``runtime.enable_compile_cache``) and
  drops native libraries' harmless log lines (``runtime.quiet_native_logs``); library users call
  ``squeeze_adapter`` / ``inspect_adapter``.
  """
  args = _parser().parse_args(argv)
  runtime.quiet_native_logs()
  try:
    if args.command == "inspect" and args.plot:
      check_plot_path(args.plot)  # before the cache directory and the spectra: a typo costs nothing
    runtime.enable_compile_cache()
    if args.command == "squeeze":
      dynamic = next(((name, getattr(args, name)) for name in DYNAMIC_RULES if getattr(args, name) is not None), None)
      report = squeeze_adapter(
          args.in_dir,
          args.out_dir,
          rank=args.rank,
          energy=args.energy,
          per_module=args.per_module,
          method=args.method,
          dtype=args.dtype,
          dry_run=args.dry_run,
          force=args.force,
          seed=args.seed,
          progress=not args.no_progress,
          dynamic=dynamic,
          max_rank=args.max_rank,
      )
      if report.note:
        print(f"lora-squeeze: note: {report.note}", file=sys.stderr)
      if args.dry_run:
        print(report.table())
        print()
      print(report.summary())
    elif args.command == "convert":
      from lora_squeeze import gguf_lora  # pylint: disable=g-import-not-at-top

      print(
          gguf_lora.convert(
              args.in_dir, args.out_dir, arch=args.arch, layout=args.layout, dtype=args.dtype, force=args.force
          ).summary()
      )
    else:
      report = inspect_adapter(args.in_dir, progress=not args.no_progress)
      print(report.table())
      print()
      print(report.summary())
      if args.plot:
        try:
          report.plot(args.plot)
        except OSError as e:
          raise AdapterError(f"{args.plot}: cannot write the plot ({e.strerror})") from None
        print(f"wrote {args.plot}")
  except AdapterError as e:
    print(f"lora-squeeze: error: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:  # `lora-squeeze inspect DIR | head`: stop quietly, like other command-line tools
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
    return 141
  except OSError as e:  # e.g. a full disk: not the user's input, but still one line, not a traceback
    print(f"lora-squeeze: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("lora-squeeze: interrupted (nothing written)", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  # `python -m lora_squeeze.adapters`: run the main of the imported module, not of this __main__ copy, so
  # that AdapterError raised by lora_files / gguf_lora (which import lora_squeeze.adapters) is caught.
  from lora_squeeze import adapters as _adapters  # pylint: disable=g-import-not-at-top

  sys.exit(_adapters.main())
