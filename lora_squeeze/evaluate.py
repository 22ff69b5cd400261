"""Scoring-based evaluation: the log-likelihood of every choice, all choices of an example in one row.

How a batch is scored (``ChoiceScorer``): each example becomes ONE packed row

    BOS prompt… | choice 0 … | choice 1 … | … | pad

with an attention mask that makes it a tree: prompt tokens attend causally to the prompt, each choice's
tokens attend to the prompt and to the earlier tokens of the same choice only, and every choice's positions
continue from the end of the prompt (gemma's rope and sliding window read the explicit positions, so each
choice sees exactly what it would see alone after the prompt). The prompt is therefore run once for all
choices, and the vocabulary projection is computed only at the positions that predict a choice token: the
hidden state before each choice token is gathered and projected (``gemma_forward.logits_at``). A choice's score is
the sum of its tokens' log-probabilities; the predicted answer is the arg-max (``acc``), and the
length-normalised arg-max (mean log-probability per token, ``acc_norm``) is reported beside it, and so is
``gold_nll``: the gold choice's negative log-likelihood per token (nats; the best-scored gold for multi-label
tasks), the held-out counterpart of the training loss. It moves with training long before the arg-max does,
which is what a short CPU-scale run needs (experiments/claims.py); ``per_example`` keeps both per example.

Tokenisation is the training pipeline's (``data.pipeline.encode_example`` with ``continuation=choice``):
prompt and choice tokenised separately, so a choice is scored on exactly the tokens a model trained on
that target saw. A prompt too long for ``max_len`` is cut from the left (like training); examples whose
choices together do not fit one row are split over several rows (the prompt repeated).

Shapes are bucketed (row length to a power of two, scored positions to a multiple of 64) so a whole eval
compiles a handful of programs, not one per batch, while padding adds few projected rows.

Metrics per task (``evaluate_examples``): ``choice_accuracy``: acc; ``multilabel_choice_accuracy``
(GoEmotions): the top choice is one of the gold labels; ``generative`` (DROP): greedy decoding (no KV
cache: one forward per generated token, fine for short answers; ``max_new_tokens``) with exact match and
token F1 against the best reference. Accuracies come with a 95% Wilson score interval. Vision-language
tasks (``data.vqa``: VQA accuracy, exact match, ChartQA's relaxed accuracy) are scored on greedy answers
generated with their images (``generate_vl``; the vision tower runs once per batch).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import forward as forward_lib
from lora_squeeze import lora as lora_lib
from lora_squeeze import models
from lora_squeeze import sharding as sharding_lib
from lora_squeeze.data import pipeline
from lora_squeeze.data import tasks as tasks_lib
from lora_squeeze.data import vqa

PROMPT_BRANCH = 1  # branch ids: 0 padding, 1 the prompt, 2 + k choice k


# --------------------------------------------------------------------------------------------------------
# Packing examples into tree-masked rows.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
  tokens: list[int]
  positions: list[int]
  branch: list[int]
  # Scored tokens: (index of the predicting hidden state in the row, target token, (example, choice)).
  scored: list[tuple[int, int, tuple[int, int]]]


def _encode_choices(example, tokenizer, max_len: int) -> tuple[list[int], list[list[int]], list[int]]:
  """(prompt tokens with BOS, tokens of each choice, number of leading unscored tokens of each choice)."""
  prompt = None
  choices, unscored = [], []
  context = tuple(getattr(example, "choice_context", ()) or ())
  if context and len(context) != len(example.choices):
    raise ValueError(f"evaluate: {len(context)} choice_context entries for {len(example.choices)} choices")
  for k, choice in enumerate(example.choices):
    head = context[k] if context else ""
    if not choice.startswith(head):
      raise ValueError(f"evaluate: choice {choice!r} does not start with its context {head!r}")
    enc = pipeline.encode_example(example, tokenizer, 1 << 30, continuation=head or choice, add_eos=False)
    tokens, mask = enc["tokens"].tolist(), enc["loss_mask"]
    n_prompt = int(len(tokens) - mask.sum())
    if prompt is None:
      prompt = tokens[:n_prompt]
    if head:  # context and scored rest tokenised separately: the scored tokens are exactly the rest's
      rest = [int(t) for t in tokenizer.encode(choice[len(head) :])]
      if not rest:
        raise ValueError(f"evaluate: choice {choice!r} has nothing to score after its context {head!r}")
      choices.append(tokens[n_prompt:] + rest)
      unscored.append(len(tokens) - n_prompt)
    else:
      choices.append(tokens[n_prompt:])
      unscored.append(0)
  longest = max(len(c) for c in choices)
  if longest + 2 > max_len:
    raise ValueError(
        f"evaluate: a choice of {longest} tokens does not fit max_len={max_len} with BOS and "
        "one prompt token; raise config.data.max_len (or config.eval.max_len)"
    )
  # Keep BOS and the prompt's tail: the longest choice must fit after it.
  keep = min(len(prompt) - 1, max_len - longest - 1)
  prompt = prompt[:1] + prompt[len(prompt) - keep :] if keep < len(prompt) - 1 else prompt
  return prompt, choices, unscored


def pack_example(example_index: int, example, tokenizer, max_len: int) -> list[_Row]:
  """One example -> rows (usually one) holding the prompt once and as many choices as fit."""
  prompt, choices, unscored = _encode_choices(example, tokenizer, max_len)
  rows: list[_Row] = []
  row = None
  for k, choice in enumerate(choices):
    if row is None or len(row.tokens) + len(choice) > max_len:
      row = _Row(list(prompt), list(range(len(prompt))), [PROMPT_BRANCH] * len(prompt), [])
      rows.append(row)
    start = len(row.tokens)
    prev = len(prompt) - 1  # the first choice token is predicted from the last prompt token
    for j, tok in enumerate(choice):
      if j >= unscored[k]:
        row.scored.append((prev, int(tok), (example_index, k)))
      prev = start + j
    row.tokens.extend(int(t) for t in choice)
    row.positions.extend(range(len(prompt), len(prompt) + len(choice)))
    row.branch.extend([2 + k] * len(choice))
  return rows


def tree_attention_mask(branch: jax.Array) -> jax.Array:
  """(B, T) branch ids -> (B, T, T): causal, prompt visible to all, a choice only to itself."""
  t = branch.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  q, k = branch[..., :, None], branch[..., None, :]
  visible = (k == PROMPT_BRANCH) | (k == q)
  return causal & visible & (k > 0) & (q > 0)


def _scored_bucket(n: int) -> int:
  """Rows of the vocabulary projection for ``n`` scored positions: ``n`` rounded up to an eighth of its
  octave (multiple of 8 below 128, of 16 below 256, ...), so padding wastes at most 1/8 of the projection
  while the number of distinct shapes (compilations) grows only by 8 per doubling."""
  return forward_lib.bucket(n, max(8, 1 << max(0, n.bit_length() - 4)))


def pow2(n: int) -> int:
  return 1 << max(4, (n - 1).bit_length())


# --------------------------------------------------------------------------------------------------------
# The scorer.
# --------------------------------------------------------------------------------------------------------


class ChoiceScorer:
  """Summed log-likelihood of each choice of each example, for a model with (or without) LoRA.

  Args:
    model: a ``models.load`` result (transformer, params, tokenizer, config).
    lora_params: a LoRA tree (``lora.init_lora`` layout) or None for the base model.
    lora_config: its LoRAConfig (scale, targets) or None.
    max_len: the longest row.
    batch_rows: rows per forward pass.
    mesh: the mesh the base params are laid out on (default: read off ``model.params``); each forward pass
      then splits its rows over the mesh's batch axes (``sharding.row_sharding``).
  """

  def __init__(self, model, lora_params=None, lora_config=None, *, max_len: int = 1024, batch_rows: int = 8, mesh=None):
    self.model = model
    self.mesh = mesh if mesh is not None else sharding_lib.mesh_of(model.params)
    self.lora_params = lora_params
    self.max_len = int(max_len)
    self.batch_rows = int(batch_rows)
    if lora_params is not None and lora_config is None:
      raise ValueError("ChoiceScorer: lora_config is required with lora_params")
    self.forward = forward_lib.Forward(model, lora_config if lora_params is not None else None)
    self.traces = 0
    self.logit_rows = 0  # rows of vocabulary logits computed so far (scored positions + bucket padding)
    self.score_program = jax.jit(self._score_impl)  # public: lora_squeeze.aot lowers it from abstract shapes

  def _score_impl(self, lora_params, base_params, tokens, positions, branch, pred_idx, targets):
    self.traces += 1
    tokens, positions, branch = sharding_lib.split_rows(self.mesh, tokens, positions, branch)
    mask = tree_attention_mask(branch)
    hidden = self.forward.hidden(lora_params, base_params, tokens, positions=positions, attention_mask=mask)
    b, t, d = hidden.shape
    h = hidden.reshape(b * t, d)[pred_idx]  # (S, D): only the positions that predict a choice token
    logp = jax.nn.log_softmax(self.forward.logits_at(base_params, h), axis=-1)
    return sharding_lib.whole(self.mesh, jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0])

  def score(self, examples: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(summed log-prob per choice, token count per choice)] for each example."""
    rows = []
    for i, ex in enumerate(examples):
      if not ex.choices:
        raise ValueError(f"evaluate: example {i} has no choices (a generative task?); use generate()")
      rows.extend(pack_example(i, ex, self.model.tokenizer, self.max_len))
    sums = [np.zeros(len(ex.choices), np.float64) for ex in examples]
    counts = [np.zeros(len(ex.choices), np.int64) for ex in examples]
    # Longest rows first so buckets stay tight.
    rows.sort(key=lambda r: -len(r.tokens))
    for start in range(0, len(rows), self.batch_rows):
      chunk = rows[start : start + self.batch_rows]
      t = pow2(max(len(r.tokens) for r in chunk))
      bsz = self.batch_rows
      tokens = np.zeros((bsz, t), np.int32)
      positions = np.zeros((bsz, t), np.int32)
      branch = np.zeros((bsz, t), np.int32)
      pred, tgt, owner = [], [], []
      for r_i, r in enumerate(chunk):
        n = len(r.tokens)
        tokens[r_i, :n], positions[r_i, :n], branch[r_i, :n] = r.tokens, r.positions, r.branch
        for p, tok, who in r.scored:
          pred.append(r_i * t + p)
          tgt.append(tok)
          owner.append(who)
      s = _scored_bucket(len(pred))
      self.logit_rows += s
      pred_idx = np.zeros(s, np.int32)
      targets = np.zeros(s, np.int32)
      pred_idx[: len(pred)], targets[: len(tgt)] = pred, tgt
      logp = self.score_program(self.lora_params, self.model.params, tokens, positions, branch, pred_idx, targets)
      logp = np.asarray(sharding_lib.to_host(logp), np.float64)  # replicated; on several processes too
      for v, (ex_i, k) in zip(logp[: len(owner)], owner):
        sums[ex_i][k] += v
        counts[ex_i][k] += 1
    return list(zip(sums, counts))


def full_vocab_choice_scores(model, examples, *, lora_params=None, lora_config=None, max_len: int = 1024):
  """Reference scorer: each (example, choice) as its own sequence through gemma's ``__call__`` (full
  vocabulary logits at every position). Slow; for tests and the benchmark."""
  if lora_params is None:
    apply = jax.jit(lambda p, tok: model.transformer.apply({"params": p}, tok).logits)
    params = model.params
  else:
    module = lora_lib.LoRA(model=model.transformer, config=lora_config)
    apply = jax.jit(lambda p, tok: module.apply({"params": p}, tok).logits)
    params = lora_lib.merge_params(model.params, lora_params)
  out = []
  for ex in examples:
    sums = np.zeros(len(ex.choices))
    prompt, choices, unscored = _encode_choices(ex, model.tokenizer, max_len)
    for k, choice in enumerate(choices):
      tok = np.asarray(prompt + choice, np.int32)
      logits = np.asarray(apply(params, jnp.asarray(tok[None])), np.float64)[0]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      idx = np.arange(len(prompt) + unscored[k], len(tok))
      sums[k] = logp[idx - 1, tok[idx]].sum()
    out.append(sums)
  return out


# --------------------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion (well behaved near 0 and 1 and for small n)."""
  if n == 0:
    return (0.0, 1.0)
  p = correct / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


def _normalize_answer(text: str) -> str:
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match_f1(prediction: str, references: Sequence[str]) -> tuple[float, float]:
  """DROP/SQuAD-style exact match and bag-of-tokens F1, maximised over the references."""
  pred = _normalize_answer(prediction)
  best_em, best_f1 = 0.0, 0.0
  for ref in references:
    gold = _normalize_answer(ref)
    best_em = max(best_em, float(pred == gold))
    p_toks, g_toks = pred.split(), gold.split()
    common = collections.Counter(p_toks) & collections.Counter(g_toks)
    same = sum(common.values())
    if not p_toks or not g_toks:
      f1 = float(p_toks == g_toks)
    elif same == 0:
      f1 = 0.0
    else:
      precision, recall = same / len(p_toks), same / len(g_toks)
      f1 = 2 * precision * recall / (precision + recall)
    best_f1 = max(best_f1, f1)
  return best_em, best_f1


def greedy_generate(
    model,
    prompts: Sequence[str],
    *,
    lora_params=None,
    lora_config=None,
    max_new_tokens: int = 16,
    max_len: int = 1024,
    stop: str = "\n",
) -> list[str]:
  """Greedy continuation of each prompt, one prompt per forward (``forward.greedy_decode``: no KV cache, one
  forward per new token; stops at EOS / ``stop``). The prompt is cut from the left to fit ``max_len``."""
  tok = model.tokenizer
  if lora_params is not None and lora_config is None:
    raise ValueError("greedy_generate: lora_config is required with lora_params")
  fwd = forward_lib.Forward(model, lora_config if lora_params is not None else None)
  step = jax.jit(fwd.next_token)

  def batches():
    for prompt in prompts:
      ids = [tok.bos_id] + [int(t) for t in tok.encode(prompt)]
      yield [ids[:1] + ids[1:][-(max_len - max_new_tokens - 1) :]], ()

  return forward_lib.greedy_decode(
      lambda *args: step(lora_params, model.params, *args),
      batches(),
      batch_rows=1,
      eos_id=tok.eos_id,
      decode=tok.decode,
      max_new_tokens=max_new_tokens,
      stop=stop,
  )


def generate_vl(
    model,
    examples: Sequence[Any],
    *,
    lora_params=None,
    lora_config=None,
    max_new_tokens: int = 16,
    max_len: int = 1024,
    batch_rows: int = 8,
    stop: str = "\n",
) -> list[str]:
  """Greedy answers of a multimodal model to examples with images (``Example.image``), batch by batch.

  Each batch's images go through the frozen vision tower once (``forward.Forward.embed_images``); then one forward
  per new token over the whole batch (no KV cache: VQA answers are a few tokens), each row stopping at EOS
  or ``stop``. Prompts are encoded as in training (``pipeline.encode_example``: the image token block, the
  prompt's text cut from the left if ``max_len - max_new_tokens`` is exceeded).
  """
  spec = models.image_spec(model)
  if spec is None:
    raise ValueError("generate_vl: the model has no vision encoder; load it with text_only=False")
  if max_len <= max_new_tokens + 1:
    raise ValueError(f"generate_vl: max_len={max_len} leaves no room for a prompt and {max_new_tokens} new tokens")
  tok = model.tokenizer
  embed_images, next_token = vl_decode_programs(model, lora_params=lora_params, lora_config=lora_config)

  def batches():
    for start in range(0, len(examples), batch_rows):
      encoded = [
          pipeline.encode_example(ex, tok, max_len - max_new_tokens, continuation="", add_eos=False, image_spec=spec)
          for ex in examples[start : start + batch_rows]
      ]
      if any("images" not in e for e in encoded):
        raise ValueError("generate_vl: every example needs an image (Example.image)")
      images = np.zeros((batch_rows, *encoded[0]["images"].shape), np.uint8)  # padding rows: black images
      for i, e in enumerate(encoded):
        images[i] = e["images"]
      yield [list(e["tokens"]) for e in encoded], (embed_images(model.params, images),)

  return forward_lib.greedy_decode(
      lambda *args: sharding_lib.to_host(next_token(lora_params, model.params, *args)),
      batches(),
      batch_rows=batch_rows,
      eos_id=tok.eos_id,
      decode=tok.decode,
      max_new_tokens=max_new_tokens,
      stop=stop,
  )


def vl_decode_programs(model, *, lora_params=None, lora_config=None, mesh=None):
  """The two jitted programs of ``generate_vl``: ``embed_images(base, images)`` (the frozen vision tower,
  once per batch) and ``next_token(lora, base, tokens, positions, segment_ids, last, image_embeddings)`` (one
  greedy step: the forward over the whole rows, logits only at each row's last token). Separate so that
  ``lora_squeeze.aot`` lowers exactly these programs from abstract shapes. On a mesh (``mesh``, default: read
  off ``model.params``) each program splits its rows over the batch axes, as ``ChoiceScorer`` does."""
  if lora_params is not None and lora_config is None:
    raise ValueError("generate_vl: lora_config is required with lora_params")
  fwd = forward_lib.Forward(model, lora_config if lora_params is not None else None)
  mesh = mesh if mesh is not None else sharding_lib.mesh_of(model.params)

  def embed_images(base_params, images):
    (images,) = sharding_lib.split_rows(mesh, images)
    return sharding_lib.whole(mesh, fwd.embed_images(base_params, images))

  def next_token(lora_params, base_params, tokens, positions, segment_ids, last, image_embeddings=None):
    tokens, positions, segment_ids, last = sharding_lib.split_rows(mesh, tokens, positions, segment_ids, last)
    if image_embeddings is not None:
      (image_embeddings,) = sharding_lib.split_rows(mesh, image_embeddings)
    out = fwd.next_token(lora_params, base_params, tokens, positions, segment_ids, last, image_embeddings)
    return sharding_lib.whole(mesh, out)

  return jax.jit(embed_images), jax.jit(next_token)


def _vl_metrics(task, examples: Sequence[Any], preds: Sequence[str]) -> dict[str, Any]:
  """A vision-language task's metric (``data.vqa``: VQA accuracy, exact match or relaxed accuracy) on greedy
  answers (``generate_vl``). ``accuracy`` is the mean per-example score in [0, 1] with a normal-approximation
  95% interval (VQA accuracy takes fractional values); ``exact_match`` (processed answers) is reported too."""
  scores = np.asarray([vqa.score(task.metric, p, ex.references or (ex.target,)) for p, ex in zip(preds, examples)])
  exact = np.asarray([vqa.exact_match(p, ex.references or (ex.target,)) for p, ex in zip(preds, examples)])
  n = len(examples)
  mean = float(scores.mean())
  half = 1.959963984540054 * float(scores.std(ddof=1) if n > 1 else 0.0) / math.sqrt(n)
  return {
      "task": task.name,
      "metric": task.metric,
      "n": n,
      "accuracy": mean,
      "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
      "exact_match": float(exact.mean()),
      "correct": int((scores == 1.0).sum()),
      "predictions": preds[:8],
  }


def evaluate_examples(
    model,
    task,
    examples: Sequence[Any],
    *,
    lora_params=None,
    lora_config=None,
    max_len: int = 1024,
    batch_rows: int = 8,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
  """Metrics of one task on the given examples (see the module doc for each metric)."""
  task = tasks_lib.get_task(task) if isinstance(task, str) else task
  n = len(examples)
  if n == 0:
    raise ValueError(f"evaluate: no examples for task {task.name}")
  if task.metric in vqa.VL_METRICS:
    preds = generate_vl(
        model,
        examples,
        lora_params=lora_params,
        lora_config=lora_config,
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        batch_rows=batch_rows,
    )
    return _vl_metrics(task, examples, preds)
  if task.metric == "generative":
    preds = greedy_generate(
        model,
        [ex.prompt for ex in examples],
        lora_params=lora_params,
        lora_config=lora_config,
        max_new_tokens=max_new_tokens,
        max_len=max_len,
    )
    em_f1 = [exact_match_f1(p, ex.references or (ex.target,)) for p, ex in zip(preds, examples)]
    em = float(np.mean([e for e, _ in em_f1]))
    f1 = float(np.mean([f for _, f in em_f1]))
    return {
        "task": task.name,
        "metric": "generative",
        "n": n,
        "exact_match": em,
        "f1": f1,
        "accuracy": em,
        "ci95": list(wilson_interval(int(round(em * n)), n)),
    }
  scores = ChoiceScorer(model, lora_params, lora_config, max_len=max_len, batch_rows=batch_rows).score(examples)
  correct, correct_norm, gold_nll = [], [], []
  chance = 0.0
  for ex, (sums, counts) in zip(examples, scores):
    gold = sorted(set(ex.answers))
    correct.append(int(int(np.argmax(sums)) in gold))
    correct_norm.append(int(int(np.argmax(sums / np.maximum(counts, 1))) in gold))
    gold_nll.append(float(min(-sums[g] / max(counts[g], 1) for g in gold)))
    chance += len(gold) / len(ex.choices)
  nll = np.asarray(gold_nll)
  return {
      "task": task.name,
      "metric": task.metric,
      "n": n,
      "accuracy": sum(correct) / n,
      "ci95": list(wilson_interval(sum(correct), n)),
      "accuracy_norm": sum(correct_norm) / n,
      "chance": chance / n,
      "gold_nll": float(nll.mean()),
      "gold_nll_sem": float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
      # Per example, in ``examples`` order: paired comparisons of two adapters on the same examples
      # (experiments/claims.py) have far more power than their accuracies' intervals.
      "per_example": {"correct": correct, "gold_nll": [round(v, 5) for v in gold_nll]},
  }
