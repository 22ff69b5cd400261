"""GGUF LoRA adapters (llama.cpp ``--lora``, ollama ``ADAPTER``): the file format and its squeeze.

    lora-squeeze squeeze IN.gguf OUT.gguf --rank R | --energy E [--per-module] | --sv-* ... [--dry-run]

``GgufLora`` reads a file, ``write_gguf`` writes one, ``squeeze_gguf`` is the squeeze; conversion to and
from PEFT directories (``lora-squeeze convert``) is ``gguf_convert.py``.

The format, as llama.cpp's ``convert_lora_to_gguf.py`` writes it and llama.cpp's adapter loader reads it
(``tests/fixtures/gguf/`` holds files made by that converter, ``tests/fixtures/make_gguf_fixtures.py`` the
script that made them):

* Metadata: ``general.architecture`` (a llama.cpp architecture name such as ``gemma3``; the loader refuses
  an adapter whose architecture is not the base model's), ``general.type = adapter``, ``adapter.type =
  lora``, ``adapter.lora.alpha`` (float32; the converter writes the PEFT config's ``lora_alpha``), plus
  whatever else the producer wrote (general.name, ...), all kept by a squeeze.
* Tensors: per adapted weight ``W`` of the base model (llama.cpp name, e.g. ``blk.3.attn_q.weight``, one
  that gguf's name map ``gguf.MODEL_TENSORS`` lists for the architecture), ``<W>.lora_a`` and
  ``<W>.lora_b``. In numpy order (the reverse of GGUF's ``ne``) lora_a is PEFT's A (r, in) and lora_b is
  PEFT's B (out, r), unchanged: the converter transposes nothing for Gemma 3 or Llama-style models (only
  the token-embedding LoRA, which this tool refuses). Tensors ending in ``_norm.weight`` (mergekit adds
  them; llama.cpp ignores them) are copied unchanged.
* Scale: llama.cpp applies ΔW = (alpha / r_m) · B @ A with r_m the module's own rank (lora_b's), and
  ΔW = B @ A when alpha is 0 or absent. Per-module ranks are therefore valid (the loader checks only that
  each pair's shapes fit the base weight), with one alpha for the whole file.

The squeeze writes ONE alpha for the file, the largest new rank R (``file_alpha``), and folds every
module's scale into its factors: a module of new rank r_m holds B' = √(r_m / R) · U_r Σ_r^½ and
A' = √(r_m / R) · Σ_r^½ V_rᵀ, so llama.cpp's (R / r_m) · B' @ A' is the best rank-r_m approximation of
the input's (alpha / r) · B @ A. With one rank for all modules (``--rank``) that is alpha = r and scale 1,
the rule of the PEFT path.

Quantised factors (the converter's ``--outtype q8_0``) are read dequantised and written as float32.
Everything is written beside OUT and renamed into place: OUT appears whole or not at all.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import os
import re
import time
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

from lora_squeeze import adapters
from lora_squeeze.adapters import AdapterError

# The PEFT path's building blocks, shared so every format plans, casts and writes identically.
from lora_squeeze.adapters import atomic_file, cast_factor, check_out_file  # pylint: disable=g-importing-member

MAGIC = b"GGUF"
SUFFIX = ".gguf"
ALPHA_KEY = gguf.Keys.Adapter.LORA_ALPHA  # "adapter.lora.alpha"
TYPE_KEY = gguf.Keys.General.TYPE  # "general.type"
ADAPTER_TYPE_KEY = gguf.Keys.Adapter.TYPE  # "adapter.type"
ARCH_KEY = gguf.Keys.General.ARCHITECTURE  # "general.architecture"
ARCH_NAMES = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "gemma3" -> MODEL_ARCH.GEMMA3
LAYOUTS = tuple(adapters.HF_LAYOUTS)

_T = gguf.GGMLQuantizationType
# GGML types kept as they are on a squeeze (--dtype keep); every other type is read dequantised, written F32.
_KEPT = {_T.F32: "F32", _T.F16: "F16", _T.BF16: "BF16"}
GGML_OF = {"F32": _T.F32, "F16": _T.F16, "BF16": _T.BF16}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a file that starts with the GGUF magic (the format is told by content)."""
  try:
    with open(path, "rb") as f:
      return f.read(4) == MAGIC
  except OSError:
    return False


def _nearest(word: str, options) -> str:
  close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
  return f" (nearest: {close[0]})" if close else ""


def check_arch(arch: str, where: str) -> gguf.MODEL_ARCH:
  """The gguf MODEL_ARCH of a llama.cpp architecture name; AdapterError naming the nearest known one."""
  if arch not in ARCH_NAMES:
    raise AdapterError(f"{where}: architecture {arch!r} is not in gguf's name map{_nearest(arch, ARCH_NAMES)}")
  return ARCH_NAMES[arch]


# --------------------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GgufModule(adapters.LoraModule):
  """One lora_a/lora_b pair: ``name`` is the base weight without ``.weight`` (``blk.3.attn_q``).

  shape_a (r, in) and shape_b (out, r) are numpy order; dtype_a / dtype_b are the codes the factors are
  written back as ("F32" for quantised ones); ``ggml_a`` / ``ggml_b`` their GGML type names in the file.
  """

  ggml_a: str = "F32"
  ggml_b: str = "F32"

  @property
  def weight(self) -> str:
    return f"{self.name}.weight"

  @property
  def layer(self) -> int | None:
    match = _BLOCK.match(self.name)
    return int(match[1]) if match else None


class _Tensors:
  """Reads one tensor at a time from a GGUFReader, in numpy order: the ``reader`` of ``factors``."""

  def __init__(self, path: Path, reader: gguf.GGUFReader):
    self.path = path
    self.by_name = {t.name: t for t in reader.tensors}

  def read(self, name: str) -> np.ndarray:
    t = self.by_name[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type in (_T.F32, _T.F16):
      return np.array(t.data).reshape(shape)
    if t.tensor_type == _T.BF16:
      return np.array(t.data).view(ml_dtypes.bfloat16).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def _fields(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderField]:
  """The file's metadata fields, without the reader's own GGUF.version / tensor_count / kv_count."""
  return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _value(field: gguf.ReaderField):
  return field.contents()


class GgufLora:
  """A GGUF LoRA adapter opened for reading: metadata, modules and tensor index now, factors on demand.

  Attributes:
    path: the file.
    arch: ``general.architecture``.
    alpha: ``adapter.lora.alpha`` (0.0 when absent: llama.cpp then applies scale 1).
    modules: the GgufModules, in file order (of their lora_a).
    passthrough: names of the ``*_norm.weight`` tensors (copied unchanged).
    fields: the metadata fields (gguf.ReaderField), in file order.
    reader: the tensor reader of ``factors``.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.exists():
      raise AdapterError(f"{self.path}: no such file or directory")
    if not self.path.is_file():
      raise AdapterError(f"{self.path}: not a regular file")
    if not is_gguf(self.path):
      raise AdapterError(f"{self.path}: not a GGUF file (no GGUF magic)")
    self.file_size = self.path.stat().st_size
    self.data_offset = 0
    try:
      self._gguf = gguf.GGUFReader(self.path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a cut or corrupt file
      raise AdapterError(
          f"{self.path}: not a valid GGUF file, truncated or corrupt ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else 'no detail'})"
      ) from None
    try:
      self._index()
    except AdapterError as e:
      msg = str(e)
      raise AdapterError(msg if msg.startswith(str(self.path)) else f"{self.path}: {msg}") from None
    self.reader = _Tensors(self.path, self._gguf)

  def _index(self) -> None:
    for t in self._gguf.tensors:
      if t.data_offset + t.n_bytes > self.file_size:
        raise AdapterError(
            f"truncated: tensor '{t.name}' ends at byte {t.data_offset + t.n_bytes}, the file " f"has {self.file_size}"
        )
    self.fields = _fields(self._gguf)
    self.data_offset = self._gguf.data_offset

    def text(key: str) -> str | None:
      field = self.fields.get(key)
      if field is None:
        return None
      if field.types != [gguf.GGUFValueType.STRING]:
        raise AdapterError(f"metadata '{key}' is not a string")
      return _value(field)

    kind = text(TYPE_KEY)
    if kind != "adapter":
      if kind == "model" or not any(t.name.endswith((".lora_a", ".lora_b")) for t in self._gguf.tensors):
        raise AdapterError(
            f"a base model GGUF ({TYPE_KEY} = {kind!r}, {len(self._gguf.tensors)} tensors, none "
            "a .lora_a/.lora_b), not a LoRA adapter; llama.cpp takes it as the model (-m) and "
            "the adapter with --lora"
        )
      raise AdapterError(f"metadata '{TYPE_KEY}' is {kind!r}; a GGUF LoRA adapter has '{TYPE_KEY}' = 'adapter'")
    adapter_type = text(ADAPTER_TYPE_KEY)
    if adapter_type != "lora":
      raise AdapterError(
          f"metadata '{ADAPTER_TYPE_KEY}' is {adapter_type!r}; this tool reads LoRA adapters "
          f"('{ADAPTER_TYPE_KEY}' = 'lora') only"
      )
    arch = text(ARCH_KEY)
    if arch is None:
      raise AdapterError(f"no '{ARCH_KEY}' metadata")
    self.arch = arch
    arch_enum = check_arch(arch, f"metadata '{ARCH_KEY}'")
    alpha_field = self.fields.get(ALPHA_KEY)
    self.alpha = 0.0
    if alpha_field is not None:
      value = _value(alpha_field)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterError(f"metadata '{ALPHA_KEY}' is {value!r}, not a number")
      self.alpha = float(value)
      if not math.isfinite(self.alpha):
        raise AdapterError(f"metadata '{ALPHA_KEY}' is {self.alpha}")

    known = _arch_weights(arch_enum)
    sides: dict[str, dict[str, gguf.ReaderTensor]] = collections.defaultdict(dict)
    self.passthrough: list[str] = []
    for t in self._gguf.tensors:
      base, dot, side = t.name.rpartition(".")
      if dot and side in ("lora_a", "lora_b"):
        sides[base][side] = t
      elif t.name.endswith("_norm.weight"):
        self.passthrough.append(t.name)
      else:
        raise AdapterError(
            f"tensor '{t.name}': not a .lora_a/.lora_b factor nor a *_norm.weight (llama.cpp "
            "refuses such a tensor too)"
        )
    self.modules: list[GgufModule] = []
    for base, pair in sides.items():
      if len(pair) != 2:
        have = next(iter(pair))
        miss = "lora_b" if have == "lora_a" else "lora_a"
        raise AdapterError(f"tensor '{base}.{have}' has no '{base}.{miss}'")
      if base.startswith("token_embd."):
        raise AdapterError(f"tensor '{base}.lora_a': a token-embedding LoRA, which this tool does not handle")
      stem = base[: -len(".weight")] if base.endswith(".weight") else None
      if stem is None or _BLOCK.sub("blk.{bid}.", base) not in known:
        raise AdapterError(
            f"tensor '{base}.lora_a': '{base}' is not a {arch} weight in gguf's name map"
            f"{_nearest(_BLOCK.sub('blk.{bid}.', base), known)}"
        )
      a, b = pair["lora_a"], pair["lora_b"]
      shape_a = tuple(int(d) for d in reversed(a.shape.tolist()))
      shape_b = tuple(int(d) for d in reversed(b.shape.tolist()))
      if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1] or shape_a[0] == 0:
        raise AdapterError(
            f"module '{stem}': lora_a {list(shape_a)} and lora_b {list(shape_b)} do not pair "
            "(want lora_a (r, in) and lora_b (out, r) with the same r, in numpy order)"
        )
      for t in (a, b):
        readable = gguf.quants._type_traits  # pylint: disable=protected-access
        if t.tensor_type not in _KEPT and t.tensor_type not in readable:
          raise AdapterError(f"tensor '{t.name}' has GGML type {t.tensor_type.name}, which gguf cannot dequantise")
      r = shape_a[0]
      self.modules.append(
          GgufModule(
              name=stem,
              key_a=a.name,
              key_b=b.name,
              shape_a=shape_a,
              shape_b=shape_b,
              dtype_a=_KEPT.get(a.tensor_type, "F32"),
              dtype_b=_KEPT.get(b.tensor_type, "F32"),
              scale=self.alpha / r if self.alpha else 1.0,
              ggml_a=a.tensor_type.name,
              ggml_b=b.tensor_type.name,
          )
      )
    if not self.modules:
      raise AdapterError("no .lora_a/.lora_b tensor pairs")

  # a = √scale·Aᵀ (in, r), b = √scale·Bᵀ (r, out): the PEFT path's reading (lora_a is A, lora_b is B).
  factors = adapters.PeftAdapter.factors

  @property
  def quantized(self) -> list[str]:
    return sorted({t for m in self.modules for t in (m.ggml_a, m.ggml_b) if t not in ("F32", "F16", "BF16")})

  def passthrough_line(self) -> str | None:
    if not self.passthrough:
      return None
    return f"copied unchanged (not a low-rank pair): {len(self.passthrough)} tensors (norm weights)"

  def close(self) -> None:
    mm = getattr(self._gguf.data, "_mmap", None)
    self._gguf = None
    if mm is not None:
      try:
        mm.close()
      except BufferError:  # a view of it is still alive: the garbage collector closes it
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _arch_weights(arch: gguf.MODEL_ARCH) -> set[str]:
  """The llama.cpp weight names of an architecture, blocks as ``blk.{bid}.`` (``blk.{bid}.attn_q.weight``)."""
  return {gguf.TENSOR_NAMES[t] + ".weight" for t in gguf.MODEL_TENSORS[arch]}


# --------------------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------------------


def _np_dtype(code: str) -> np.dtype:
  return adapters.NP_DTYPES[code]


def _kv(writer: gguf.GGUFWriter, key: str, field: gguf.ReaderField) -> None:
  """Copies one metadata field with its own GGUF value type (arrays of scalars or strings)."""
  types = field.types
  if types[0] == gguf.GGUFValueType.ARRAY:
    if len(types) != 2:
      raise AdapterError(f"metadata '{key}': nested arrays are not supported")
    value = _value(field)
    if not value:
      return  # the writer cannot write an empty array; llama.cpp reads a missing key as empty
    writer.add_key_value(key, value, types[0], sub_type=types[1])
  else:
    writer.add_key_value(key, _value(field), types[0])


class _GgufOut:
  """Streams a GGUF file: metadata and every tensor's (name, code, numpy shape) declared up front."""

  def __init__(self, path: Path, arch: str, kv, entries):
    """``kv``: [(key, ReaderField or (value, GGUFValueType))], or a function adding them to the writer
    (called once the tensors are declared, so it may count parameters as llama.cpp's converter does)."""
    self.writer = gguf.GGUFWriter(None, arch)
    self._pending = []
    for name, code, shape in entries:
      dtype = _np_dtype(code)
      nbytes = math.prod(shape) * dtype.itemsize
      self.writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=GGML_OF[code])
      self._pending.append((name, dtype, tuple(shape)))
    self._pending.reverse()
    if callable(kv):
      kv(self.writer)
    else:
      for key, value in kv:
        if isinstance(value, gguf.ReaderField):
          _kv(self.writer, key, value)
        else:
          self.writer.add_key_value(key, *value)
    self.path = path
    self.writer.write_header_to_file(path)
    self.writer.write_kv_data_to_file()
    self.writer.write_ti_data_to_file()

  def write(self, name: str, data: np.ndarray) -> None:
    want, dtype, shape = self._pending.pop()
    if name != want or data.dtype != dtype or data.shape != shape:
      raise RuntimeError(f"_GgufOut: expected {want} {dtype}{list(shape)}, got {name} {data.dtype}{list(data.shape)}")
    self.writer.write_tensor_data(np.ascontiguousarray(data))

  def close(self) -> None:
    if self._pending:
      self.writer.close()
      raise RuntimeError(f"_GgufOut: {len(self._pending)} tensors never written")
    fout = self.writer.fout[0]
    fout.flush()
    os.fsync(fout.fileno())
    self.writer.close()

  def abort(self) -> None:
    self.writer.close()


def write_gguf(out_path: Path, arch: str, kv, entries, tensors) -> None:
  """Writes ``entries`` with data from the iterable ``tensors`` ((name, array) in order), atomically."""
  with atomic_file(out_path) as tmp:
    out = None
    try:
      out = _GgufOut(tmp, arch, kv, entries)
      for name, data in tensors:
        out.write(name, data)
      out.close()
    except BaseException:
      if out is not None:
        out.abort()
      raise


def _data_size(entries) -> int:
  return sum(
      gguf.GGUFWriter.ggml_pad(math.prod(s) * _np_dtype(c).itemsize, gguf.GGUF_DEFAULT_ALIGNMENT) for _, c, s in entries
  )


def file_alpha(ranks) -> float:
  """The one alpha this tool writes: the largest rank (scale 1 when every module has that rank)."""
  return float(max(ranks))


# --------------------------------------------------------------------------------------------------------
# Squeeze.
# --------------------------------------------------------------------------------------------------------


def squeeze_gguf(
    in_path: str | os.PathLike, out_path: str | os.PathLike, options: adapters.SqueezeOptions
) -> adapters.SqueezeReport:
  """``adapters.squeeze_adapter`` for a GGUF LoRA (same arguments; the module docstring gives the alpha rule).

  Raises:
    AdapterError: bad input or arguments; ``out_path`` is then left absent (or untouched).
  """
  start = time.perf_counter()
  in_path, out_path = Path(in_path), Path(out_path)
  check_out_file(in_path, out_path, options.force, options.dry_run, suffix=SUFFIX)
  with GgufLora(in_path) as lf:
    modules = lf.modules
    plan = adapters.plan_squeeze(lf, options)
    ranks = plan.ranks
    alpha = file_alpha(ranks.values())
    code = options.out_code

    entries = [e for m in modules for e in adapters.factor_entries(m, ranks[m.name], code)]
    entries += [
        (
            k,
            code("F32") if options.dtype != "keep" else _KEPT.get(lf.reader.by_name[k].tensor_type, "F32"),
            tuple(int(d) for d in reversed(lf.reader.by_name[k].shape.tolist())),
        )
        for k in lf.passthrough
    ]
    kv = [(k, f) for k, f in lf.fields.items() if k != ARCH_KEY]
    if ALPHA_KEY in lf.fields:
      kv = [(k, (alpha, gguf.GGUFValueType.FLOAT32) if k == ALPHA_KEY else f) for k, f in kv]
    else:
      kv.append((ALPHA_KEY, (alpha, gguf.GGUFValueType.FLOAT32)))
    mixed = len(set(ranks.values())) > 1
    quant = lf.quantized
    report = adapters.SqueezeReport(
        in_dir=in_path,
        out_dir=out_path,
        method=options.method,
        dry_run=options.dry_run,
        modules=[],
        passthrough=list(lf.passthrough),
        copied_files=[],
        config={},
        in_bytes=lf.file_size,
        out_bytes=lf.data_offset + _data_size(entries),
        note=plan.note,
        config_line=(
            f"format: gguf LoRA (llama.cpp, {ARCH_KEY} = {lf.arch}), {ALPHA_KEY} = {alpha:g}"
            + (
                ", the largest rank (llama.cpp scales a module of rank r_m by alpha / r_m: its factors "
                "carry r_m / alpha)"
                if mixed
                else ": scale alpha / r = 1 in every module"
            )
            + ", the old scale folded into the factors"
            + (f"; {'/'.join(quant)} factors written as F32" if quant and options.dtype == "keep" else "")
        ),
        weights_name=None,
        passthrough_line=lf.passthrough_line(),
    )

    if options.dry_run:
      report.modules = [plan.module_report(m) for m in modules]
      report.seconds = time.perf_counter() - start
      return report

    def tensors():
      def fold(m):  # llama.cpp multiplies by alpha / r_m
        return np.float32(math.sqrt(ranks[m.name] / alpha))

      for _, factors in adapters.squeezed_factors(lf, modules, plan, options, report, fold=fold):
        yield from factors
      for k in lf.passthrough:
        yield k, cast_factor(
            lf.reader.read(k).astype(np.float32),
            code("F32") if options.dtype != "keep" else _KEPT.get(lf.reader.by_name[k].tensor_type, "F32"),
            k,
        )

    write_gguf(out_path, lf.arch, kv, entries, tensors())
  report.out_bytes = out_path.stat().st_size
  report.seconds = time.perf_counter() - start
  return report
