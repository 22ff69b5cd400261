"""A tiny deterministic task for unit tests and the smoke config: learnable in a few dozen steps.

Each example is ``"<key>=" -> "<value>"`` for a fixed random table of short letter strings (a lookup the
model must memorise), so the loss on the answer tokens falls quickly even for the tiny random model. The
iterator produces the batch contract of ``lora_squeeze.data`` (tokens, loss_mask, segment_ids, positions)
and has a JSON state (epoch, index) for exact resume. Nothing here is a benchmark of quality.

``TASK`` is an ordinary registry entry (``data.get_task("synthetic")``): its one split, ``"table"``, is
served by ``sources.source`` from code (``Task.examples_fn``) as the table scored as a multiple-choice task
(``choice_examples``), and ``data.source="synthetic"`` in a run config trains on it with
``SyntheticIterator`` (``pipeline.make_train_iterator``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lora_squeeze.data.types import Example
from lora_squeeze.data.types import Task

SPLIT = "table"  # the synthetic task's one split: the whole table, trained on and scored


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  prompt: str
  target: str


def synthetic_examples(num_examples: int = 64, seed: int = 0) -> list[SyntheticExample]:
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghij"))
  out = []
  for i in range(num_examples):
    key = "".join(rng.choice(letters, 3))
    value = "".join(rng.choice(letters, 2))
    out.append(SyntheticExample(prompt=f"{key}{i % 10}=", target=value))
  return out


def choice_examples(num_examples: int = 64, seed: int = 0, num_choices: int = 4) -> list[Example]:
  """The training table as a multiple-choice eval (``data.tasks.Example``): after ``"<key>="`` the true value
  against ``num_choices - 1`` other values of the table, the gold one at a seeded position. A tiny model
  that memorised the table scores near 100%; chance is ``1 / num_choices``. It measures the same thing the
  training loss does, so it is what the tiny sweeps of the experiments tests evaluate."""
  train = synthetic_examples(num_examples, seed)
  values = sorted({e.target for e in train})
  if len(values) < num_choices:
    raise ValueError(f"synthetic: {len(values)} distinct values, fewer than num_choices={num_choices}")
  rng = np.random.default_rng([seed, 1])
  out = []
  for e in train:
    others = [v for v in values if v != e.target]
    picks = [others[i] for i in rng.choice(len(others), num_choices - 1, replace=False)]
    gold = int(rng.integers(num_choices))
    choices = picks[:gold] + [e.target] + picks[gold:]
    out.append(Example(prompt=e.prompt, choices=tuple(choices), answers=(gold,), target=e.target))
  return out


def _split_examples(split: str) -> list[Example]:
  """The examples of a split of the synthetic task (``Task.examples_fn``): the table as choices."""
  if split != SPLIT:
    raise ValueError(f"The synthetic task has one split, {SPLIT!r}; got {split!r}.")
  return choice_examples()


def _formatted(record: Example) -> Example:
  return record  # its examples are made formatted; no raw records


TASK = Task(
    name="synthetic",
    title="synthetic lookup",
    tfds_name="",
    train_split=SPLIT,
    eval_split=SPLIT,
    metric="choice_accuracy",
    format_fn=_formatted,
    examples_fn=_split_examples,
)


def encode(example: SyntheticExample, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
  """BOS + prompt + target + EOS, right-padded; loss on target and EOS tokens."""
  prompt = [int(t) for t in tokenizer.encode(example.prompt, add_bos=True)]
  target = [int(t) for t in tokenizer.encode(example.target)] + [int(tokenizer.eos_id)]
  ids = (prompt + target)[:max_len]
  n = len(ids)
  tokens = np.zeros(max_len, np.int32)
  tokens[:n] = ids
  loss_mask = np.zeros(max_len, np.int32)
  loss_mask[len(prompt) : n] = 1
  segment_ids = np.zeros(max_len, np.int32)
  segment_ids[:n] = 1
  positions = np.zeros(max_len, np.int32)
  positions[:n] = np.arange(n)
  return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


class SyntheticIterator:
  """Endless, seeded-shuffled batches over ``synthetic_examples``; ``get_state``/``set_state`` are JSON.

  ``shard=(index, count)`` (multi-host): yield only rows [index·B/count, (index+1)·B/count) of each global
  batch of ``batch_size`` rows B; the state is the global stream's position, the same in every process.
  """

  def __init__(
      self,
      tokenizer: Any,
      *,
      batch_size: int,
      max_len: int,
      seed: int,
      num_examples: int = 64,
      shard: tuple[int, int] = (0, 1),
  ):
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count or batch_size % count:
      raise ValueError(f"shard={shard}: need 0 <= index < count and count dividing batch_size={batch_size}")
    self._encoded = [encode(e, tokenizer, max_len) for e in synthetic_examples(num_examples)]
    self._batch_size = batch_size
    per = batch_size // count
    self._rows = range(index * per, (index + 1) * per)
    self._seed = seed
    self._epoch = 0
    self._index = 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._encoded))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    order = self._order(self._epoch)
    for row in range(self._batch_size):  # the whole global batch advances the state; keep our rows
      if self._index == len(order):
        self._epoch, self._index = self._epoch + 1, 0
        order = self._order(self._epoch)
      if row in self._rows:
        rows.append(self._encoded[order[self._index]])
      self._index += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict[str, int]) -> None:
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
