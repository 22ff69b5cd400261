"""The vision-language tasks: ten VQA sets, their prompts with the image, and their accuracies.

The paper's second body of evidence is "10 well-established vision-language (VL) QA tasks" on Gemma 3 4B IT
(Table 5 lists them, Table 8 and Figs. 8/9 report them), with LoRA on the text side only. Our copy of the
paper names only OK-VQA and TallyQA (Fig. 8; Table 5's footnotes: OK-VQA is evaluated on validation, TallyQA
has no validation split); the table's contents are missing. The ten below are our choice:

* the two it names, OK-VQA and TallyQA;
* the VQA sets of the PaliGemma / big_vision transfer suite, the Google-internal lineage the paper's Gemma 3
  stack comes from, that are scored by an ACCURACY (Table 8 reports "Accuracy %" for every task): VQAv2,
  A-OKVQA, TextVQA, VizWiz-VQA, GQA, ChartQA, ScienceQA (its image questions) and OCR-VQA;
* left out: ANLS-scored sets (DocVQA, InfoVQA, ST-VQA), AI2D (its images must be re-rendered with a font,
  big_vision's builder draws the replacement letters), captioning and referring expressions (not QA).

Every task reads our own TFDS builder (``lora_squeeze.data.builders.vqa``; TFDS has none of them), built
from the raw files the dataset authors publish (``tfds build NAME --imports=lora_squeeze.data.builders
--file_format=array_record --manual_dir=RAW``). All builders share one schema (image, question, answers,
choices, context, subset, ids), so one formatter serves the open-ended sets.

Per task (registry key: title; train split / eval split, the paper's rule "test where labelled, else dev";
metric):

* ``vqav2``: VQAv2; train / validation (test-dev answers are server-only); ``vqa_accuracy``.
* ``okvqa``: OK-VQA; train / validation (no public test, as the paper notes); ``vqa_accuracy``.
* ``aokvqa``: A-OKVQA, direct-answer; train / validation (test is hidden); ``vqa_accuracy``.
* ``textvqa``: TextVQA; train / validation (test is hidden); ``vqa_accuracy``.
* ``vizwiz_vqa``: VizWiz-VQA; train / validation (test is hidden); ``vqa_accuracy``.
* ``tallyqa``: TallyQA, simple and complex; train / test (no validation split, as the paper notes);
  ``vqa_exact_match`` on the count (the TallyQA paper's accuracy).
* ``gqa``: GQA balanced; train (train_balanced) / testdev (testdev_balanced, the labelled test); exact match.
* ``chartqa``: ChartQA, human and augmented; train / test; ``relaxed_accuracy`` (5% tolerance on numbers,
  ChartQA's metric).
* ``scienceqa``: ScienceQA, the questions with an image (IMG); train / test; the options are listed in the
  prompt, the target is the right option's text; ``vqa_exact_match``.
* ``ocrvqa``: OCR-VQA; train / test; ``vqa_exact_match``.

Prompt (one style for every VL task, the text tasks' "Question: ...\\nAnswer:" plus LLaVA-1.5's short-answer
instruction, so that the zero-shot base model of Table 8's "0-S" column is asked for the short answers that
these metrics score)::

  <start_of_image>Question: {question}
  Answer the question using a single word or phrase.
  Answer:

and the target " {answer}" (leading space, as the text tasks). ``<start_of_image>`` is
``types.IMAGE_MARKER``: the pipeline turns it into Gemma 3's image token block and feeds the image
(``pipeline.encode_example``). ScienceQA adds "Context: {hint}" before the question, lists the options
("Options: a | b | c") and asks "Answer with the text of one option.". The training target of a set with
several human answers is the most frequent one (the first of the tied); every answer stays in
``Example.references`` for the metric.

Metrics (``score``), on greedy-decoded answers (``evaluate.evaluate_examples``):

* ``vqa_accuracy``: VQAv2's: min(#humans who gave the answer / 3, 1), averaged over the ten leave-one-out
  subsets of the ten human answers, after the official answer processing (``normalize_answer``:
  punctuation, periods not in decimals, lower case, number words to digits, articles, contractions).
  visualqa.org/evaluation describes that processing as applied to every answer; the official script applies
  it only when the ten answers disagree (``official_script=True`` reproduces that shortcut exactly).
* ``vqa_exact_match``: the processed prediction equals a processed reference.
* ``relaxed_accuracy``: ChartQA's: a numeric answer within 5% of the reference counts (a trailing "%" is read
  as a percentage); otherwise exact match, case-insensitive.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Mapping, Sequence

import numpy as np

from lora_squeeze.data.types import as_text
from lora_squeeze.data.types import Example
from lora_squeeze.data.types import IMAGE_MARKER
from lora_squeeze.data.types import InvalidExampleError
from lora_squeeze.data.types import Task

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_ANSWER = "Answer with the text of one option."
VL_METRICS = ("vqa_accuracy", "vqa_exact_match", "relaxed_accuracy")


# --------------------------------------------------------------------------------------------------------
# VQA answer processing (the official VQA evaluation script, vqaEval.py).
# --------------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern, kept verbatim: "(?!<=\d)" is a lookahead (not the intended lookbehind), so every
# period not followed by a digit is removed ("1.5" keeps its period, "no." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _clean(text: str) -> str:
  return str(text).replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: a mark touching a space (or any text with a digit,digit comma) is deleted,
  otherwise replaced by a space; then periods that are not decimal points are deleted."""
  out = text
  for mark in _PUNCTUATION:
    if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  # The official call passes re.UNICODE (= 32) as the count: at most 32 periods are removed.
  return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lower case, number words to digits, no articles, contractions."""
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(word)
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
  """The VQA evaluation's answer processing: "Two dogs." -> "2 dogs", "The cat's" -> "cat's"."""
  return _process_digit_article(_process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, official_script: bool = False) -> float:
  """VQAv2 accuracy of one predicted answer against the human answers (usually ten).

  min(#matching humans / 3, 1), averaged over the leave-one-out subsets (each human answer left out in
  turn), as visualqa.org's evaluation; both sides processed by ``normalize_answer``. ``official_script``:
  process only when the human answers disagree, as the official script does (so "Yes." scores 0 against ten
  "yes"). With a single human answer there is no leave-one-out: exact match.

  Raises:
    ValueError: no human answers.
  """
  answers = [_clean(a) for a in answers]
  if not answers:
    raise ValueError("vqa_accuracy: no human answers to compare with.")
  pred = _clean(prediction)
  if not official_script or len(set(answers)) > 1:
    answers = [normalize_answer(a) for a in answers]
    pred = normalize_answer(pred)
  if len(answers) == 1:
    return float(pred == answers[0])
  scores = []
  for i in range(len(answers)):
    matches = sum(a == pred for j, a in enumerate(answers) if j != i)
    scores.append(min(1.0, matches / 3.0))
  return float(np.mean(scores))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1.0 if the processed prediction equals any processed reference (``normalize_answer``), else 0.0."""
  if not answers:
    raise ValueError("exact_match: no reference answers.")
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(a) for a in answers))


def _to_float(text: str) -> float | None:
  text = text.strip()
  try:
    if text.endswith("%"):
      return float(text[:-1]) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, max_relative_error: float = 0.05) -> float:
  """ChartQA's relaxed accuracy, maximised over the references.

  A numeric prediction is right within ``max_relative_error`` of a nonzero numeric reference (a trailing
  "%" divides by 100, on both sides); anything else needs an exact, case-insensitive match.
  """
  if not answers:
    raise ValueError("relaxed_accuracy: no reference answers.")
  pred = _clean(prediction)
  pred_value = _to_float(pred)
  for ref in answers:
    ref = _clean(ref)
    ref_value = _to_float(ref)
    if pred_value is not None and ref_value:
      if abs(pred_value - ref_value) / abs(ref_value) <= max_relative_error:
        return 1.0
    elif pred.lower() == ref.lower():
      return 1.0
  return 0.0


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
  """One example's score in [0, 1] under a VL metric (``VL_METRICS``)."""
  if metric == "vqa_accuracy":
    return vqa_accuracy(prediction, references)
  if metric == "vqa_exact_match":
    return exact_match(prediction, references)
  if metric == "relaxed_accuracy":
    return relaxed_accuracy(prediction, references)
  raise ValueError(f"Unknown vision-language metric {metric!r}; known: {VL_METRICS}.")


# --------------------------------------------------------------------------------------------------------
# Records of our builders -> Examples.
# --------------------------------------------------------------------------------------------------------


def _texts(values: Any) -> list[str]:
  return [as_text(v) for v in np.asarray(values, dtype=object).reshape(-1)]


def _image(value: Any, what: str) -> np.ndarray:
  image = np.asarray(value)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:  # Grey.
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise InvalidExampleError(f"{what}: expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}.")
  return image


def training_answer(answers: Sequence[str]) -> str:
  """The answer a model is trained to give: the most frequent human answer, the first of the tied."""
  counts = collections.Counter(answers)
  best = max(counts.values())
  return next(a for a in answers if counts[a] == best)


def vl_prompt(question: str, *, context: str = "", options: Sequence[str] = ()) -> str:
  """The VL prompt (see the module docstring): image marker, optional context, question, instruction."""
  parts = [f"{IMAGE_MARKER}"]
  if context:
    parts.append(f"Context: {context}\n")
  parts.append(f"Question: {question}\n")
  if options:
    parts.append("Options: " + " | ".join(options) + "\n")
    parts.append(f"{OPTION_ANSWER}\nAnswer:")
  else:
    parts.append(f"{SHORT_ANSWER}\nAnswer:")
  return "".join(parts)


def _open_ended(r: Mapping[str, Any], what: str) -> Example:
  question = as_text(r["question"]).strip()
  answers = tuple(a.strip() for a in _texts(r["answers"]) if a.strip())
  if not question or not answers:
    raise InvalidExampleError(f"{what}: a question and at least one answer are needed.")
  return Example(vl_prompt(question), (), (), " " + training_answer(answers), answers, image=_image(r["image"], what))


def _multiple_choice(r: Mapping[str, Any], what: str) -> Example:
  question = as_text(r["question"]).strip()
  options = [o.strip() for o in _texts(r["choices"])]
  answers = tuple(a.strip() for a in _texts(r["answers"]) if a.strip())
  if not question or len(options) < 2 or len(answers) != 1 or answers[0] not in options:
    raise InvalidExampleError(
        f"{what}: needs a question, >= 2 options and one answer among them; got {len(options)} options,"
        f" answers {answers}."
    )
  prompt = vl_prompt(question, context=as_text(r["context"]).strip(), options=options)
  return Example(prompt, (), (), " " + answers[0], answers, image=_image(r["image"], what))


class _Formatter:
  """A picklable record -> Example function (grain may pickle sources) that names its task in errors."""

  def __init__(self, fn, what: str):
    self.fn, self.what = fn, what

  def __call__(self, record: Mapping[str, Any]) -> Example:
    return self.fn(record, self.what)


_BUILDERS = "lora_squeeze.data.builders"


def _task(name: str, title: str, train: str, eval_split: str, metric: str, fn=_open_ended) -> Task:
  return Task(
      name=name,
      title=title,
      tfds_name=name,
      train_split=train,
      eval_split=eval_split,
      metric=metric,
      format_fn=_Formatter(fn, title),
      tfds_module=_BUILDERS,
      manual_dir=True,
  )


VL_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _task("vqav2", "VQAv2", "train", "validation", "vqa_accuracy"),
        _task("okvqa", "OK-VQA", "train", "validation", "vqa_accuracy"),
        _task("aokvqa", "A-OKVQA", "train", "validation", "vqa_accuracy"),
        _task("textvqa", "TextVQA", "train", "validation", "vqa_accuracy"),
        _task("vizwiz_vqa", "VizWiz-VQA", "train", "validation", "vqa_accuracy"),
        _task("tallyqa", "TallyQA", "train", "test", "vqa_exact_match"),
        _task("gqa", "GQA", "train", "testdev", "vqa_exact_match"),
        _task("chartqa", "ChartQA", "train", "test", "relaxed_accuracy"),
        _task("scienceqa", "ScienceQA-IMG", "train", "test", "vqa_exact_match", _multiple_choice),
        _task("ocrvqa", "OCR-VQA", "train", "test", "vqa_exact_match"),
    )
}

VL_TASK_NAMES = tuple(VL_TASKS)

# Extra spellings accepted by tasks.get_task (after lower-casing, '-'/' ' -> '_').
VL_ALIASES = {
    "vqa": "vqav2",
    "vqa_v2": "vqav2",
    "ok_vqa": "okvqa",
    "a_okvqa": "aokvqa",
    "text_vqa": "textvqa",
    "vizwiz": "vizwiz_vqa",
    "vizwizvqa": "vizwiz_vqa",
    "tally_qa": "tallyqa",
    "chart_qa": "chartqa",
    "science_qa": "scienceqa",
    "scienceqa_img": "scienceqa",
    "ocr_vqa": "ocrvqa",
}
