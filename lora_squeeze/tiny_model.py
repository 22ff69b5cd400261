"""The "tiny" model: a random Gemma 3 architecture at toy size, for tests and the quickstart.

`tiny_config(text_only=..., **overrides)` is a gemma `TransformerConfig` with
every Gemma 3 feature (GQA, QK norm, pre/post norms, gated GELU MLP, local
sliding-window and global layers, tied embeddings) at the sizes of
TINY_DEFAULTS; `text_only=False` adds gemma's SigLIP vision encoder at the
sizes of TINY_VISION_DEFAULTS (`tiny_vision_encoder`). `random_params` draws
its weights with numpy from gemma's initial distributions, without compiling
anything. `models.load("tiny")` puts these together with a byte tokenizer.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
from gemma import gm
from gemma.multimodal import vision as gemma_vision
from gemma.multimodal import vision_utils
import jax.numpy as jnp
import numpy as np

from lora_squeeze import param_trees

# The "tiny" architecture. Small enough that init + forward take milliseconds,
# yet every Gemma 3 feature is present: GQA (4 query heads share 2 KV heads),
# QK norm, pre/post norms, gated GELU MLP, local sliding-window AND global
# attention layers with their two rope frequencies, tied embeddings.
TINY_DEFAULTS = {
    'num_layers': 4,
    'embed_dim': 64,
    'hidden_dim': 128,
    'num_heads': 4,
    'num_kv_heads': 2,
    'head_dim': 16,
    'vocab_size': 512,
    'sliding_window_size': 8,
}
# Local, global, local, global: a 2-layer period (Gemma 3 uses 5 local then 1
# global) so that even a 2-layer tiny model has both kinds.
TINY_ATTENTION_PATTERN = ('LOCAL_SLIDING', 'GLOBAL')

# The vision tower of the multimodal tiny model (`text_only=False`): gemma's
# SigLIP ViT and its exit pooling at toy size. (image_size / patch_size)^2
# patch tokens are average-pooled to `image_tokens` soft tokens, as the real
# encoder pools 4096 patch tokens to 256.
TINY_VISION_DEFAULTS = {
    'image_size': 32,
    'patch_size': 8,
    'vision_width': 32,
    'vision_depth': 2,
    'vision_heads': 2,
    'vision_mlp_dim': 64,
    'image_tokens': 4,
}


def tiny_vision_encoder(**overrides: int) -> Any:
  """gemma's `SigLiPFromPatches` at the tiny sizes of TINY_VISION_DEFAULTS."""
  unknown = sorted(set(overrides) - set(TINY_VISION_DEFAULTS))
  if unknown:
    raise ValueError(f'Unknown tiny vision options {unknown}; known:' f' {sorted(TINY_VISION_DEFAULTS)}.')
  o = {**TINY_VISION_DEFAULTS, **overrides}
  side, patch = o['image_size'], o['patch_size']
  tokens = o['image_tokens']
  if side % patch:
    raise ValueError(f'tiny vision: image_size={side} must be a multiple of' f' patch_size={patch}.')
  grid, pooled = side // patch, int(round(tokens**0.5))
  if pooled * pooled != tokens or grid % pooled:
    raise ValueError(
        f'tiny vision: image_tokens={tokens} must be a square whose side'
        f' divides the {grid}x{grid} patch grid (average pooling).'
    )
  if o['vision_width'] % o['vision_heads']:
    raise ValueError(
        f'tiny vision: vision_width={o["vision_width"]} must be a multiple of' f' vision_heads={o["vision_heads"]}.'
    )
  return gemma_vision.SigLiPFromPatches(
      siglip_encoder=vision_utils.ViTModel(
          patch_size=(patch, patch),
          width=o['vision_width'],
          depth=o['vision_depth'],
          mlp_dim=o['vision_mlp_dim'],
          num_heads=o['vision_heads'],
      ),
      siglip_exit=gemma_vision.VisionExit(output_length=tokens),
      num_mm_tokens_per_image_prepool=grid * grid,
      num_mm_tokens_per_image=tokens,
      image_height=side,
      image_width=side,
  )


def tiny_config(*, text_only: bool = True, **overrides: int) -> Any:
  """The gemma `TransformerConfig` of the random "tiny" model.

  Args:
    text_only: False adds the tiny vision encoder (`tiny_vision_encoder`).
    **overrides: TINY_DEFAULTS keys, and TINY_VISION_DEFAULTS keys when
      `text_only=False`.
  """
  vision = {k: v for k, v in overrides.items() if k in TINY_VISION_DEFAULTS}
  overrides = {k: v for k, v in overrides.items() if k not in vision}
  unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
  if unknown:
    raise ValueError(
        f'Unknown tiny-model options {unknown}; known: {sorted(TINY_DEFAULTS)}'
        f' (and, with text_only=False, {sorted(TINY_VISION_DEFAULTS)}).'
    )
  if vision and text_only:
    raise ValueError(f'tiny model: vision options {sorted(vision)} need text_only=False.')
  o = {**TINY_DEFAULTS, **overrides}
  if o['num_heads'] % o['num_kv_heads']:
    raise ValueError(
        f'tiny model: num_heads={o["num_heads"]} must be a multiple of' f' num_kv_heads={o["num_kv_heads"]}.'
    )
  return gm.nn.config.TransformerConfig(
      final_logit_softcap=None,
      num_embed=o['vocab_size'],
      embed_dim=o['embed_dim'],
      hidden_dim=o['hidden_dim'],
      num_heads=o['num_heads'],
      head_dim=o['head_dim'],
      num_kv_heads=o['num_kv_heads'],
      use_post_attn_norm=True,
      use_post_ffw_norm=True,
      use_qk_norm=True,
      attention_types=gm.nn.config.make_attention_layers_types(
          tuple(gm.nn.AttentionType[k] for k in TINY_ATTENTION_PATTERN),
          num_layers=o['num_layers'],
      ),
      query_pre_attn_norm=(gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM),
      attn_logits_soft_cap=None,
      sliding_window_size=o['sliding_window_size'],
      transpose_gating_einsum=True,
      local_base_frequency=10_000,
      global_base_frequency=1_000_000,
      vision_encoder=None if text_only else tiny_vision_encoder(**vision),
  )


def random_params(shapes: Any, seed: int) -> Any:
  """Random params for the abstract tree `shapes`: gemma's initial distributions, drawn with numpy.

  normal(stddev=0.01) for embeddings and einsum kernels, zeros for RMSNorm
  scales; for the SigLIP tower flax's LayerNorm ones/zeros and 1/sqrt(fan-in)
  kernels (`_vision_init`). No XLA compile: on the 2-core CPU the compile of
  gemma's jitted `init` takes ~10 s (XLA's threefry bit generation compiles
  slowly), which would dominate every unit test.
  """
  rng = np.random.default_rng(seed)
  flat = param_trees.flatten(shapes)
  out = {}
  for key in sorted(flat):  # Sorted: the draw order must not depend on dicts.
    s = flat[key]
    if key.startswith('vision_encoder/'):
      value = _vision_init(key, s.shape, rng)
    elif key.endswith('/scale'):  # RMSNorm: zeros_init (gemma scales by 1 + s)
      value = np.zeros(s.shape, np.float32)
    else:  # Embedder and Einsum: nn.initializers.normal() (stddev 1e-2)
      value = rng.normal(0.0, 1e-2, s.shape).astype(np.float32)
    out[key] = jnp.asarray(value, dtype=s.dtype)
  return traverse_util.unflatten_dict(out, sep='/')


def _vision_init(key: str, shape: tuple[int, ...], rng: Any) -> np.ndarray:
  """SigLIP (flax nn.LayerNorm / Dense / Conv / attention) initial values.

  LayerNorm scale ones and biases zeros (as flax), kernels normal with std
  1/sqrt(fan-in) (LeCun, the scale of flax's defaults), the learned position
  embedding normal(1/sqrt(width)) as gemma's ViT. A zero LayerNorm scale (the
  RMSNorm rule) would make every image encode to the same soft tokens.
  """
  name = key.rsplit('/', 1)[-1]
  if name == 'scale':
    return np.ones(shape, np.float32)
  if name == 'bias':
    return np.zeros(shape, np.float32)
  if name == 'pos_embedding':
    return rng.normal(0.0, shape[-1] ** -0.5, shape).astype(np.float32)
  # Attention query/key/value kernels are (width, heads, head_dim): fan-in is
  # the width; every other kernel contracts all but its last dim.
  attention_in = len(shape) == 3 and key.split('/')[-2] in ('query', 'key', 'value')
  fan_in = shape[0] if attention_in else int(np.prod(shape[:-1]))
  return rng.normal(0.0, fan_in**-0.5, shape).astype(np.float32)
