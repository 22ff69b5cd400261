"""Gemma 3's forward pass in pieces, without LoRA: hidden states (with images, optionally rematerialised),
the image encoder, attention masks for packed rows, and logits at chosen positions only.

gemma's ``Transformer.__call__`` always projects every position onto the 262k-token vocabulary, which is
most of a forward on the small Gemmas; training and scoring need logits at a few positions (answer and
choice tokens). These functions stop at the final norm and project only what is asked. ``lora.LoRA``
runs ``base_hidden_states`` under its interceptor to add the adapters; ``forward.Forward`` is the one
entry point the trainer, the scorer and the greedy decoder use.
"""

from __future__ import annotations

from flax import linen as nn
from gemma.gm.utils import _attention_mask
from gemma.gm.vision import _token_utils
from gemma.multimodal import vision as gemma_vision
import jax
import jax.numpy as jnp

Array = jax.Array
IMAGE_PLACEHOLDER = gemma_vision.TOKEN_PLACEHOLDER


def base_hidden_states(
    model: nn.Module,
    tokens: Array,
    *,
    positions: Array,
    attention_mask: Array,
    images: Array | None = None,
    image_embeddings: Array | None = None,
    remat: bool = False,
) -> Array:
  """gemma ``Transformer.__call__`` up to the final norm (no cache, no logits), with optional images.

  Use as ``transformer.apply({"params": base}, tokens, positions=..., attention_mask=...,
  method=base_hidden_states)`` for the model without LoRA. Mirrors gemma 3.3.0's ``__call__`` (embed, blocks,
  final norm); ``tests/test_lora.py`` checks it against the library's own ``return_hidden_states``.

  Images: ``tokens`` already hold ``IMAGE_PLACEHOLDER`` ids where gemma's ``__call__`` would insert them
  (each ``<start_of_image>`` expanded to ``\\n\\n <start_of_image> placeholder… <end_of_image> \\n\\n``), and
  ``attention_mask`` lets each image's soft tokens see each other (``attention_mask_from_segments(...,
  tokens=tokens)``). ``images`` (B, N, H, W, 3) uint8 go through gemma's ``_encode_vision`` (resize to the
  encoder's size, SigLIP, projector); ``image_embeddings`` (B, N, P, D), that output computed once
  (``encode_images``), skip it (greedy decoding). The soft tokens replace the placeholders' embeddings
  through gemma's ``merge_embeddings``; ``tests/test_vl.py`` checks the result against gemma's own
  ``__call__(tokens, images=...)``.

  ``remat=True`` runs each block under ``nn.remat`` (``jax.checkpoint``): a gradient then keeps only each
  block's input and recomputes the block's activations in the backward pass, so the activation memory of a
  train step goes from every layer's intermediates to one layer's plus a (B, T, D) residual per layer, for
  about one more forward of compute. Same values (up to XLA's float reassociation); no effect without a
  gradient.
  """
  inputs = model._encode_and_get_inputs(  # pylint: disable=protected-access
      tokens=tokens, positions=positions, attention_mask=attention_mask
  )
  if images is not None or image_embeddings is not None:
    if model.config.vision_encoder is None:
      raise ValueError(
          "images given to a model without a vision encoder; load the multimodal model "
          "(models.load(name, text_only=False))"
      )
    if image_embeddings is None:
      image_embeddings = model._encode_vision(images)  # pylint: disable=protected-access
    merged = _token_utils.merge_embeddings(
        text_embeddings=inputs.embeddings,
        vision_embeddings=image_embeddings.astype(inputs.embeddings.dtype),
        mask=tokens == IMAGE_PLACEHOLDER,
    )
    inputs = inputs.replace(embeddings=merged)
  if not remat:
    x, _ = model._apply_attention(inputs, None)  # pylint: disable=protected-access
    return x
  # gemma's ``_apply_attention`` (3.3.0) with each block rematerialised.
  x = inputs.embeddings
  for block in model.blocks:
    x = _remat_block(block, x, inputs.positions, inputs.attention_mask)
  return model.final_norm(x)


def _block_output(block: nn.Module, x: Array, positions: Array, attention_mask: Array) -> Array:
  _, x = block(x, positions, None, attention_mask)  # (no KV cache)
  return x


_remat_block = nn.remat(_block_output)


def encode_images(model: nn.Module, images: Array) -> Array:
  """Images (B, N, H, W, 3) uint8 -> their soft tokens in the text embedding space (B, N, P, D).

  gemma's ``Transformer._encode_vision`` (SigLIP + the multimodal projector, both frozen, no LoRA); use as
  ``transformer.apply({"params": base}, images, method=encode_images)`` and pass the result as
  ``image_embeddings`` to run the vision tower once for many forwards.
  """
  if model.config.vision_encoder is None:
    raise ValueError("encode_images: the model has no vision encoder (load it with text_only=False)")
  return model._encode_vision(images)  # pylint: disable=protected-access


def attention_mask_from_segments(segment_ids: Array, *, tokens: Array | None = None) -> Array:
  """(B, T) segment ids (0 = padding, 1..k = packed sequences) -> (B, T, T) causal, same-segment mask.

  Padding rows attend to nothing real; gemma's softmax then sees an all-masked row, which it handles (large
  negative logits, no NaN), and those positions are never read. gemma adds the sliding window itself.
  With ``tokens`` (B, T), the soft tokens of each image (runs of ``IMAGE_PLACEHOLDER``) also attend to each
  other in both directions, as in gemma's own mask (``make_causal_bidirectional_attention_mask``).
  """
  seg = jnp.asarray(segment_ids)
  t = seg.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  same = (seg[..., :, None] == seg[..., None, :]) & (seg[..., None, :] > 0)
  mask = same & causal
  if tokens is not None:
    mask = _attention_mask._add_bidirectional_mask(  # pylint: disable=protected-access
        mask, jnp.asarray(tokens) == IMAGE_PLACEHOLDER
    )
  return mask


def logits_at(hidden: Array, embedding: Array, *, softcap: float | None = None) -> Array:
  """Vocabulary logits for selected hidden states (..., D) with the tied embedding (V, D), as gemma's
  ``Embedder.decode`` plus the optional final soft-cap; computed in float32."""
  return _softcap(jnp.dot(hidden.astype(jnp.float32), embedding.astype(jnp.float32).T), softcap)


def target_logits(hidden: Array, embedding: Array, targets: Array, *, softcap: float | None = None) -> Array:
  """The logit of one given token per hidden state: ``logits_at(hidden)[i, targets[i]]`` for hidden (N, D),
  targets (N,), from the targets' embedding rows only (no vocabulary-wide product)."""
  rows = embedding[targets].astype(jnp.float32)
  return _softcap(jnp.einsum("nd,nd->n", hidden.astype(jnp.float32), rows), softcap)


def _softcap(logits: Array, softcap: float | None) -> Array:
  return logits if softcap is None else jnp.tanh(logits / softcap) * softcap
