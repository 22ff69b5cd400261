"""safetensors without torch: read and write one tensor at a time (numpy + ml_dtypes, so bfloat16 works).

All output shapes of a squeeze are known before the first module is squeezed, so ``SafetensorsWriter``
writes the header first and each tensor's bytes follow: peak memory is about one module's factors, whatever
the adapter's size. ``safetensors_size`` gives the exact size of such a file before it is written (the
dry run's report).

Why not the safetensors library's numpy API (``safe_open(framework="numpy")``, ``safetensors.numpy.save_file``),
measured by experiments/safetensors_io_memory.py (experiments/results/safetensors_io_memory.md; safetensors
0.8.0, a 401 MiB bf16 adapter read one tensor at a time): safe_open maps the file, so the pages it touched
stay in the process's RSS: peak RSS grew by 400 MiB (the whole file), this reader's by 1 MiB, and it was no
faster (0.09 s vs 0.05 s from the page cache). ``save_file`` needs every tensor in memory at once (+395 MiB;
the squeeze's output exists one module at a time) and orders the file by dtype and name, not as declared.
safe_open's ``keys()`` come sorted by name, not in file order (the order modules are squeezed and seeded in);
its numpy backend fails on F8_E4M3 / F8_E5M2 tensors (numpy has no float8; we pass them through); and on a
truncated or garbled file it says "incomplete metadata, file not fully covered" or "invalid header length",
where this reader says the file is truncated and by how much. A test checks that this reader and writer
agree with the library on every tensor's dtype, shape and bytes (tests/test_adapters.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lora_squeeze.adapters.errors import AdapterError

NP_DTYPES = {
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
DTYPE_CODES = {v: k for k, v in NP_DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
OUT_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
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

  Why not ``safetensors.safe_open``: see the module docstring (peak memory, file order, F8, error
  messages; bfloat16 in its numpy backend only in recent releases). Reading the documented format (8-byte
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
            code in NP_DTYPES
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
        )
      except (KeyError, TypeError, ValueError):
        ok = False
      if not ok:
        raise self._corrupt(f"bad header entry for tensor '{name}': {entry!r}")
      if math.prod(shape) * NP_DTYPES[code].itemsize != end - begin:
        raise self._corrupt(
            f"tensor '{name}' {code}{list(shape)} needs "
            f"{math.prod(shape) * NP_DTYPES[code].itemsize} bytes, header gives {end - begin}"
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
    return buf.view(NP_DTYPES[info.dtype]).reshape(info.shape)

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
    nbytes = math.prod(shape) * NP_DTYPES[code].itemsize
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
      if data.shape != shape or DTYPE_CODES.get(data.dtype) != code:
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
  entries = [(name, DTYPE_CODES[np.asarray(x).dtype], tuple(np.shape(x))) for name, x in tensors.items()]
  writer = SafetensorsWriter(path, entries, metadata)
  try:
    for name, x in tensors.items():
      writer.write(name, np.asarray(x))
  except BaseException:
    writer.abort()
    raise
  writer.close()


def cast_factor(x: np.ndarray, code: str, where: str) -> np.ndarray:
  y = x.astype(NP_DTYPES[code])
  if code in ("F16", "BF16") and not np.isfinite(y).all():
    raise AdapterError(f"module '{where}': new factors overflow {code}; use --dtype float32")
  return y
