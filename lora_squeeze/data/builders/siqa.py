"""TFDS builder `social_iqa`: Social IQa (Sap et al., 2019), multiple choice.

TFDS has Social IQa only as text-to-text `unified_qa/social_iqa`. Raw data:
the authors' https://storage.googleapis.com/ai2-mosaic/public/socialiqa/socialiqa-train-dev.zip
(linked from https://leaderboard.allenai.org/socialiqa): `train.jsonl` +
`train-labels.lst` and `dev.jsonl` + `dev-labels.lst`; each jsonl line has
context, question, answerA, answerB, answerC, and the matching .lst line the
correct answer 1, 2 or 3.

Splits: `train` (33,410), `validation` (the dev set, 1,954; the test labels
are not public). Features: context, question, answerA/B/C, label (ClassLabel
names '1', '2', '3', i.e. index 0..2).
"""

from __future__ import annotations

import json

import tensorflow_datasets as tfds

_URL = 'https://storage.googleapis.com/ai2-mosaic/public/socialiqa/socialiqa-train-dev.zip'
_SPLITS = {'train': 'train', 'validation': 'dev'}


class SocialIqa(tfds.core.GeneratorBasedBuilder):
  """Social IQa with its three answers and the gold label."""

  name = 'social_iqa'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (lora_squeeze).'}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                'context': text,
                'question': text,
                'answerA': text,
                'answerB': text,
                'answerC': text,
                'label': tfds.features.ClassLabel(names=['1', '2', '3']),
            }
        ),
        homepage='https://leaderboard.allenai.org/socialiqa',
        citation=(
            '@inproceedings{sap2019socialiqa, title={Social IQa: Commonsense '
            'Reasoning about Social Interactions}, author={Sap, Maarten and '
            'Rashkin, Hannah and Chen, Derek and Le Bras, Ronan and Choi, '
            'Yejin}, booktitle={EMNLP}, year={2019}}'
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.download_and_extract(_URL)
    out = {}
    for split, stem in _SPLITS.items():
      # The zip holds a `socialiqa-train-dev/` folder; accept the root too.
      # (epath refuses recursive '**' globs.)
      found = sorted(root.glob(f'{stem}.jsonl')) or sorted(root.glob(f'*/{stem}.jsonl'))
      if not found:
        raise FileNotFoundError(f'No {stem}.jsonl under {root}.')
      jsonl = found[0]
      out[split] = self._generate_examples(jsonl, jsonl.parent / f'{stem}-labels.lst')
    return out

  def _generate_examples(self, jsonl, labels_path):
    rows = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    labels = [x.strip() for x in labels_path.read_text().splitlines() if x.strip()]
    if len(rows) != len(labels):
      raise ValueError(f'{jsonl.name} has {len(rows)} rows but ' f'{labels_path.name} {len(labels)} labels.')
    for i, (row, label) in enumerate(zip(rows, labels)):
      yield f'{jsonl.stem}/{i}', {
          'context': row['context'],
          'question': row['question'],
          'answerA': row['answerA'],
          'answerB': row['answerB'],
          'answerC': row['answerC'],
          'label': label,
      }
