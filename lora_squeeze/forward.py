"""The forward pass every caller uses: hidden states with or without LoRA (images optional), logits at chosen
positions, and ONE greedy decoder for text and vision-language evaluation.

``Forward(model, lora_config)`` is built once per (model, LoRA layout); its methods are pure functions of the
params (jit them, or call them inside a jitted step):

* ``hidden(lora_params, base_params, tokens, positions=, attention_mask=, images=, image_embeddings=,
  remat=)``: the final-norm hidden states (B, T, D); ``lora_params=None`` (or a Forward built without a
  LoRA config) runs the base model alone.
* ``logits_at(base_params, h)``: vocabulary logits of selected hidden states, with the model's soft-cap.
* ``next_token(...)``: one greedy step over whole rows, logits only at each row's last token.

The trainer (``trainer.Trainer``), the choice scorer (``evaluate.ChoiceScorer``) and ``greedy_decode``
(``evaluate.greedy_generate`` for text, ``evaluate.generate_vl`` with images) all go through it; the pieces
without LoRA live in ``gemma_forward.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_squeeze import gemma_forward
from lora_squeeze import lora as lora_lib

Array = jax.Array


class Forward:
  """The model's forward pass with LoRA (``lora_config`` given) or without it.

  Attributes:
    transformer: the gemma transformer.
    module: the ``lora.LoRA`` wrapper, or None without a LoRA config.
    softcap: the model's final logit soft-cap (None: none).
  """

  def __init__(self, model, lora_config: lora_lib.LoRAConfig | None = None):
    self.transformer = model.transformer
    self.softcap = getattr(model.config, "final_logit_softcap", None)
    self.module = None if lora_config is None else lora_lib.LoRA(model=model.transformer, config=lora_config)

  def hidden(
      self,
      lora_params,
      base_params,
      tokens: Array,
      *,
      positions: Array,
      attention_mask: Array,
      images: Array | None = None,
      image_embeddings: Array | None = None,
      remat: bool = False,
  ) -> Array:
    """Final-norm hidden states (B, T, D); see ``gemma_forward.base_hidden_states`` for the arguments."""
    kwargs = dict(
        positions=positions,
        attention_mask=attention_mask,
        images=images,
        image_embeddings=image_embeddings,
        remat=remat,
    )
    if self.module is None or lora_params is None:
      return self.transformer.apply({"params": base_params}, tokens, method=gemma_forward.base_hidden_states, **kwargs)
    params = lora_lib.merge_params(base_params, lora_params)
    return self.module.apply({"params": params}, tokens, method=self.module.hidden_states, **kwargs)

  def logits_at(self, base_params, h: Array) -> Array:
    """Vocabulary logits of hidden states ``h`` (..., D), float32, soft-capped as the model's."""
    return gemma_forward.logits_at(h, base_params["embedder"]["input_embedding"], softcap=self.softcap)

  def embed_images(self, base_params, images: Array) -> Array:
    """Images (B, N, H, W, 3) uint8 → their soft tokens (B, N, P, D): the frozen vision tower, run once."""
    return self.transformer.apply({"params": base_params}, images, method=gemma_forward.encode_images)

  def next_token(self, lora_params, base_params, tokens, positions, segment_ids, last, image_embeddings=None):
    """One greedy step: the forward over whole rows (B, T), the arg-max token at each row's ``last`` index."""
    mask = gemma_forward.attention_mask_from_segments(segment_ids, tokens=None if image_embeddings is None else tokens)
    hidden = self.hidden(
        lora_params,
        base_params,
        tokens,
        positions=positions,
        attention_mask=mask,
        image_embeddings=image_embeddings,
    )
    h = hidden[jnp.arange(hidden.shape[0]), last]
    return jnp.argmax(self.logits_at(base_params, h), -1)


def bucket(n: int, multiple: int) -> int:
  """``n`` rounded up to a multiple of ``multiple`` (a few row lengths → a few compiled programs)."""
  return max(multiple, -(-int(n) // multiple) * multiple)


def greedy_decode(
    next_token: Callable,
    batches: Iterable[tuple[Sequence[Sequence[int]], tuple]],
    *,
    batch_rows: int,
    eos_id: int,
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    stop: str = "\n",
) -> list[str]:
  """Greedy continuations of token prompts, one batch of at most ``batch_rows`` rows per forward (no KV
  cache: one forward of the whole rows per new token; evaluation answers are a few tokens). Each row stops
  at ``eos_id`` or once its decoded text holds ``stop``; the text is cut at ``stop``.

  ``batches`` yields (prompts, extra): the token prompts of one batch and the extra arguments of its step
  (the image embeddings of a vision-language batch; () for text), produced lazily, batch by batch.
  ``next_token(tokens, positions, segment_ids, last, *extra)`` is the jitted step (``Forward.next_token``
  with the params bound). Rows are padded to a multiple of 64 tokens, so a few lengths compile.
  """
  outs: list[str] = []
  for prompts, extra in batches:
    chunk = [list(p) for p in prompts]
    t = bucket(max(len(p) for p in chunk) + max_new_tokens, 64)
    new: list[list[int]] = [[] for _ in chunk]
    done = [False] * len(chunk)
    for _ in range(max_new_tokens):
      tokens = np.zeros((batch_rows, t), np.int32)
      segs = np.zeros((batch_rows, t), np.int32)
      positions = np.zeros((batch_rows, t), np.int32)
      last = np.zeros(batch_rows, np.int32)
      for i, (seq, gen) in enumerate(zip(chunk, new)):
        row = seq + gen
        tokens[i, : len(row)], segs[i, : len(row)] = row, 1
        positions[i, : len(row)] = np.arange(len(row))
        last[i] = len(row) - 1
      nxt = np.asarray(next_token(tokens, positions, segs, last, *extra))
      for i in range(len(chunk)):
        if done[i]:
          continue
        if int(nxt[i]) == eos_id:
          done[i] = True
          continue
        new[i].append(int(nxt[i]))
        if stop and stop in decode(new[i]):
          done[i] = True
      if all(done):
        break
    for gen in new:
      text = decode(gen)
      outs.append(text.split(stop)[0] if stop else text)
  return outs
