"""evaluate.py: tree-packed choice scoring equals one-sequence-per-choice full-vocabulary scoring; metrics;
the real Gemma 3 270M's zero-shot accuracy on offline held-out data."""

import jax
import numpy as np
import pytest

from lora_squeeze import evaluate
from lora_squeeze import lora
from lora_squeeze import models
from lora_squeeze.data import tasks


@pytest.fixture(scope="module")
def tiny():
  return models.load("tiny")


def _examples():
  return [
      tasks.Example(
          prompt="Question: what is two plus two?\nAnswer:",
          answers=(0,),
          target=" four",
          choices=(" four", " five hundred and six", " 4"),
      ),
      tasks.Example(prompt="The sky is", choices=(" blue", " green"), answers=(1,), target=" blue"),
      tasks.Example(prompt="x", choices=(" a", " bb", " ccc", " dddd"), answers=(2, 3), target=" ccc"),
  ]


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("max_len", [1024, 64])  # 64: the first example's choices need two rows
def test_tree_packed_scores_equal_separate_full_vocab_scores(tiny, with_lora, max_len):
  lp = cfg = None
  if with_lora:
    cfg = lora.LoRAConfig(rank=4)
    lp = lora.init_lora(jax.random.key(0), tiny.config, cfg)
    lp = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lp)
  exs = _examples()
  rows = evaluate.pack_example(0, exs[0], tiny.tokenizer, max_len)
  assert len(rows) == (2 if max_len == 64 else 1)
  got = evaluate.ChoiceScorer(tiny, lp, cfg, max_len=max_len, batch_rows=2).score(exs)
  want = evaluate.full_vocab_choice_scores(tiny, exs, lora_params=lp, lora_config=cfg)
  for (sums, counts), ref, ex in zip(got, want, exs):
    assert counts.tolist() == [len(tiny.tokenizer.encode(c)) for c in ex.choices]
    np.testing.assert_allclose(sums, ref, rtol=2e-6, atol=1e-5)
  # LoRA changes the scores (the test would not notice a dropped adapter otherwise).
  if with_lora:
    base = evaluate.ChoiceScorer(tiny, max_len=max_len).score(exs)
    assert max(np.abs(b[0] - g[0]).max() for b, g in zip(base, got)) > 1e-3


def test_partial_scoring_scores_only_the_rest_after_the_context(tiny):
  """WinoGrande's partial scoring: each choice is option + rest; only the rest's tokens are scored, given
  the option. Checked against a hand computation with gemma's own forward."""
  ex = tasks.get_task("winogrande").format(
      {
          "sentence": b"The cup fell off the table because _ was slippery.",
          "option1": b"the cup",
          "option2": b"the table",
          "label": 1,
      }
  )
  assert ex.choice_context == (" the cup", " the table")
  ((sums, counts),) = evaluate.ChoiceScorer(tiny, max_len=128).score([ex])
  tok = tiny.tokenizer
  rest = tok.encode(" was slippery.")
  assert counts.tolist() == [len(rest), len(rest)]
  for k, ctx in enumerate(ex.choice_context):
    ids = [tok.bos_id] + list(tok.encode(ex.prompt)) + list(tok.encode(ctx)) + list(rest)
    logits = np.asarray(tiny.transformer.apply({"params": tiny.params}, np.asarray([ids])).logits[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    start = len(ids) - len(rest)
    want = sum(logp[i - 1, ids[i]] for i in range(start, len(ids)))
    np.testing.assert_allclose(sums[k], want, rtol=2e-6, atol=1e-5)
  full = evaluate.ChoiceScorer(tiny, max_len=128).score([tasks.Example(ex.prompt, ex.choices, ex.answers, ex.target)])
  assert full[0][1].tolist() == [len(tok.encode(c)) for c in ex.choices]  # without context: every token


def test_tree_mask_hides_other_choices():
  branch = np.array([[1, 1, 2, 2, 3, 3, 0]])
  mask = np.asarray(evaluate.tree_attention_mask(branch))[0]
  assert mask[4].tolist() == [True, True, False, False, True, False, False]  # choice 1 sees prompt + itself
  assert mask[3].tolist() == [True, True, True, True, False, False, False]
  assert not mask[6].any()


def test_accuracy_metrics_and_intervals(tiny):
  exs = _examples()
  m = evaluate.evaluate_examples(tiny, "arc_e", exs, max_len=256)
  scores = evaluate.ChoiceScorer(tiny, max_len=256).score(exs)
  want = np.mean([int(np.argmax(s)) in ex.answers for (s, _), ex in zip(scores, exs)])
  assert m["accuracy"] == pytest.approx(want) and m["n"] == 3
  # Held-out NLL: the gold choice's per-token NLL (the best-scored gold of a multi-gold example), from the
  # full-vocabulary reference scores; per-example values in order.
  ref = evaluate.full_vocab_choice_scores(tiny, exs)
  counts = [[len(tiny.tokenizer.encode(c)) for c in ex.choices] for ex in exs]
  nll = [min(-ref[i][g] / counts[i][g] for g in ex.answers) for i, ex in enumerate(exs)]
  np.testing.assert_allclose(m["per_example"]["gold_nll"], nll, rtol=1e-4)
  assert m["gold_nll"] == pytest.approx(np.mean(nll), rel=1e-4)
  assert m["gold_nll_sem"] == pytest.approx(np.std(nll, ddof=1) / np.sqrt(3), rel=1e-3)
  assert m["per_example"]["correct"] == [int(int(np.argmax(s)) in ex.answers) for (s, _), ex in zip(scores, exs)]
  assert m["chance"] == pytest.approx((1 / 3 + 1 / 2 + 2 / 4) / 3)
  lo, hi = evaluate.wilson_interval(56, 100)
  assert (round(lo, 4), round(hi, 4)) == (0.4623, 0.6533)  # Wilson 95% for 56/100 (z = 1.96)
  assert evaluate.wilson_interval(0, 10)[0] == 0.0 and evaluate.wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_exact_match_f1():
  assert evaluate.exact_match_f1("The 3 dogs", ["3 dogs"]) == (1.0, 1.0)
  em, f1 = evaluate.exact_match_f1("three big dogs", ["3 dogs", "big dogs"])
  assert em == 0.0 and f1 == pytest.approx(0.8)
  assert evaluate.exact_match_f1("", ["x"]) == (0.0, 0.0)


def test_generative_eval_runs_greedy_decoding(tiny):
  ex = tasks.Example(
      prompt="Passage: a\nQuestion: b\nAnswer:", choices=(), answers=(), target=" 7", references=(" 7", "seven")
  )
  m = evaluate.evaluate_examples(tiny, "drop", [ex], max_new_tokens=4, max_len=128)
  assert m["metric"] == "generative" and 0.0 <= m["f1"] <= 1.0 and m["n"] == 1
  out = evaluate.greedy_generate(tiny, ["abc"], max_new_tokens=3, stop="")
  assert len(tiny.tokenizer.encode(out[0])) <= 3


@pytest.mark.slow
def test_real_270m_zero_shot_above_chance():
  """The real Gemma 3 270M (pretrained) on the offline held-out parts. Measured on the full held-out
  sets (experiments/results/eval_speed.md); here the first 120 examples of each to keep CI short."""
  from lora_squeeze import data

  model = models.load("gemma3_270m")
  results = {}
  for task in ("arc_e", "piqa", "winogrande"):
    exs = data.eval_examples(task, "offline_heldout", limit=120)
    results[task] = evaluate.evaluate_examples(model, task, exs, max_len=512)
    print(task, results[task])
  # ARC-E (4 choices) and PIQA (2) are clearly above chance for the 270M even on 120 examples. WinoGrande
  # (partial scoring) is 57.5% on these 120, too few for a 95% interval above 50%; on the whole held-out
  # part (643 examples) it is 55.8% [52.0, 59.6] (closing note of issue 5), so here its point estimate
  # must beat chance.
  assert results["arc_e"]["ci95"][0] > results["arc_e"]["chance"]
  assert results["piqa"]["ci95"][0] > results["piqa"]["chance"]
  assert results["winogrande"]["accuracy"] > results["winogrande"]["chance"] == 0.5


def test_scored_bucket_bounds_padding_and_shapes():
  from lora_squeeze.evaluate import _scored_bucket

  sizes = [_scored_bucket(n) for n in range(1, 2049)]
  for n, s in zip(range(1, 2049), sizes):
    assert n <= s and s - n <= max(7, n // 8), (n, s)  # padding: at most 7 rows, or 1/8 of the rows
  assert len(set(sizes)) <= 8 + 8 * 8  # eight shapes per octave above 64
