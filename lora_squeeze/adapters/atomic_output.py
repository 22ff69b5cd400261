"""Writing outputs: guarded, atomic, with normal permissions, and no debris from killed runs.

Safety (``check_out_dir``, ``atomic_dir``): an OUT_DIR that is IN_DIR, contains it or lies inside it is
refused before any work, --force or not (symlinks resolved): replacing it would delete the input. The
scratch directory (``.OUT_DIR.<pid>@<host>.<random>.partial``) carries its writer's PID, so a later write of
the same OUT_DIR removes those of killed runs and never a live writer's; it is made like ``mkdir`` makes
directories (0777 minus the umask), so OUT_DIR does not end up 0700. Single-file outputs (lora_files.py,
gguf_lora.py, gguf_convert.py) have the same guard and scratch rule in ``check_out_file`` and ``atomic_file``
(scratch file ``.OUT.<pid>@<host>.partial``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import zlib
from collections.abc import Sequence
from pathlib import Path

from lora_squeeze.adapters.errors import AdapterError


def fault_point(name: str) -> None:
  """Fault injection for the kill tests: ``LORA_SQUEEZE_FAULT=name`` SIGKILLs this process here (as in
  train.py; a SIGKILL runs no cleanup, which is what leaves a partial directory behind)."""
  if os.environ.get("LORA_SQUEEZE_FAULT") == name:
    os.kill(os.getpid(), signal.SIGKILL)


# Scratch directories (a ``.partial`` being written, an ``.old`` being deleted) sit next to OUT_DIR and are
# named ``.<OUT_DIR name>.<pid>@<host>.<random>.<kind>``: the writer's PID and a hash of its host name let a
# later run tell a dead writer's leftovers (removed) from a live writer's (kept), also on a file system that
# several machines share, where a PID means something only on its own host.
HOST_ID = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_SCRATCH_KINDS = ("partial", "old")


def _scratch_dir(out_dir: Path, kind: str) -> Path:
  """Creates an empty scratch directory of ``kind`` next to ``out_dir`` for this process.

  ``os.mkdir(path, 0o777)`` applies the umask as ``mkdir`` does (0755 under umask 022); tempfile.mkdtemp
  would create it 0700, and the final rename would give OUT_DIR that mode.
  """
  while True:
    path = out_dir.parent / f".{out_dir.name}.{os.getpid()}@{HOST_ID}.{secrets.token_hex(4)}.{kind}"
    try:
      os.mkdir(path, 0o777)
      return path
    except FileExistsError:
      continue


def pid_alive(pid: int) -> bool:
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


def _dead_scratch(out: Path, tail: str, *, dirs: bool) -> list[Path]:
  """The scratch entries ``.<out name>.<pid>@<host><tail>`` next to ``out`` (directories if ``dirs``, else
  files; ``tail`` a regular expression) whose writer on this host is dead."""
  pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)@{HOST_ID}{tail}")
  try:
    entries = list(os.scandir(out.parent))
  except OSError:
    return []
  dead = []
  for entry in entries:
    match = pattern.fullmatch(entry.name)
    kind_ok = entry.is_dir(follow_symlinks=False) if dirs else entry.is_file(follow_symlinks=False)
    if match and kind_ok and not pid_alive(int(match[1])):
      dead.append(Path(entry.path))
  return dead


def _remove_stale_scratch(out_dir: Path) -> list[Path]:
  """Removes the scratch directories of ``out_dir`` (same name only) whose writer on this host is dead.

  A SIGKILLed run (or a power cut) gets no chance to remove its ``.partial``; without this they stay next to
  OUT_DIR forever. Returns the directories removed. (Scratch directories written before PIDs were in the
  name, ``.<name>.<random>.partial``, cannot be attributed and are left alone.)
  """
  removed = _dead_scratch(out_dir, rf"\.[0-9a-z]+\.({'|'.join(_SCRATCH_KINDS)})", dirs=True)
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


def _remove_stale_partials(out_path: Path) -> None:
  """Removes ``.OUT.<pid>@<host>.partial`` files next to ``out_path`` whose writer on this host is dead.

  A SIGKILLed squeeze cannot remove its half-written file; the next write of the same OUT does (never a
  live writer's: the PID says whose it is, as for the scratch directories)."""
  for path in _dead_scratch(out_path, r"\.partial", dirs=False):
    path.unlink(missing_ok=True)


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


def check_out_dir(out_dir: Path, force: bool, inputs: Sequence[Path] = (), *, dry_run: bool = False) -> None:
  """Raises unless ``out_dir`` may be written: absent, or (with ``force``) a directory to replace; and never
  one of ``inputs``, a directory holding one, or one inside one (``_check_not_input``, also for a dry run).
  Every writer of an output directory calls this before any work."""
  for in_dir in inputs:
    _check_not_input(out_dir, Path(in_dir))
  _check_replaceable(out_dir, force, dry_run, "directory")


def _check_replaceable(out: Path, force: bool, dry_run: bool, kind: str) -> None:
  """Raises unless ``out`` is absent, or (with ``force``) a ``kind`` ("directory" or "file") to replace."""
  if dry_run or not out.exists():
    return
  if not force:
    raise AdapterError(f"{out}: already exists (use --force / force=True to replace it)")
  if not (out.is_dir() if kind == "directory" else out.is_file()):
    raise AdapterError(f"{out}: exists and is not a {kind}")


def check_out_file(in_path: Path, out_path: Path, force: bool, dry_run: bool, suffix: str = ".safetensors") -> None:
  """Raises unless ``out_path`` may be written: not ``in_path``, ending in ``suffix``, and absent or (with
  ``force``) a file to replace. Every writer of a single output file calls this before any work."""
  if os.path.abspath(out_path) == os.path.abspath(in_path) or (
      out_path.exists() and in_path.exists() and os.path.samefile(out_path, in_path)
  ):
    raise AdapterError(f"{out_path}: output file is the input file; choose another OUT")
  if out_path.suffix.lower() != suffix:
    what = "a GGUF LoRA" if suffix == ".gguf" else "a single-file LoRA"
    raise AdapterError(
        f"{out_path}: the output of {what} is a {suffix} file"
        + (" (lora-squeeze convert turns GGUF into PEFT)" if suffix == ".gguf" else "")
    )
  _check_replaceable(out_path, force, dry_run, "file")


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
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


@contextlib.contextmanager
def atomic_file(out_path: Path):
  """Yields the scratch file ``.OUT.<pid>@<host>.partial`` next to ``out_path``; renamed to ``out_path`` when
  the block ends, removed if it raises, so ``out_path`` either appears complete or not at all. Dead writers'
  scratch files of the same ``out_path`` are removed first (``_remove_stale_partials``)."""
  out_path.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_partials(out_path)
  tmp = out_path.parent / f".{out_path.name}.{os.getpid()}@{HOST_ID}.partial"
  try:
    yield tmp
    os.replace(tmp, out_path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
