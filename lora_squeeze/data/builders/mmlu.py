"""TFDS builder `mmlu`: Hendrycks et al.'s MMLU with its auxiliary train set.

Raw data: the authors' tarball https://people.eecs.berkeley.edu/~hendrycks/data.tar
(the link in github.com/hendrycks/test). It extracts to `data/` with
`auxiliary_train/*.csv` (ARC, OBQA, RACE, MCTest, ... reformatted; 99,842 rows)
and `dev|val|test/{subject}_{dev|val|test}.csv` (57 subjects). Every CSV has no
header and the columns question, A, B, C, D, answer (a letter).

Splits: `train` = auxiliary_train (the paper fine-tunes on it: MMLU has no
train set), `dev` (5 per subject, few-shot exemplars), `validation`, `test`.
Features: question, choices (the 4 options), answer (ClassLabel A-D), subject
("" for auxiliary_train, whose files are source datasets, not subjects).
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

_URL = 'https://people.eecs.berkeley.edu/~hendrycks/data.tar'
_SPLITS = {'train': 'auxiliary_train', 'dev': 'dev', 'validation': 'val', 'test': 'test'}


def _find_data_dir(root) -> os.PathLike:
  """The extracted `data/` folder (tolerates an extra top-level folder)."""
  for candidate in (root / 'data', root):
    if (candidate / 'test').is_dir():
      return candidate
  found = [p for p in root.glob('*/data') if (p / 'test').is_dir()]
  if not found:
    raise FileNotFoundError(f'No MMLU data/test folder under {root}.')
  return found[0]


class Mmlu(tfds.core.GeneratorBasedBuilder):
  """MMLU (57 subjects) with the auxiliary train set as `train`."""

  name = 'mmlu'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (lora_squeeze).'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                'question': tfds.features.Text(),
                'choices': tfds.features.Sequence(tfds.features.Text()),
                'answer': tfds.features.ClassLabel(names=['A', 'B', 'C', 'D']),
                'subject': tfds.features.Text(),
            }
        ),
        homepage='https://github.com/hendrycks/test',
        citation=(
            '@article{hendryckstest2021, title={Measuring Massive Multitask '
            'Language Understanding}, author={Dan Hendrycks and Collin Burns '
            'and Steven Basart and Andy Zou and Mantas Mazeika and Dawn Song '
            'and Jacob Steinhardt}, journal={ICLR}, year={2021}}'
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data = _find_data_dir(dl_manager.download_and_extract(_URL))
    return {split: self._generate_examples(data / folder, folder) for split, folder in _SPLITS.items()}

  def _generate_examples(self, folder, folder_name: str):
    suffix = f'_{folder_name}.csv'
    for path in sorted(folder.glob('*.csv')):
      subject = ''
      if folder_name != 'auxiliary_train' and path.name.endswith(suffix):
        subject = path.name[: -len(suffix)]
      with path.open() as f:
        for i, row in enumerate(csv.reader(f)):
          if len(row) != 6 or row[5].strip() not in ('A', 'B', 'C', 'D'):
            raise ValueError(f'{path}:{i + 1}: expected question,A,B,C,D,' f'answer; got {len(row)} fields.')
          yield f'{folder_name}/{path.name}/{i}', {
              'question': row[0],
              'choices': row[1:5],
              'answer': row[5].strip(),
              'subject': subject,
          }
