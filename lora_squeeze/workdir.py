"""A run's working directory: one writer at a time, and a record of the settings that determine its result.

Guarantees (``train.run`` relies on them; tests/test_reliability.py checks each):

* **One writer.** ``Lock`` takes an exclusive ``flock`` on ``WORKDIR/.lock`` for the whole run. The kernel
  releases it when the process exits or is killed, so a crash never leaves a stale lock. A second process
  stops at once with one line naming the holder (pid, host, start time). Multi-host: process 0 holds it.
* **A resume continues the same run.** The first run writes ``WORKDIR/config.json``: every config value that
  can change the result (``result_settings``: everything but the keys in ``PRESENTATION_KEYS``). A later
  run, to resume or to skip a finished workdir, must have the same settings; otherwise it stops with one line
  listing the keys that differ (``SettingsMismatch``). ``fresh=True`` (``--fresh``) starts afresh instead:
  the old run's files move to ``WORKDIR/superseded/<UTC time>/``, intact, and are never read again.

Errors meant for the user (a typo, a busy or unusable workdir) are ``UserError``: the command-line entry
points print their message as one line and exit with status 2.
"""

from __future__ import annotations

import datetime
import difflib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_squeeze import fileio

CONFIG_NAME = "config.json"
RESULT_NAME = "result.json"  # a finished run's result (train.py, eval_modes.py): its presence means "done"
LOCK_NAME = ".lock"
SUPERSEDED_DIR = "superseded"
# How a run reports and checkpoints, not what it computes: these may differ between a run and its resume.
# (A resume is bit-identical whatever the checkpoint interval; the mesh and ``remat``, how the step is
# executed, may change between resumes: the same values up to XLA's float reassociation.)
# ``report`` is a sweep's summary table (results_render.write_report), written after the cells.
PRESENTATION_KEYS = frozenset(
    {
        "progress",
        "tensorboard",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "mesh",
        "report",
        "remat",
        "background_compile",
    }
)


class UserError(ValueError):
  """A problem with what the user asked for; the message is one line that says what to change."""


class SettingsMismatch(UserError):
  """A workdir holds a run whose result-determining settings differ from the config's."""


# --------------------------------------------------------------------------------------------------------
# Keys: flattening, differences, the nearest valid key.
# --------------------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping stays a leaf ({}), so its presence is compared."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def nearest_keys(key: str, valid: Iterable[str], n: int = 3) -> list[str]:
  """The valid keys a mistyped ``key`` most likely meant: close spellings, or keys whose word initials
  spell it (``lr`` -> ``learning_rate``), compared on the last dotted component too."""
  valid = sorted(set(valid))
  leaf = key.rsplit(".", 1)[-1]
  scored = []
  for v in valid:
    v_leaf = v.rsplit(".", 1)[-1]
    initials = "".join(w[0] for w in v_leaf.split("_") if w)
    score = max(difflib.SequenceMatcher(None, key, v).ratio(), difflib.SequenceMatcher(None, leaf, v_leaf).ratio())
    if leaf and leaf == initials:
      score = max(score, 0.95)
    if leaf and (v_leaf.startswith(leaf) or leaf.startswith(v_leaf)) and min(len(leaf), len(v_leaf)) >= 3:
      score = max(score, 0.8)
    scored.append((score, v))
  return [v for s, v in sorted(scored, key=lambda t: (-t[0], t[1])) if s >= 0.6][:n]


def did_you_mean(key: str, valid: Iterable[str]) -> str:
  near = nearest_keys(key, valid)
  return f" (did you mean {' or '.join(repr(k) for k in near)}?)" if near else ""


def _jsonable(tree: Any) -> Any:
  return json.loads(json.dumps(tree, default=str))


def result_settings(config) -> dict[str, Any]:
  """The config's values that can change a run's result, as JSON (tuples become lists)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return _jsonable({k: v for k, v in tree.items() if k not in PRESENTATION_KEYS})


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """``key: old -> new`` for every dotted key whose value differs (a missing key shows as <absent>)."""
  # Presentation keys never count, also where an older record kept them.
  a = flatten({k: v for k, v in old.items() if k not in PRESENTATION_KEYS})
  b = flatten({k: v for k, v in new.items() if k not in PRESENTATION_KEYS})
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va == "<absent>" and vb in (False, None, "", 0, {}, []):
      continue  # a key added to the configs later, at its "off" value: the recorded run did the same
    if va != vb:
      out.append(f"{key}: {json.dumps(va)} -> {json.dumps(vb)}")
  return out


# --------------------------------------------------------------------------------------------------------
# The lock.
# --------------------------------------------------------------------------------------------------------


class Lock:
  """Exclusive lock on ``WORKDIR/.lock`` while the ``with`` block runs (``primary=False``: a no-op, for the
  processes of a multi-host run other than 0)."""

  def __init__(self, workdir: str | os.PathLike, *, primary: bool = True):
    self.path = Path(workdir) / LOCK_NAME
    self.primary = primary
    self._fd = None

  def __enter__(self) -> Lock:
    if not self.primary:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on {h['host']} (since {h['since']})"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise UserError(
          f"workdir {self.path.parent} is in use by {who}; wait for it to finish, or use " "another --workdir"
      ) from None
    info = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing releases the flock (so does the process's death)
      self._fd = None


# --------------------------------------------------------------------------------------------------------
# The settings record.
# --------------------------------------------------------------------------------------------------------


def _run_entries(workdir: Path) -> list[Path]:
  return [p for p in workdir.iterdir() if p.name not in (SUPERSEDED_DIR, LOCK_NAME)]


def move_aside(workdir: str | os.PathLike) -> Path | None:
  """Moves every file of the run in ``workdir`` to ``workdir/superseded/<UTC time>/``; returns that
  directory (None when there was nothing to move)."""
  workdir = Path(workdir)
  entries = _run_entries(workdir)
  if not entries:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
  dest = workdir / SUPERSEDED_DIR / stamp
  dest.mkdir(parents=True)
  for p in entries:
    os.replace(p, dest / p.name)
  return dest


def check_settings(workdir: str | os.PathLike, config) -> None:
  """Raises ``SettingsMismatch`` if ``workdir`` records other result-determining settings than ``config``."""
  workdir = Path(workdir)
  path = workdir / CONFIG_NAME
  if not path.exists():
    return
  old = json.loads(path.read_text())
  diff = differences(old, result_settings(config))
  if diff:
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise SettingsMismatch(
        f"workdir {workdir} holds a run with other settings ({shown}); run it with its own settings to resume, "
        f"use another --workdir, or add --fresh to start afresh (the old run moves to "
        f"{workdir / SUPERSEDED_DIR}/)"
    )


def record_settings(workdir: str | os.PathLike, config, *, fresh: bool = False) -> Path | None:
  """Process 0's part of starting a run in ``workdir`` (under its ``Lock``): with ``fresh``, moves an old
  run aside (returns where to); then writes ``config.json`` if absent. A workdir written before settings
  were recorded (no ``config.json``) is adopted with the current settings."""
  workdir = Path(workdir)
  moved = move_aside(workdir) if fresh else None
  path = workdir / CONFIG_NAME
  if not path.exists():
    fileio.atomic_write_text(path, json.dumps(result_settings(config), indent=2, sort_keys=True) + "\n")
  return moved


def check_writable_dir(workdir: str | os.PathLike, what: str = "--workdir") -> Path:
  """Raises ``UserError`` unless ``workdir`` is, or can be created as, a writable directory. Creates nothing."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"{what}={workdir} is a file, not a directory")
  probe = workdir
  while not probe.exists():
    probe = probe.parent
  if not probe.is_dir():
    raise UserError(f"{what}={workdir}: {probe} is a file, not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"{what}={workdir}: {probe} is not writable")
  return workdir
