"""Process-wide settings of the command-line entry points: the on-disk compile cache and quiet native logs.

Library users call neither; ``main``, ``sweep`` and the ``lora-squeeze`` command call them first thing.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from pathlib import Path

# Lines that native libraries print at INFO or ERROR level on a plain CPU machine although nothing is wrong.
# They are dropped; every other line of stderr passes through unchanged.
HARMLESS_NATIVE_LINES = (
    # TensorFlow (imported by gemma -> kauldron) probing for CUDA on a machine without a GPU.
    re.compile(r"^[EIW]\d{4} .*(failed call to cuInit|Could not find cuda drivers|cudart_stub\.cc)"),
    re.compile(r"^[EIW]\d{4} .*oneDNN custom operations are on"),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    # XLA:CPU's persistent cache reloading programs it compiled itself, on this same machine: the tuning
    # attributes +prefer-no-gather / +prefer-no-scatter are not CPU features, so the check always "fails".
    re.compile(r"^E\d{4} .*cpu_aot_loader\.cc.*Target machine feature \+prefer-no-(gather|scatter) is not"),
    # grain noting that its worker profiler needs a newer jaxlib than the pinned one (we use no profiler):
    # absl's format once absl logging is set up, Python logging's default one when grain is imported before.
    re.compile(r"^(W\d{4} .*|WARNING:absl:)Grain multiprocess worker profiling requires jaxlib"),
)
VERBOSE_ENV = "LORA_SQUEEZE_VERBOSE"


def is_harmless(line: str) -> bool:
  return any(p.search(line) for p in HARMLESS_NATIVE_LINES)


def _kept(line: bytes) -> bytes:
  """``line`` without its harmless parts. A progress bar redraws with carriage returns and no newline, so a
  native line can follow one after a '\\r': each '\\r'-separated part is judged on its own."""
  parts = line.split(b"\r")
  kept = [p for p in parts if not is_harmless(p.decode("utf-8", "replace"))]
  return b"\r".join(kept)


class _StderrFilter:
  """Routes file descriptor 2 through a pipe; a thread copies each line to the real stderr unless it is
  ``is_harmless``. Native code writes to fd 2 directly, so filtering ``sys.stderr`` alone would not do."""

  def __init__(self):
    self.real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    self.read = read
    self.thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
    self.thread.start()
    atexit.register(self.stop)

  def _pump(self) -> None:
    buf = b""
    while True:
      chunk = os.read(self.read, 65536)
      if not chunk:
        break
      buf += chunk
      *lines, buf = buf.split(b"\n")
      out = []
      for line in lines:
        kept = _kept(line)
        if kept or not line:  # blank lines stay; all-harmless lines go
          out.append(kept)
      if out:
        os.write(self.real, b"".join(l + b"\n" for l in out))
    if buf and _kept(buf):
      os.write(self.real, _kept(buf))
    os.close(self.read)

  def stop(self) -> None:
    """Puts the real stderr back and lets the thread write what is still in the pipe (runs at exit, after
    Python has printed any traceback)."""
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(self.real, 2)  # closes the pipe's last write end: the thread sees EOF once it drained it
    self.thread.join(timeout=5)


_filter: _StderrFilter | None = None


def _is_closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is a callback of orbax/tensorstore reaching the asyncio loop of a
  checkpoint restore that already failed and closed (``checkpoints.Checkpoints.restore_latest`` then falls back
  to an older checkpoint): one to ~160 of them per failed restore, from several threads at once, harmless."""
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  tb, names = unraisable.exc_traceback, set()
  while tb is not None:
    names.add(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return "call_soon_threadsafe" in names


def _quiet_unraisablehook(unraisable) -> None:
  if not _is_closed_loop_callback(unraisable):
    sys.__unraisablehook__(unraisable)


def quiet_native_logs() -> None:
  """Drops the ``HARMLESS_NATIVE_LINES`` from this process's stderr, and the unraisable 'Event loop is
  closed' errors of a failed checkpoint restore (``LORA_SQUEEZE_VERBOSE=1``: keep everything). Call before TensorFlow or JAX's backend load; idempotent. Real warnings and errors, and
  Python's own output, pass through."""
  global _filter
  if _filter is not None or os.environ.get(VERBOSE_ENV) == "1":
    return
  _filter = _StderrFilter()
  if sys.unraisablehook is sys.__unraisablehook__:
    sys.unraisablehook = _quiet_unraisablehook


def enable_compile_cache() -> Path | None:
  """Keeps compiled XLA programs on disk across runs; returns the directory (None: off).

  On CPU each distinct module shape costs a 2-5 s compile, more than squeezing all the modules of that
  shape; with the cache, a second run skips them. The directory is ``$LORA_SQUEEZE_JAX_CACHE`` if set
  (empty: no cache), else ``jax/`` under the project's cache root (``$LORA_SQUEEZE_CACHE``, else
  ``~/.cache/lora_squeeze``, as in ``gemma_gguf.cache_root``); a cache JAX is already configured with
  (``JAX_COMPILATION_CACHE_DIR``) is left alone. Process-wide, which is why only entry points call it, and
  before any compile.
  """
  import jax  # pylint: disable=g-import-not-at-top  (lazy: entry points import runtime before quiet_native_logs)

  if jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  path = os.environ.get("LORA_SQUEEZE_JAX_CACHE")
  if path is None:
    root = os.environ.get("LORA_SQUEEZE_CACHE") or Path.home() / ".cache" / "lora_squeeze"
    path = Path(root).expanduser() / "jax"
  if not str(path):
    return None
  try:
    Path(path).mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache
  jax.config.update("jax_compilation_cache_dir", str(path))
  return Path(path)
