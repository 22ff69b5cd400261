"""Files that no reader ever sees half-written: write a temporary sibling, then rename it over the target.

A rename within one directory is atomic on POSIX filesystems (local disks, NFS, GCS FUSE with rename
support), so a reader sees the old file or the new one, never a mix; a crash leaves at most a hidden
``.NAME.PID-XXXXXXXX.tmp`` sibling, never a truncated ``NAME``. Several processes may write the same file
at once (sweep cells, pytest workers filling a cache): each gets its own temporary name and the last rename
wins. Directories (adapter outputs, orbax saves) use ``temp_sibling`` and their own rename logic.

Standard library only: the core install (the ``lora-squeeze`` command) uses it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: str | os.PathLike) -> Path:
  """A unique hidden name beside ``path`` that keeps its suffix (matplotlib picks the format by it)."""
  path = Path(path)
  return path.parent / f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling of ``path`` to write; renames it over ``path`` when the block ends cleanly
  and removes it when the block raises. The parent directory is created if missing."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_sibling(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if tmp.is_dir() and not tmp.is_symlink():
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      tmp.unlink(missing_ok=True)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically, flushed to disk before the rename (mode as ``open`` gives)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  atomic_write_bytes(path, text.encode("utf-8"))
