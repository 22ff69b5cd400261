"""Vision-language: Gemma 3 with its vision tower, LoRA on the text side only, the ten VQA tasks.

A tiny random multimodal Gemma 3 (``models.load("tiny", text_only=False)``: gemma's own SigLIP and projector
classes at toy size) carries every numerical test; Gemma 3 4B with its vision tower only goes through
``jax.eval_shape``. The ten TFDS builders are prepared offline from small hand-made raw files with generated
images and read back through ``tfds.data_source`` (no TensorFlow).
"""

import csv
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma.gm.vision import _token_utils
from gemma.multimodal import vision as gemma_vision

from lora_squeeze import data
from lora_squeeze import evaluate
from lora_squeeze import gemma_forward
from lora_squeeze import lora
from lora_squeeze import lora_layout
from lora_squeeze import gemma_gguf
from lora_squeeze import models
from lora_squeeze import squeeze
from lora_squeeze import train
from lora_squeeze import trainer as trainer_lib
from lora_squeeze.data import pipeline
from lora_squeeze.data import vqa

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = pipeline.ImageSpec(height=32, width=32, tokens_per_image=4)


# --------------------------------------------------------------------------------------------------------
# Helpers and fixtures.
# --------------------------------------------------------------------------------------------------------


def _pixels(seed, width=40, height=30, grey=False):
  rng = np.random.default_rng(seed)
  shape = (height, width) if grey else (height, width, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _save_image(path, seed, width=40, height=30, grey=False):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = _pixels(seed, width, height, grey)
  Image.fromarray(pixels).save(path)
  return pixels


def _example(question, answers, seed):
  return data.Example(
      vqa.vl_prompt(question), (), (), ' ' + vqa.training_answer(answers), tuple(answers), image=_pixels(seed)
  )


EXAMPLES = [
    _example('What colour is the box?', ['red'] * 7 + ['blue'] * 3, 1),
    _example('How many dogs?', ['2'] * 10, 2),
]


@pytest.fixture(scope='module')
def tiny_mm():
  return models.load('tiny', text_only=False)


def _batch(model, examples, max_len=160):
  spec = models.image_spec(model)
  return pipeline.pad_batch(
      [pipeline.encode_example(ex, model.tokenizer, max_len, image_spec=spec) for ex in examples], max_len
  )


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class _GemmaImageIds:
  """Gemma 3's image ids and its one-token "\\n\\n" (108), without the SentencePiece file."""

  start_of_image_id = 255_999
  end_of_image_id = 256_000

  def encode(self, text):
    assert text == '\n\n'
    return [108]


def _expand(row, tokens_per_image):
  """Host-side expansion of <start_of_image> (what the pipeline does for a prompt)."""
  block = pipeline.image_token_block(_GemmaImageIds(), tokens_per_image)
  out = []
  for t in row:
    out.extend(block if t == 255_999 else [t])
  return out


# --------------------------------------------------------------------------------------------------------
# The multimodal model.
# --------------------------------------------------------------------------------------------------------


def test_tiny_multimodal_model(tiny_mm):
  params = tiny_mm.params
  assert 'vision_encoder' in params and 'mm_input_projection' in params['embedder']
  models.check_params(params, models.abstract_params(tiny_mm.transformer), what='tiny multimodal')
  assert params['embedder']['mm_input_projection']['w'].shape == (32, tiny_mm.config.embed_dim)
  assert models.image_spec(tiny_mm) == SPEC
  assert models.image_spec(models.load('tiny')) is None
  # LayerNorm scales are ones (a zero scale would map every image to the same soft tokens).
  assert float(params['vision_encoder']['siglip_encoder']['Transformer']['encoder_norm']['scale'].min()) == 1.0
  with pytest.raises(ValueError, match='need text_only=False'):
    models.load('tiny', image_size=64)
  with pytest.raises(ValueError, match='vocab_size > 261'):
    models.load('tiny', text_only=False, vocab_size=260)
  with pytest.raises(ValueError, match='image_tokens=3 must be a square'):
    models.load('tiny', text_only=False, image_tokens=3)


def test_host_expansion_is_gemmas_and_placeholders_agree():
  assert pipeline.IMAGE_PLACEHOLDER == lora.IMAGE_PLACEHOLDER == _token_utils.SOFT_TOKEN_PLACEHOLDER
  rows = np.array([[2, 40, 41, 255_999, 42, 43], [2, 50, 255_999, 51, 52, 53]], np.int32)
  theirs = np.asarray(_token_utils.add_extra_tokens_for_images(rows, max_num_images=1, num_tokens_per_image=5))
  ours = np.array([_expand(r, 5) for r in rows])
  np.testing.assert_array_equal(ours, theirs)


def test_vl_hidden_states_match_gemmas_own_call_with_and_without_lora():
  """Our path (host-expanded tokens, explicit mask, images) == gemma's ``__call__(tokens, images=...)``.

  Gemma's own expansion needs its real image ids (255999, 256000), so this model has Gemma's vocabulary."""
  m = models.load('tiny', text_only=False, num_layers=2, vocab_size=262_144)
  p_tokens = m.config.vision_encoder.num_mm_tokens_per_image
  text = np.array([[2, 40, 41, 255_999, 42, 43, 44], [2, 60, 61, 255_999, 62, 63, 64]], np.int32)
  expanded = np.array([_expand(r, p_tokens) for r in text], np.int32)
  positions = np.broadcast_to(np.arange(expanded.shape[1]), expanded.shape)
  mask = gemma_forward.attention_mask_from_segments(np.ones_like(expanded), tokens=expanded)
  images = np.stack([_pixels(3, 32, 32), _pixels(4, 32, 32)])[:, None]

  cfg = lora.LoRAConfig(rank=2)
  lp = lora.init_lora(jax.random.key(0), m.config, cfg)
  lp = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), x.dtype), lp)
  module = lora.LoRA(model=m.transformer, config=cfg)
  merged = lora.merge_params(m.params, lp)

  @jax.jit
  def gemma_call(params, imgs):
    return m.transformer.apply(
        {'params': params}, jnp.asarray(text), images=imgs, return_hidden_states=True  # gemma wants jax arrays
    ).hidden_states

  @jax.jit
  def ours(params, imgs):
    return m.transformer.apply(
        {'params': params},
        expanded,
        positions=positions,
        attention_mask=mask,
        images=imgs,
        method=gemma_forward.base_hidden_states,
    )

  @jax.jit
  def gemma_call_lora(params, imgs):
    return module.apply({'params': params}, jnp.asarray(text), images=imgs, return_hidden_states=True).hidden_states

  @jax.jit
  def ours_lora(params, imgs):
    return module.apply(
        {'params': params}, expanded, positions=positions, attention_mask=mask, images=imgs, method=module.hidden_states
    )

  def at_text(hidden):
    return np.asarray(_token_utils.remove_mm_logits(logits=hidden, tokens=text, num_tokens_per_image=p_tokens))

  base_ours = at_text(ours(m.params, images))
  np.testing.assert_allclose(base_ours, np.asarray(gemma_call(m.params, images)), rtol=1e-5, atol=1e-5)
  lora_ours = at_text(ours_lora(merged, images))
  np.testing.assert_allclose(lora_ours, np.asarray(gemma_call_lora(merged, images)), rtol=1e-5, atol=1e-5)
  assert np.abs(lora_ours - base_ours).max() > 1e-4  # the adapters do act
  # The image enters: text after it changes with the pixels, text before it (causal) does not.
  other = ours(m.params, images[::-1])
  other = at_text(other)
  np.testing.assert_allclose(other[0, :3], base_ours[0, :3], atol=1e-6)
  assert np.abs(other[0, 4:] - base_ours[0, 4:]).max() > 1e-4


def test_no_lora_site_in_vision_tower_or_projector(tiny_mm, monkeypatch):
  """Every gemma Einsum the interceptor meets in a VL forward, and which it adapts: text blocks only."""
  seen = []
  real = lora._projection_site  # pylint: disable=protected-access

  def recording(module):
    site = real(module)
    # The MLP's two einsums share FeedForward's scope; their weight names tell them apart.
    seen.append(('/'.join(module.scope.path) + ':' + module.weight_name, site is not None))
    return site

  monkeypatch.setattr(lora, '_projection_site', recording)
  cfg = lora.LoRAConfig(rank=2)
  module = lora.LoRA(model=tiny_mm.transformer, config=cfg)
  lp = lora.init_lora(jax.random.key(0), tiny_mm.config, cfg)
  assert not any(p.startswith(('vision_encoder', 'embedder')) for p in lora.lora_ranks(lp))
  batch = _batch(tiny_mm, EXAMPLES)
  mask = gemma_forward.attention_mask_from_segments(batch['segment_ids'], tokens=batch['tokens'])
  forward = jax.jit(
      lambda params, b, mask: module.apply(  # the interceptor runs (and records) while tracing
          {'params': params},
          b['tokens'],
          positions=b['positions'],
          attention_mask=mask,
          images=b['images'],
          method=module.hidden_states,
      )
  )
  hidden = forward(lora.merge_params(tiny_mm.params, lp), batch, mask)
  assert hidden.shape == (*batch['tokens'].shape, tiny_mm.config.embed_dim)
  adapted = sorted({path for path, is_site in seen if is_site})
  rejected = sorted({path for path, is_site in seen if not is_site})
  assert rejected == ['embedder/mm_input_projection:w']  # the projector is a gemma Einsum: met and refused
  assert not any(p.startswith('vision_encoder') for p, _ in seen)  # SigLIP uses flax Dense/Conv, no Einsum
  assert all(p.startswith('layer_') for p in adapted)
  assert len(adapted) == tiny_mm.config.num_layers * 5  # q, kv, attn_vec, gating, linear per block


def test_lora_gradient_reaches_text_side_only(tiny_mm):
  cfg = lora.LoRAConfig(rank=4)
  trainer = trainer_lib.Trainer(tiny_mm, cfg, max_targets=64)
  lp = lora.init_lora(jax.random.key(1), tiny_mm.config, cfg)
  rng = np.random.default_rng(1)
  lp = jax.tree_util.tree_map_with_path(  # b = 0 would make every a-gradient zero
      lambda path, x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) if path[-1].key == 'b' else x, lp
  )
  batch = _batch(tiny_mm, EXAMPLES)
  loss_and_grad = jax.jit(jax.value_and_grad(lambda l, b: trainer._loss(l, tiny_mm.params, b)[0]))  # pylint: disable=protected-access
  loss, grads = loss_and_grad(lp, batch)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(lp)  # gradients of the LoRA factors, nothing else
  norms = {
      path: (float(jnp.linalg.norm(g['a'])), float(jnp.linalg.norm(g['b'])))
      for path, g in sorted(squeeze.lora_pairs(grads).items())
  }
  assert len(norms) == len(lora_layout.lora_shapes(tiny_mm.config, cfg))
  assert all(a > 0 and b > 0 for a, b in norms.values()), norms
  other = dict(batch, images=batch['images'][::-1].copy())
  loss_other, _ = loss_and_grad(lp, other)
  assert abs(float(loss_other) - float(loss)) > 1e-6  # the loss sees the images


def test_train_steps_leave_vision_tower_and_projector_bitwise_unchanged(tiny_mm):
  cfg = lora.LoRAConfig(rank=4)
  trainer = trainer_lib.Trainer(tiny_mm, cfg, max_targets=64)
  state = trainer.init_state(jax.random.key(2), 4)
  before_base = jax.tree.map(np.array, tiny_mm.params)
  before_lora = jax.tree.map(np.array, state['params'])
  batch = _batch(tiny_mm, EXAMPLES)
  losses = []
  for _ in range(3):
    state, metrics = trainer.train_step(state, tiny_mm.params, batch, 0.05)
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)) and trainer.traces['train_step'] == 1
  after_base = jax.tree.map(np.array, tiny_mm.params)
  for name in ('vision_encoder', 'embedder'):
    for x, y in zip(jax.tree.leaves(before_base[name]), jax.tree.leaves(after_base[name])):
      assert x.dtype == y.dtype and np.array_equal(x, y)
  changed = [
      not np.array_equal(x, np.asarray(y))
      for x, y in zip(jax.tree.leaves(before_lora), jax.tree.leaves(state['params']))
  ]
  assert all(changed)  # every a and b moved (b from 0, a through b's first update)


def test_gemma3_4b_multimodal_shapes_and_rank128_lora_count():
  m = models.load('gemma3_4b', text_only=False, abstract=True)
  assert models.image_spec(m) == pipeline.ImageSpec(896, 896, 256)
  assert m.params['embedder']['mm_input_projection']['w'].shape == (1152, 2560)
  vit = m.params['vision_encoder']['siglip_encoder']
  assert vit['embedding']['kernel'].shape == (14, 14, 3, 1152)
  assert vit['pos_embedding'].shape == (1, 4096, 1152)
  assert models.count_params(m.params['vision_encoder']) > 4e8  # SigLIP-So400m
  cfg = lora.LoRAConfig(rank=128)
  shapes = jax.eval_shape(lambda k: lora.init_lora(k, m.config, cfg), jax.random.key(0))
  count = models.count_params(shapes)
  text_only = models.model_config('gemma3_4b')
  assert count == lora_layout.lora_param_count(text_only, cfg)
  c = m.config
  d, f, n, k, h, r = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim, 128
  per_layer = r * (d + n * h) + 2 * r * (d + k * h) + r * (n * h + d) + 2 * r * (d + f) + r * (f + d)
  assert count == c.num_layers * per_layer
  assert not any(p.startswith('vision_encoder') or p.startswith('embedder') for p in lora.lora_ranks(shapes))


@pytest.mark.slow
def test_gemma3_4b_vl_forward_with_lora_traces_at_full_size():
  """jax.eval_shape of the LoRA + images forward of the real 4B (SigLIP at 896 px, 256 soft tokens)."""
  m = models.load('gemma3_4b', text_only=False, abstract=True)
  cfg = lora.LoRAConfig(rank=128)
  module = lora.LoRA(model=m.transformer, config=cfg)
  lp = jax.eval_shape(lambda k: lora.init_lora(k, m.config, cfg), jax.random.key(0))
  t = 300
  sds = jax.ShapeDtypeStruct

  def forward(base, lp, tokens, images):
    mask = gemma_forward.attention_mask_from_segments(jnp.ones_like(tokens), tokens=tokens)
    positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    return module.apply(
        {'params': lora.merge_params(base, lp)},
        tokens,
        positions=positions,
        attention_mask=mask,
        images=images,
        method=module.hidden_states,
    )

  out = jax.eval_shape(forward, m.params, lp, sds((1, t), jnp.int32), sds((1, 1, 896, 896, 3), jnp.uint8))
  assert out.shape == (1, t, 2560)


# --------------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------------


def test_vqa_accuracy_hand_computed():
  answers = ['red'] * 2 + ['dark red'] * 8
  # Leaving out a "red" (2 of 10 subsets) leaves 1 match (1/3), else 2 matches (2/3): (2/3 + 16/3) / 10.
  assert vqa.vqa_accuracy('red', answers) == pytest.approx(0.6)
  assert vqa.vqa_accuracy('dark red', answers) == pytest.approx(1.0)
  # 3 "cat": leaving one out leaves 2 (2/3) in 3 subsets, 3 (1) in 7: (2 + 7) / 10.
  assert vqa.vqa_accuracy('cat', ['cat'] * 3 + ['dog'] * 7) == pytest.approx(0.9)
  assert vqa.vqa_accuracy('bird', ['cat'] * 3 + ['dog'] * 7) == 0.0
  # Processing: case, final period, articles, number words.
  assert vqa.vqa_accuracy('The Cat.', ['cat'] * 3 + ['dog'] * 7) == pytest.approx(0.9)
  assert vqa.vqa_accuracy('Two', ['2'] * 10) == 1.0
  # The official script processes only when the humans disagree: "Yes." is then wrong against ten "yes".
  assert vqa.vqa_accuracy('Yes.', ['yes'] * 10) == 1.0
  assert vqa.vqa_accuracy('Yes.', ['yes'] * 10, official_script=True) == 0.0
  assert vqa.vqa_accuracy('Yes.', ['yes'] * 9 + ['no'], official_script=True) == 1.0
  assert vqa.vqa_accuracy('yes', ['yes']) == 1.0  # one answer: exact match
  with pytest.raises(ValueError, match='no human answers'):
    vqa.vqa_accuracy('yes', [])


@pytest.mark.parametrize(
    'raw, processed',
    [
        ('Two dogs.', '2 dogs'),
        ('The cat', 'cat'),
        ('an apple', 'apple'),
        ('none', '0'),
        ('dont', "don't"),
        ('Im here', 'im here'),  # contractions are looked up after lower-casing: the key "Im" never matches
        ('yes/no', 'yes no'),  # a mark not touching a space becomes a space
        ('red, white', 'red white'),  # one touching a space is deleted
        ('1,000', '1000'),  # digit,digit: every mark is deleted
        ('3.5', '3.5'),  # a decimal point stays
        ('x-ray', 'x ray'),
        ('  Hello!\n', 'hello'),
    ],
)
def test_vqa_answer_processing(raw, processed):
  assert vqa.normalize_answer(raw) == processed


def test_exact_match_and_relaxed_accuracy():
  assert vqa.exact_match('Three', ['3']) == 1.0
  assert vqa.exact_match('four', ['3']) == 0.0
  assert vqa.exact_match('a tree', ['bush', 'Tree']) == 1.0
  assert vqa.relaxed_accuracy('10.4', ['10']) == 1.0  # 4% off
  assert vqa.relaxed_accuracy('10.6', ['10']) == 0.0  # 6% off
  assert vqa.relaxed_accuracy('45%', ['0.45']) == 1.0
  assert vqa.relaxed_accuracy('Yes', ['yes']) == 1.0
  assert vqa.relaxed_accuracy('0.01', ['0']) == 0.0  # a zero reference needs an exact match
  assert vqa.relaxed_accuracy('0', ['0']) == 1.0
  assert vqa.score('relaxed_accuracy', '99', ['100']) == 1.0
  with pytest.raises(ValueError, match='Unknown vision-language metric'):
    vqa.score('anls', 'a', ['a'])


# --------------------------------------------------------------------------------------------------------
# Registry, prompts, pipeline.
# --------------------------------------------------------------------------------------------------------


def test_vl_registry():
  assert len(data.VL_TASKS) == 10 and len(data.TASK_NAMES) == 13
  assert set(data.VL_TASK_NAMES).isdisjoint(data.TASK_NAMES)
  for task in data.VL_TASKS.values():
    assert data.get_task(task.title) is task and task.metric in data.VL_METRICS
    assert task.manual_dir and '--manual_dir=' in data.prepare_command(task)
    assert data.is_vl_task(task.name)
  assert data.get_task('OK-VQA').eval_split == 'validation'
  assert data.get_task('TallyQA').eval_split == 'test'
  assert data.get_task('ChartQA').metric == 'relaxed_accuracy'
  assert not data.is_vl_task('arc_e')
  with pytest.raises(ValueError, match='vision-language: vqav2, okvqa'):
    data.get_task('docvqa')


def test_vl_encoding_inserts_the_image_block_and_resizes(tiny_mm):
  tok = tiny_mm.tokenizer
  ex = EXAMPLES[0]
  enc = pipeline.encode_example(ex, tok, 192, image_spec=SPEC)
  block = [14, 14, 260] + [-2] * 4 + [261, 14, 14]  # "\n\n" is two byte tokens here
  assert pipeline.image_token_block(tok, 4) == block
  tokens, mask = enc['tokens'].tolist(), enc['loss_mask']
  assert tokens[: 1 + len(block)] == [tok.bos_id] + block
  after = ex.prompt.split(pipeline.IMAGE_MARKER)[1]
  assert tok.decode(tokens[1 + len(block) : len(tokens) - int(mask.sum())]) == after
  assert tok.decode(enc['tokens'][mask == 1]) == ' red' and tokens[-1] == tok.eos_id
  assert enc['images'].shape == (1, 32, 32, 3) and enc['images'].dtype == np.uint8
  # Truncation keeps BOS + the block and the end of the question.
  short = pipeline.encode_example(ex, tok, 40, image_spec=SPEC)
  assert len(short['tokens']) == 40 and short['tokens'][:11].tolist() == [tok.bos_id] + block
  assert tok.decode(short['tokens'][short['loss_mask'] == 1]) == ' red'
  with pytest.raises(ValueError, match='leaves no room'):
    pipeline.encode_example(ex, tok, 11, image_spec=SPEC)
  with pytest.raises(ValueError, match='no image_spec'):
    pipeline.encode_example(ex, tok, 192)
  with pytest.raises(ValueError, match='exactly once'):
    pipeline.encode_example(data.Example('no marker', (), (), ' x', image=_pixels(0)), tok, 64, image_spec=SPEC)
  batch = pipeline.pad_batch([enc, pipeline.encode_example(EXAMPLES[1], tok, 192, image_spec=SPEC)], 192)
  assert batch['images'].shape == (2, 1, 32, 32, 3)
  text = pipeline.encode_example(data.Example('Q', (), (), ' a'), tok, 192)
  with pytest.raises(ValueError, match='all text or all image'):
    pipeline.pad_batch([enc, text], 192)
  it = data.train_iterator(EXAMPLES * 2, tok, batch_size=2, max_len=192, seed=0, image_spec=SPEC)
  assert next(it)['images'].shape == (2, 1, 32, 32, 3)


def test_real_gemma3_tokenizer_image_block_matches_gemma():
  tok = gemma_gguf.gemma3_tokenizer()  # the cached rebuild (built from the GGUF once if missing)
  assert tok.encode('\n\n') == [108]
  assert tok.encode('<start_of_image>') == [tok.start_of_image_id] == [255_999]
  assert tok.encode('<end_of_image>') == [tok.end_of_image_id] == [256_000]
  ids = [2] + tok.encode('Question: what?') + [255_999]
  theirs = _token_utils.add_extra_tokens_for_images(np.array([ids]), max_num_images=1, num_tokens_per_image=256)
  block = pipeline.image_token_block(tok, 256)
  np.testing.assert_array_equal(np.asarray(theirs)[0], ids[:-1] + block)
  assert block[1] == gemma_vision.BEGIN_IMAGE_TOKEN


# --------------------------------------------------------------------------------------------------------
# The ten builders, offline from hand-made raw files with generated images.
# --------------------------------------------------------------------------------------------------------


def _dump(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _vqa_format(root, questions, annotations, counts):
  for folder, n in counts.items():
    qs, anns = [], []
    for i in range(n):
      image_id = (1000 if folder.startswith('val') else 0) + i + 1
      qs.append({'image_id': image_id, 'question': f'What is thing {i}?', 'question_id': image_id * 10})
      words = ['red'] * 7 + ['dark red'] * 3
      anns.append(
          {
              'image_id': image_id,
              'question_id': image_id * 10,
              'answer_type': 'other',
              'question_type': 'what',
              'answers': [{'answer': w, 'answer_confidence': 'yes', 'answer_id': k + 1} for k, w in enumerate(words)],
          }
      )
      _save_image(root / folder / f'COCO_{folder}_{image_id:012d}.jpg', image_id)
    _dump(root / questions.format(folder), {'questions': qs})
    _dump(root / annotations.format(folder), {'annotations': anns})


def _raw_vqav2(raw):
  _vqa_format(
      raw / 'vqav2',
      'v2_OpenEnded_mscoco_{}_questions.json',
      'v2_mscoco_{}_annotations.json',
      {'train2014': 3, 'val2014': 2},
  )
  return {'train': 3, 'validation': 2}


def _raw_okvqa(raw, train=3, val=2):
  _vqa_format(
      raw / 'okvqa',
      'OpenEnded_mscoco_{}_questions.json',
      'mscoco_{}_annotations.json',
      {'train2014': train, 'val2014': val},
  )
  return {'train': train, 'validation': val}


def _raw_aokvqa(raw):
  root = raw / 'aokvqa'
  for split, n in (('train', 2), ('val', 1)):
    rows = []
    for i in range(n):
      image_id = 500 + i + (100 if split == 'val' else 0)
      rows.append(
          {
              'question_id': f'{split}q{i}',
              'image_id': image_id,
              'question': 'Why is it wet?',
              'choices': ['rain', 'sun', 'snow', 'wind'],
              'correct_choice_idx': 0,
              'direct_answers': ['rain'] * 6 + ['raining'] * 4,
              'difficult_direct_answer': False,
              'rationales': ['a', 'b', 'c'],
          }
      )
      _save_image(root / f'{split}2017' / f'{image_id:012d}.jpg', image_id)
    _dump(root / f'aokvqa_v1p0_{split}.json', rows)
  return {'train': 2, 'validation': 1}


def _raw_textvqa(raw):
  root = raw / 'textvqa'
  for split, n in (('train', 2), ('val', 2)):
    rows = []
    for i in range(n):
      image_id = f'{split}img{i}'
      rows.append(
          {
              'question': 'What does the sign say?',
              'image_id': image_id,
              'question_id': len(split) * 10 + i,
              'answers': ['stop'] * 10,
          }
      )
      _save_image(root / 'train_images' / f'{image_id}.jpg', i, width=40, height=20)
    _dump(root / f'TextVQA_0.5.1_{split}.json', {'data': rows})
  with open(root / 'train_images' / 'rotation.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['ImageID', 'Subset', 'Rotation'])
    w.writerow(['valimg0', 'train', '90.0'])
    w.writerow(['valimg1', 'train', ''])
  return {'train': 2, 'validation': 2}


def _raw_vizwiz(raw):
  root = raw / 'vizwiz_vqa'
  for split, n in (('train', 2), ('val', 1)):
    rows = []
    for i in range(n):
      name = f'VizWiz_{split}_{i:08d}.jpg'
      answers = [{'answer': 'soup', 'answer_confidence': 'yes'}] * 9 + [{'answer': '', 'answer_confidence': 'no'}]
      rows.append(
          {
              'image': name,
              'question': 'What is in this can?',
              'answers': answers,
              'answerable': 1,
              'answer_type': 'other',
          }
      )
      _save_image(root / split / name, i)
    _dump(root / 'annotations' / f'{split}.json', rows)
  return {'train': 2, 'validation': 1}


def _raw_tallyqa(raw):
  root = raw / 'tallyqa'
  train = [
      {
          'image': 'VG_100K/1.jpg',
          'image_id': 1,
          'question': 'How many cats?',
          'question_id': 11,
          'answer': 3,
          'data_source': 'imported_genome',
      },
      {
          'image': 'train2014/COCO_train2014_000000000005.jpg',
          'image_id': 5,
          'question': 'How many cars?',
          'question_id': 12,
          'answer': 0,
          'data_source': 'amt',
      },
  ]
  test = [
      {
          'image': 'VG_100K_2/7.jpg',
          'image_id': 7,
          'question': 'How many birds?',
          'question_id': 21,
          'answer': 2,
          'data_source': 'tdiuc',
          'issimple': True,
      },
      {
          'image': 'VG_100K_2/8.jpg',
          'image_id': 8,
          'question': 'How many red birds on the left?',
          'question_id': 22,
          'answer': 1,
          'data_source': 'amt',
          'issimple': False,
      },
  ]
  for r in train + test:
    _save_image(root / r['image'], r['question_id'])
  _dump(root / 'train.json', train)
  _dump(root / 'test.json', test)
  return {'train': 2, 'test': 2}


def _raw_gqa(raw):
  root = raw / 'gqa'
  for source, n in (('train_balanced', 2), ('val_balanced', 1), ('testdev_balanced', 1)):
    rows = {}
    for i in range(n):
      image_id = f'n{len(source)}{i}'
      rows[f'{source[:3]}{i}'] = {
          'imageId': image_id,
          'question': 'Is the cup on the left?',
          'answer': 'yes',
          'fullAnswer': 'Yes, it is.',
          'isBalanced': True,
      }
      _save_image(root / 'images' / f'{image_id}.jpg', i)
    _dump(root / f'{source}_questions.json', rows)
  return {'train': 2, 'validation': 1, 'testdev': 1}


def _raw_chartqa(raw):
  root = raw / 'chartqa' / 'ChartQA Dataset'
  counts = {}
  for split in ('train', 'val', 'test'):
    for subset in ('human', 'augmented'):
      rows = [
          {'imgname': f'{subset}{i}.png', 'query': 'What is the highest value?', 'label': str(10 + i)}
          for i in range(2 if subset == 'human' else 1)
      ]
      for i, r in enumerate(rows):
        _save_image(root / split / 'png' / r['imgname'], 100 + i)
      _dump(root / split / f'{split}_{subset}.json', rows)
    counts[{'val': 'validation'}.get(split, split)] = 3
  return counts


def _raw_scienceqa(raw):
  root = raw / 'scienceqa'
  problems = {}
  for k, split in enumerate(('train', 'train', 'val', 'test', 'test')):
    pid = str(k + 1)
    problems[pid] = {
        'question': 'Which animal is a mammal?',
        'choices': ['shark', 'whale', 'trout'],
        'answer': 1,
        'hint': 'Look at the picture.' if k else '',
        'image': 'image.png',
        'split': split,
    }
    _save_image(root / split / pid / 'image.png', k)
  problems['99'] = {
      'question': 'No picture?',
      'choices': ['a', 'b'],
      'answer': 0,
      'hint': '',
      'image': None,
      'split': 'test',
  }  # skipped: no image
  _dump(root / 'problems.json', problems)
  return {'train': 2, 'validation': 1, 'test': 2}


def _raw_ocrvqa(raw):
  root = raw / 'ocrvqa'
  books = {}
  for split, book in ((1, 'b1'), (1, 'b2'), (2, 'b3'), (3, 'b4')):
    books[book] = {
        'imageURL': f'http://x/{book}.jpg',
        'questions': ['Who wrote this book?', 'Is this a novel?'],
        'answers': ['Jane Doe', 'Yes'],
        'title': 'T',
        'authorName': 'Jane Doe',
        'genre': 'Fiction',
        'split': split,
    }
    _save_image(root / 'images' / f'{book}.jpg', len(books), grey=True)  # grey covers: stored as RGB
  _dump(root / 'dataset.json', books)
  return {'train': 4, 'validation': 2, 'test': 2}


RAW = {
    'vqav2': _raw_vqav2,
    'okvqa': _raw_okvqa,
    'aokvqa': _raw_aokvqa,
    'textvqa': _raw_textvqa,
    'vizwiz_vqa': _raw_vizwiz,
    'tallyqa': _raw_tallyqa,
    'gqa': _raw_gqa,
    'chartqa': _raw_chartqa,
    'scienceqa': _raw_scienceqa,
    'ocrvqa': _raw_ocrvqa,
}


def _prepare(name, raw, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from lora_squeeze.data import builders  # pylint: disable=g-import-not-at-top

  cls = {b.name: b for b in builders.VL_BUILDERS}[name]
  builder = cls(data_dir=str(data_dir))
  builder.download_and_prepare(
      file_format='array_record', download_config=tfds.download.DownloadConfig(manual_dir=str(raw))
  )
  return builder


def test_builders_cover_the_registry():
  from lora_squeeze.data import builders  # pylint: disable=g-import-not-at-top

  assert sorted(b.name for b in builders.VL_BUILDERS) == sorted(data.VL_TASK_NAMES) == sorted(RAW)


@pytest.mark.parametrize('name', sorted(RAW))
def test_vl_builder_prepares_offline_and_formats(name, tmp_path):
  counts = RAW[name](tmp_path / 'raw')
  builder = _prepare(name, tmp_path / 'raw', tmp_path / 'tfds')
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == counts
  task = data.get_task(name)
  assert {task.train_split, task.eval_split} <= set(counts)
  for split, n in counts.items():
    src = data.source(name, split, data_dir=tmp_path / 'tfds')
    assert len(src) == n
    for i in range(n):
      record, ex = src.records[i], src[i]
      assert set(record) == {'image', 'image_id', 'question_id', 'question', 'answers', 'choices', 'context', 'subset'}
      assert ex.prompt.startswith(pipeline.IMAGE_MARKER) and ex.prompt.endswith('\nAnswer:')
      assert ex.references and ex.target == ' ' + vqa.training_answer(ex.references)
      assert ex.image.dtype == np.uint8 and ex.image.ndim == 3 and ex.image.shape[-1] == 3
      np.testing.assert_array_equal(ex.image, record['image'])
  _check_specifics(name, tmp_path / 'tfds')


def _records(name, split, data_dir):
  src = data.source(name, split, data_dir=data_dir)
  return sorted((src.records[i] for i in range(len(src))), key=lambda r: r['question_id'])


def _check_specifics(name, data_dir):
  """What each raw format adds beyond the shared checks."""
  if name in ('vqav2', 'okvqa'):
    r = _records(name, 'validation', data_dir)[0]
    assert len(r['answers']) == 10 and r['subset'] == b'other'
    ex = data.get_task(name).format(r)
    assert ex.target == ' red' and ex.references.count('dark red') == 3
  elif name == 'textvqa':
    rotated, upright = _records(name, 'validation', data_dir)
    assert rotated['image'].shape == (40, 20, 3)  # 40 x 20 turned by 90 degrees
    assert upright['image'].shape == (20, 40, 3)
  elif name == 'vizwiz_vqa':
    assert len(_records(name, 'train', data_dir)[0]['answers']) == 9  # the empty answer is dropped
  elif name == 'tallyqa':
    test = _records(name, 'test', data_dir)
    assert [(r['subset'], list(r['answers'])) for r in test] == [(b'simple', [b'2']), (b'complex', [b'1'])]
    assert {r['subset'] for r in _records(name, 'train', data_dir)} == {b''}
  elif name == 'chartqa':
    recs = _records(name, 'test', data_dir)
    assert sorted(r['subset'] for r in recs) == [b'augmented', b'human', b'human']
    first = next(r for r in recs if r['question_id'] == b'human/0')
    np.testing.assert_array_equal(first['image'], _pixels(100))  # PNG bytes kept: pixel-exact
  elif name == 'scienceqa':
    ex = data.get_task(name).format(_records(name, 'test', data_dir)[0])
    assert 'Options: shark | whale | trout\n' in ex.prompt and ex.target == ' whale'
    assert 'Context: Look at the picture.\n' in ex.prompt
  elif name == 'ocrvqa':
    recs = _records(name, 'train', data_dir)
    assert [r['question_id'] for r in recs] == [b'b1/0', b'b1/1', b'b2/0', b'b2/1']
    assert recs[0]['image'].shape == (30, 40, 3)  # grey cover stored as RGB


def test_missing_raw_files_name_the_instructions(tmp_path):
  (tmp_path / 'raw' / 'okvqa').mkdir(parents=True)
  (tmp_path / 'raw' / 'okvqa' / 'README').write_text('empty')
  with pytest.raises(FileNotFoundError, match='MANUAL_DOWNLOAD_INSTRUCTIONS'):
    _prepare('okvqa', tmp_path / 'raw', tmp_path / 'tfds')


@pytest.mark.parametrize('name', data.VL_TASK_NAMES)
def test_every_vl_task_formats_mock_tfds_data(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  task = data.get_task(name)
  with tfds.testing.mock_data(num_examples=6):
    src = data.source(task, task.eval_split)
    valid = 0
    for i in range(len(src)):
      try:
        ex = task.format(src.records[i])
      except data.InvalidExampleError:
        continue  # mock answers may be empty
      assert ex.image.dtype == np.uint8 and ex.image.shape[-1] == 3
      valid += 1
  assert valid >= 1 or name == 'scienceqa'  # random options rarely contain the random answer


# --------------------------------------------------------------------------------------------------------
# Evaluation and an end-to-end run on builder data.
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def okvqa_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('okvqa')
  _raw_okvqa(tmp / 'raw', train=4, val=3)
  _prepare('okvqa', tmp / 'raw', tmp / 'tfds')
  return tmp / 'tfds'


def test_generate_vl_equals_a_one_example_reference_decode(tiny_mm):
  """Batched decoding with the image embedded once == a plain loop of full forwards, one example at a time."""
  cfg = lora.LoRAConfig(rank=2)
  lp = jax.tree.map(lambda x: x + 0.3, lora.init_lora(jax.random.key(3), tiny_mm.config, cfg))
  preds = evaluate.generate_vl(
      tiny_mm, EXAMPLES, lora_params=lp, lora_config=cfg, max_new_tokens=4, max_len=160, batch_rows=2, stop=''
  )
  module = lora.LoRA(model=tiny_mm.transformer, config=cfg)
  merged = lora.merge_params(tiny_mm.params, lp)

  @jax.jit
  def next_token(tokens, segs, last, images):  # (1, 160) right-padded, the whole forward each time
    mask = gemma_forward.attention_mask_from_segments(segs, tokens=tokens)
    positions = jnp.arange(tokens.shape[1])[None] * segs
    hidden = module.apply(
        {'params': merged}, tokens, positions=positions, attention_mask=mask, images=images, method=module.hidden_states
    )
    return jnp.argmax(gemma_forward.logits_at(hidden[0, last], merged['embedder']['input_embedding']))

  for ex, pred in zip(EXAMPLES, preds):
    enc = pipeline.encode_example(ex, tiny_mm.tokenizer, 160, continuation='', add_eos=False, image_spec=SPEC)
    seq, new = enc['tokens'].tolist(), []
    for _ in range(4):
      row = seq + new
      tokens, segs = np.zeros((1, 160), np.int32), np.zeros((1, 160), np.int32)
      tokens[0, : len(row)], segs[0, : len(row)] = row, 1
      nxt = int(next_token(tokens, segs, len(row) - 1, enc['images'][None]))
      if nxt == tiny_mm.tokenizer.eos_id:
        break
      new.append(nxt)
    assert pred == tiny_mm.tokenizer.decode(new)


def test_vl_evaluation_on_builder_data(tiny_mm, okvqa_dir, monkeypatch):
  examples = data.eval_examples('okvqa', 'validation', data_dir=okvqa_dir)
  assert len(examples) == 3
  metrics = evaluate.evaluate_examples(tiny_mm, 'okvqa', examples, max_len=160, batch_rows=2, max_new_tokens=3)
  assert metrics['metric'] == 'vqa_accuracy' and metrics['n'] == 3
  assert 0.0 <= metrics['accuracy'] <= 1.0 and 0.0 <= metrics['exact_match'] <= 1.0
  assert metrics['ci95'][0] <= metrics['accuracy'] <= metrics['ci95'][1]
  # The scoring behind it: answering the training target of every example scores 7/10 -> 1.0, the
  # minority answer (3 of 10 humans) 3 x 2/3 + 7 x 1 over 10 = 0.9, nonsense 0.
  for answer, expected in (('red', 1.0), ('Dark red.', 0.9), ('blue', 0.0)):
    monkeypatch.setattr(evaluate, 'generate_vl', lambda *a, answer=answer, **k: [answer] * 3)
    assert evaluate.evaluate_examples(tiny_mm, 'okvqa', examples)['accuracy'] == pytest.approx(expected)


def test_vl_runlocal_config_end_to_end(okvqa_dir, tmp_path):
  config = _load_config('vl', f'runlocal,task=okvqa,data_dir={okvqa_dir}')
  assert config.model == 'tiny' and config.model_options.text_only is False
  result = train.run(config, tmp_path / 'run')
  assert result['steps'] == config.steps == 6
  metrics = result['metrics']
  assert metrics['task'] == 'okvqa' and metrics['n'] == 3 and 0.0 <= metrics['accuracy'] <= 1.0
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert len(losses) == 6 and all(np.isfinite(losses))
  again = train.run(config, tmp_path / 'run')  # finished: nothing to do
  assert again == json.loads((tmp_path / 'run' / 'result.json').read_text())


def test_vl_configs_at_paper_scale():
  direct = _load_config('vl', 'task=tallyqa,rank=32,lr=0.003')
  assert (direct.model, direct.mode, direct.lora.rank, direct.steps) == ('gemma3_4b', 'direct', 32, 10_000)
  assert direct.model_options.text_only is False and direct.data.max_len == 1024
  assert direct.warmup_steps == 1000 and direct.data.batch_size == 8
  with pytest.raises(ValueError, match='mode='):
    _load_config('vl', 'mode=sideways')
  fig8 = _load_config('vl', 'artefact=fig8,lr=0.003')
  tasks = {c['overrides']['data.task'] for c in fig8.sweep}
  assert tasks == {'okvqa', 'tallyqa'} and fig8.model_options.text_only is False
  ranks = {c['overrides'].get('lora.rank') for c in fig8.sweep if c['overrides'].get('mode') == 'direct'}
  assert ranks == {1, 2, 4, 8, 16, 32}
  post = [c for c in fig8.sweep if c['overrides'].get('mode') == 'post_squeeze']
  assert post and all(tuple(c['overrides']['target_ranks']) == (1, 2, 4, 8, 16) for c in post)
  table8 = _load_config('vl', 'artefact=table8')
  modes = {c['overrides'].get('mode') for c in table8.sweep}
  assert {'zero_shot', 'direct', 'post_squeeze', 'cont_squeeze', 'in_squeeze'} <= modes
  assert {c['overrides']['data.task'] for c in table8.sweep} == set(data.VL_TASK_NAMES)
  assert _load_config('vl', 'artefact=fig9').model_options.text_only is False


def test_vl_results_through_the_experiment_scripts(okvqa_dir, tmp_path):
  """VL runs land in a results store like text runs, and the experiments/ scripts read them (Fig. 9 here:
  the Post-Squeeze gain over direct training, checked against the two records)."""
  from lora_squeeze import sweep  # pylint: disable=g-import-not-at-top

  config = _load_config('vl', f'runlocal,task=okvqa,data_dir={okvqa_dir}')
  config.sweep = [
      {'name': 'd2', 'overrides': {'mode': 'direct', 'lora.rank': 2}},
      {'name': 'd1', 'overrides': {'mode': 'direct', 'lora.rank': 1}},
      {'name': 'p2', 'overrides': {'mode': 'post_squeeze', 'source_workdir': '@d2', 'target_ranks': (1,)}},
  ]
  records = sweep.run_sweep(config, tmp_path / 'store')
  assert all(r['status'] == 'ok' for r in records.values()), records
  path = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'fig4_heatmap.py'
  spec = importlib.util.spec_from_file_location('fig4_heatmap', path)
  fig4 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fig4)
  assert fig4.main(['--results', str(tmp_path / 'store'), '--out', str(tmp_path / 'out')]) == 0
  gain = 100 * (
      records['p2']['result']['targets']['1']['metrics']['accuracy'] - records['d1']['result']['metrics']['accuracy']
  )
  md = (tmp_path / 'out' / 'fig4_heatmap.md').read_text()
  row = next(line for line in md.splitlines() if line.startswith('| 2 |'))
  assert row.split('|')[2].strip() == f'{gain:+.1f}' and 'okvqa' in md
