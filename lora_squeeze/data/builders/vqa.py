"""TFDS builders of our own for the ten vision-language QA sets (`data.vqa`).

TFDS has none of them; big_vision keeps builders for most (okvqa, tallyqa,
textvqa, vqa, aokvqa, gqa, vizwizvqa, chartqa, science_qa), each with its own
features and hard-coded local paths. Ours share ONE schema, so one formatter
serves every open-ended set, read the raw files from TFDS's `manual_dir`, and
never import TensorFlow (images are stored as the original JPEG/PNG bytes;
only non-RGB or rotated images are re-encoded, as PNG, with PIL):

  image        the picture (decoded by `tfds.data_source` to uint8 H x W x 3)
  image_id     the dataset's image id (text)
  question_id  the dataset's question id (text; unique within a split)
  question     the question
  answers      every human answer (VQA sets: ten, repeats kept: the metric
               counts them), or the one gold answer
  choices      the options of a multiple-choice question (ScienceQA), else []
  context      ScienceQA's hint, else ''
  subset       VQAv2/OK-VQA answer type, TallyQA simple/complex (test),
               ChartQA human/augmented, else ''

Prepare (after downloading the raw files, see each builder's
MANUAL_DOWNLOAD_INSTRUCTIONS; RAW may hold one sub-folder per dataset, named
like the builder, e.g. RAW/okvqa/, or the files themselves):

  tfds build okvqa --imports=lora_squeeze.data.builders --file_format=array_record --manual_dir=RAW

or in Python: `tfds.builder("okvqa").download_and_prepare(
file_format="array_record", download_config=tfds.download.DownloadConfig(
manual_dir=RAW))`. The COCO images that VQAv2, OK-VQA, A-OKVQA and TallyQA
share can be one folder linked into each dataset's folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Iterator

from etils import epath
from PIL import Image
import tensorflow_datasets as tfds

_VERSION = tfds.core.Version('1.0.0')
_RELEASE_NOTES = {'1.0.0': 'Initial release (lora_squeeze).'}


def _features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text()
  return tfds.features.FeaturesDict(
      {
          'image': tfds.features.Image(shape=(None, None, 3)),
          'image_id': text,
          'question_id': text,
          'question': text,
          'answers': tfds.features.Sequence(text),
          'choices': tfds.features.Sequence(text),
          'context': text,
          'subset': text,
      }
  )


def _root(manual_dir: epath.Path, name: str) -> epath.Path:
  """RAW/<name>/ if it exists, else RAW itself."""
  sub = manual_dir / name
  return sub if sub.is_dir() else manual_dir


def _read_json(path: epath.Path) -> Any:
  if not path.exists():
    raise FileNotFoundError(
        f"{path} is missing: download the raw files as the builder's"
        ' MANUAL_DOWNLOAD_INSTRUCTIONS say and pass their folder as'
        ' --manual_dir.'
    )
  return json.loads(path.read_text())


def _image_bytes(path: epath.Path, rotation: int = 0) -> bytes:
  """The image file's bytes, or a PNG re-encoding when it is not RGB JPEG/PNG
  or must be rotated (by `rotation` degrees counter-clockwise)."""
  if not path.exists():
    raise FileNotFoundError(
        f"Image {path} is missing: see the builder's" ' MANUAL_DOWNLOAD_INSTRUCTIONS for where the images go.'
    )
  if rotation % 90:
    raise ValueError(f'{path}: rotation {rotation} is not a multiple of 90.')
  data = path.read_bytes()
  with Image.open(io.BytesIO(data)) as image:
    if image.mode == 'RGB' and image.format in ('JPEG', 'PNG') and not rotation:
      return data
    image = image.convert('RGB')
    if rotation:
      image = image.rotate(rotation, expand=True)
    out = io.BytesIO()
    image.save(out, format='PNG')
  return out.getvalue()


def _row(
    *,
    image: epath.Path,
    question_id: Any,
    question: str,
    answers: list[str],
    image_id: Any = '',
    choices: tuple[str, ...] | list[str] = (),
    context: str = '',
    subset: str = '',
    rotation: int = 0,
) -> dict[str, Any]:
  return dict(
      image=image,
      image_id=str(image_id),
      question_id=str(question_id),
      question=question,
      answers=[str(a) for a in answers],
      choices=list(choices),
      context=context or '',
      subset=subset or '',
      rotation=rotation,
  )


class _VlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared schema and generation; subclasses list SPLITS and read rows."""

  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  HOMEPAGE = ''
  CITATION = ''
  # TFDS split -> what `_rows` needs to find that split in the raw files.
  SPLITS: dict[str, Any] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(), homepage=self.HOMEPAGE, citation=self.CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = _root(epath.Path(dl_manager.manual_dir), self.name)
    return {split: self._generate_examples(root, source) for split, source in self.SPLITS.items()}

  def _generate_examples(self, root: epath.Path, source: Any):
    seen = set()
    for row in self._rows(root, source):
      key = row['question_id']
      if key in seen:
        raise ValueError(f'{self.name}/{source}: question id {key} twice.')
      seen.add(key)
      image = _image_bytes(epath.Path(row.pop('image')), row.pop('rotation'))
      yield key, {**row, 'image': image}

  def _rows(self, root: epath.Path, source: Any) -> Iterator[dict[str, Any]]:
    raise NotImplementedError


class _VqaV2FormatBuilder(_VlBuilder, skip_registration=True):
  """The VQAv2 file format (VQAv2, OK-VQA): a questions file, an annotations file with the ten answers,
  COCO images in a folder named like the split's source (e.g. train2014). Subclasses name the two files
  (`QUESTIONS`, `ANNOTATIONS`: patterns with `{source}`)."""

  QUESTIONS = ''
  ANNOTATIONS = ''

  def _rows(self, root: epath.Path, source: Any) -> Iterator[dict[str, Any]]:
    questions, annotations = self.QUESTIONS.format(source=source), self.ANNOTATIONS.format(source=source)
    by_id = {a['question_id']: a for a in _read_json(root / annotations)['annotations']}
    for q in _read_json(root / questions)['questions']:
      ann = by_id.get(q['question_id'])
      if ann is None:
        raise ValueError(f'{annotations}: no answers for question {q["question_id"]}.')
      yield _row(
          image=root / source / f'COCO_{source}_{int(q["image_id"]):012d}.jpg',
          image_id=q['image_id'],
          question_id=q['question_id'],
          question=q['question'],
          answers=[a['answer'] for a in ann['answers']],
          subset=ann.get('answer_type', ''),
      )


class Vqav2(_VqaV2FormatBuilder):
  """VQAv2 (Goyal et al., 2017) on COCO 2014 images."""

  name = 'vqav2'
  HOMEPAGE = 'https://visualqa.org/'
  CITATION = (
      '@inproceedings{goyal2017making, title={Making the V in VQA '
      'Matter}, author={Goyal, Yash and others}, booktitle={CVPR}, '
      'year={2017}}'
  )
  SPLITS = {'train': 'train2014', 'validation': 'val2014'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://visualqa.org/download.html and https://cocodataset.org, into
  RAW/vqav2/ (or RAW/): v2_OpenEnded_mscoco_{train,val}2014_questions.json,
  v2_mscoco_{train,val}2014_annotations.json, and the folders train2014/,
  val2014/ of COCO images (COCO_train2014_000000000009.jpg, ...).
  """

  QUESTIONS = 'v2_OpenEnded_mscoco_{source}_questions.json'
  ANNOTATIONS = 'v2_mscoco_{source}_annotations.json'


class Okvqa(_VqaV2FormatBuilder):
  """OK-VQA (Marino et al., 2019): outside-knowledge VQA on COCO 2014."""

  name = 'okvqa'
  HOMEPAGE = 'https://okvqa.allenai.org/'
  CITATION = (
      '@inproceedings{marino2019okvqa, title={OK-VQA: A Visual '
      'Question Answering Benchmark Requiring External Knowledge}, '
      'author={Marino, Kenneth and Rastegari, Mohammad and Farhadi, '
      'Ali and Mottaghi, Roozbeh}, booktitle={CVPR}, year={2019}}'
  )
  SPLITS = {'train': 'train2014', 'validation': 'val2014'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://okvqa.allenai.org/download.html (unzipped) and
  https://cocodataset.org, into RAW/okvqa/ (or RAW/):
  OpenEnded_mscoco_{train,val}2014_questions.json,
  mscoco_{train,val}2014_annotations.json, and the COCO image folders
  train2014/, val2014/.
  """

  QUESTIONS = 'OpenEnded_mscoco_{source}_questions.json'
  ANNOTATIONS = 'mscoco_{source}_annotations.json'


class Aokvqa(_VlBuilder):
  """A-OKVQA (Schwenk et al., 2022), its ten direct answers; COCO 2017."""

  name = 'aokvqa'
  HOMEPAGE = 'https://allenai.org/project/a-okvqa/home'
  CITATION = (
      '@inproceedings{schwenk2022aokvqa, title={A-OKVQA: A Benchmark '
      'for Visual Question Answering using World Knowledge}, '
      'author={Schwenk, Dustin and others}, booktitle={ECCV}, '
      'year={2022}}'
  )
  SPLITS = {'train': 'train', 'validation': 'val'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  aokvqa_v1p0.tar.gz from https://github.com/allenai/aokvqa (extracted) and
  COCO 2017 images, into RAW/aokvqa/ (or RAW/): aokvqa_v1p0_{train,val}.json
  and the folders train2017/, val2017/ (000000000009.jpg, ...).
  """

  def _rows(self, root, source):
    for r in _read_json(root / f'aokvqa_v1p0_{source}.json'):
      yield _row(
          image=root / f'{source}2017' / f'{int(r["image_id"]):012d}.jpg',
          image_id=r['image_id'],
          question_id=r['question_id'],
          question=r['question'],
          answers=r['direct_answers'],
      )


def _rotations(folder: epath.Path) -> dict[str, int]:
  """OpenImages' rotation table (ImageID -> degrees), if the folder has one."""
  path = folder / 'rotation.csv'
  if not path.exists():
    return {}
  out = {}
  for row in csv.DictReader(io.StringIO(path.read_text())):
    value = (row.get('Rotation') or '').strip()
    degrees = float(value) if value else 0.0
    out[row['ImageID']] = 0 if math.isnan(degrees) else int(degrees)
  return out


class Textvqa(_VlBuilder):
  """TextVQA (Singh et al., 2019): questions about text in OpenImages."""

  name = 'textvqa'
  HOMEPAGE = 'https://textvqa.org/'
  CITATION = (
      '@inproceedings{singh2019towards, title={Towards VQA Models '
      'That Can Read}, author={Singh, Amanpreet and others}, '
      'booktitle={CVPR}, year={2019}}'
  )
  SPLITS = {'train': 'train', 'validation': 'val'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://textvqa.org/dataset, into RAW/textvqa/ (or RAW/):
  TextVQA_0.5.1_{train,val}.json and train_val_images.zip extracted to
  train_images/ (validation images are in it too). Optional: OpenImages'
  train-images-boxable-with-rotation.csv saved as train_images/rotation.csv;
  rotated images are then turned upright (as big_vision's builder does).
  """

  def _rows(self, root, source):
    rotations = _rotations(root / 'train_images')
    for r in _read_json(root / f'TextVQA_0.5.1_{source}.json')['data']:
      image_id = str(r['image_id'])
      yield _row(
          image=root / 'train_images' / f'{image_id}.jpg',
          image_id=image_id,
          question_id=r['question_id'],
          question=r['question'],
          answers=r['answers'],
          rotation=rotations.get(image_id, 0),
      )


class VizwizVqa(_VlBuilder):
  """VizWiz-VQA (Gurari et al., 2018): questions from blind people."""

  name = 'vizwiz_vqa'
  HOMEPAGE = 'https://vizwiz.org/tasks-and-datasets/vqa/'
  CITATION = (
      '@inproceedings{gurari2018vizwiz, title={VizWiz Grand '
      'Challenge: Answering Visual Questions from Blind People}, '
      'author={Gurari, Danna and others}, booktitle={CVPR}, '
      'year={2018}}'
  )
  SPLITS = {'train': 'train', 'validation': 'val'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://vizwiz.org/tasks-and-datasets/vqa/, into RAW/vizwiz_vqa/ (or
  RAW/): Annotations.zip extracted to annotations/{train,val}.json and the
  images train.zip, val.zip extracted to train/, val/.
  """

  def _rows(self, root, source):
    for r in _read_json(root / 'annotations' / f'{source}.json'):
      # A few train answers are empty strings: dropped (as big_vision).
      answers = [a['answer'] for a in r['answers'] if a['answer']]
      yield _row(
          image=root / source / r['image'],
          image_id=r['image'],
          question_id=r['image'].rsplit('.', 1)[0],
          question=r['question'],
          answers=answers,
      )


class Tallyqa(_VlBuilder):
  """TallyQA (Acharya et al., 2019): counting, on Visual Genome and COCO."""

  name = 'tallyqa'
  HOMEPAGE = 'https://github.com/manoja328/TallyQA_dataset'
  CITATION = (
      '@inproceedings{acharya2019tallyqa, title={TallyQA: Answering '
      'Complex Counting Questions}, author={Acharya, Manoj and Kafle, '
      'Kushal and Kanan, Christopher}, booktitle={AAAI}, year={2019}}'
  )
  SPLITS = {'train': 'train', 'test': 'test'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  tallyqa.zip from https://github.com/manoja328/TallyQA_dataset (extracted:
  train.json, test.json) into RAW/tallyqa/ (or RAW/), and the images where
  the JSON's relative paths point from there: Visual Genome's VG_100K/,
  VG_100K_2/ and COCO's train2014/, val2014/.
  """

  def _rows(self, root, source):
    for r in _read_json(root / f'{source}.json'):
      subset = ''
      if 'issimple' in r:  # Test only.
        subset = 'simple' if r['issimple'] else 'complex'
      yield _row(
          image=root / r['image'],
          image_id=r['image_id'],
          question_id=r['question_id'],
          question=r['question'],
          answers=[str(int(r['answer']))],
          subset=subset,
      )


class Gqa(_VlBuilder):
  """GQA (Hudson and Manning, 2019), its balanced question sets."""

  name = 'gqa'
  HOMEPAGE = 'https://cs.stanford.edu/people/dorarad/gqa/'
  CITATION = (
      '@inproceedings{hudson2019gqa, title={GQA: A New Dataset for '
      'Real-World Visual Reasoning and Compositional Question '
      'Answering}, author={Hudson, Drew A and Manning, Christopher D},'
      ' booktitle={CVPR}, year={2019}}'
  )
  SPLITS = {'train': 'train_balanced', 'validation': 'val_balanced', 'testdev': 'testdev_balanced'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://cs.stanford.edu/people/dorarad/gqa/download.html, into RAW/gqa/
  (or RAW/): questions1.2.zip extracted ({train,val,testdev}_balanced_
  questions.json) and images.zip extracted to images/.
  """

  def _rows(self, root, source):
    for qid, r in _read_json(root / f'{source}_questions.json').items():
      yield _row(
          image=root / 'images' / f'{r["imageId"]}.jpg',
          image_id=r['imageId'],
          question_id=qid,
          question=r['question'],
          answers=[r['answer']],
      )


class Chartqa(_VlBuilder):
  """ChartQA (Masry et al., 2022), human and augmented questions together."""

  name = 'chartqa'
  HOMEPAGE = 'https://github.com/vis-nlp/ChartQA'
  CITATION = (
      '@inproceedings{masry2022chartqa, title={ChartQA: A Benchmark '
      'for Question Answering about Charts with Visual and Logical '
      'Reasoning}, author={Masry, Ahmed and others}, booktitle={ACL '
      'Findings}, year={2022}}'
  )
  SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  "ChartQA Dataset.zip" from https://github.com/vis-nlp/ChartQA, extracted
  into RAW/chartqa/ (or RAW/): {train,val,test}/{split}_human.json,
  {split}_augmented.json and {split}/png/ (the zip's top folder may stay).
  """

  def _rows(self, root, source):
    folders = [root / source] + sorted(root.glob(f'*/{source}'))
    folder = next((f for f in folders if f.is_dir()), root / source)
    found = False
    for subset in ('human', 'augmented'):
      path = folder / f'{source}_{subset}.json'
      if not path.exists():
        continue
      found = True
      for i, r in enumerate(_read_json(path)):
        yield _row(
            image=folder / 'png' / r['imgname'],
            image_id=r['imgname'],
            question_id=f'{subset}/{i}',
            question=r['query'],
            answers=[str(r['label'])],
            subset=subset,
        )
    if not found:
      raise FileNotFoundError(f'No {source}_human.json or {source}_augmented.json under {folder}.')


class Scienceqa(_VlBuilder):
  """ScienceQA (Lu et al., 2022), the questions that come with an image."""

  name = 'scienceqa'
  HOMEPAGE = 'https://scienceqa.github.io/'
  CITATION = (
      '@inproceedings{lu2022learn, title={Learn to Explain: '
      'Multimodal Reasoning via Thought Chains for Science Question '
      'Answering}, author={Lu, Pan and others}, booktitle={NeurIPS}, '
      'year={2022}}'
  )
  SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://scienceqa.github.io/#download, into RAW/scienceqa/ (or RAW/):
  problems.json and the image folders {train,val,test}/<problem id>/image.png
  (also accepted under images/). Problems without an image are skipped.
  """

  def _rows(self, root, source):
    for pid, r in _read_json(root / 'problems.json').items():
      if r.get('split') != source or not r.get('image'):
        continue
      image = root / source / pid / r['image']
      if not image.exists():
        image = root / 'images' / source / pid / r['image']
      yield _row(
          image=image,
          image_id=pid,
          question_id=pid,
          question=r['question'],
          choices=r['choices'],
          answers=[r['choices'][int(r['answer'])]],
          context=r.get('hint') or '',
      )


class Ocrvqa(_VlBuilder):
  """OCR-VQA (Mishra et al., 2019): questions about book covers."""

  name = 'ocrvqa'
  HOMEPAGE = 'https://ocr-vqa.github.io/'
  CITATION = (
      '@inproceedings{mishra2019ocrvqa, title={OCR-VQA: Visual '
      'Question Answering by Reading Text in Images}, author={Mishra, '
      'Anand and Shekhar, Shashank and Singh, Ajeet Kumar and '
      'Chakraborty, Anirban}, booktitle={ICDAR}, year={2019}}'
  )
  SPLITS = {'train': 1, 'validation': 2, 'test': 3}  # dataset.json's "split".
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://ocr-vqa.github.io/, into RAW/ocrvqa/ (or RAW/): dataset.json
  and the covers its loadDataset.py downloads into images/ (<id>.jpg).
  """

  def _rows(self, root, source):
    images = {p.name.rsplit('.', 1)[0]: p for p in (root / 'images').iterdir()}
    for book, r in _read_json(root / 'dataset.json').items():
      if int(r['split']) != source:
        continue
      if book not in images:
        raise FileNotFoundError(f'No image {book}.* under {root / "images"}.')
      for i, (q, a) in enumerate(zip(r['questions'], r['answers'])):
        yield _row(image=images[book], image_id=book, question_id=f'{book}/{i}', question=q, answers=[a])
