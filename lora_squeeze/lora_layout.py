"""Names and shapes of LoRA modules on Gemma 3's text projections (pure python, no arrays).

A LoRA module is named by its path ``layer_{i}/{attn|mlp}/{kind}_lora`` (``module_path``, ``module_kind``),
one kind per adapted projection (``KINDS``: q, k, v or joint kv, o, gate, up or joint gate_up, down). Its
factors are ``a (*input_dims, r)`` and ``b (r, *output_dims)``, the input / output dims being those of
gemma's einsum for that projection (``lora_shapes``; the table is in ``lora.py``'s docstring). A
``lora.LoRAConfig`` says which kinds and ranks; this module turns it into paths, shapes and a parameter
count, and is what ``lora.py``, ``lora_fuse.py``, ``aot.py`` and ``adapters/gemma_peft.py`` share.
It imports no flax or gemma code (``lora.py`` imports it, never the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import re

from lora_squeeze import squeeze

# All text projections, in the order used for paths and counts.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Every module kind a LoRA path can have (joint_kv -> "kv", joint_gate_up -> "gate_up").
KINDS = ("q", "k", "v", "kv", "o", "gate", "up", "gate_up", "down")
# The gemma module (attention or MLP) whose projection each kind adapts.
OWNER = {
    "q": "attn",
    "k": "attn",
    "v": "attn",
    "kv": "attn",
    "o": "attn",
    "gate": "mlp",
    "up": "mlp",
    "gate_up": "mlp",
    "down": "mlp",
}
_PATH_RE = re.compile(r"(?:^|/)layer_(\d+)/(attn|mlp)/(q|k|v|kv|o|gate|up|gate_up|down)_lora(?:/[ab])?$")


def module_kind(path: str) -> tuple[int, str]:
  """(layer index, kind) of a LoRA module path, e.g. ``'layer_3/mlp/gate_up_lora'`` -> (3, 'gate_up').

  Accepts a prefix (``params/layer_3/...``) and a trailing ``/a`` or ``/b``. Raises ValueError otherwise.
  """
  m = _PATH_RE.search(path)
  if m is None or OWNER[m.group(3)] != m.group(2):
    raise ValueError(
        f"not a LoRA module path: {path!r} (expected e.g. 'layer_0/attn/q_lora', "
        f"'layer_0/mlp/down_lora'; kinds {KINDS})"
    )
  return int(m.group(1)), m.group(3)


def module_path(layer: int, kind: str) -> str:
  """The canonical path of a LoRA module: ``layer_{layer}/{attn|mlp}/{kind}_lora``."""
  return f"layer_{layer}/{OWNER[kind]}/{kind}_lora"


def text_config(model_config):
  """A gemma TransformerConfig from a config or from a transformer module holding one."""
  cfg = getattr(model_config, "config", model_config)
  for field in ("embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim", "attention_types"):
    if not hasattr(cfg, field):
      raise TypeError(f"expected a gemma TransformerConfig (or a model with .config), got {type(cfg)}")
  return cfg


def _io_dims(cfg, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  d, f = cfg.embed_dim, cfg.hidden_dim
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return {
      "q": ((d,), (n, h)),
      "k": ((d,), (k, h)),
      "v": ((d,), (k, h)),
      "kv": ((d,), (2, k, h)),
      "o": ((n, h), (d,)),
      "gate": ((d,), (f,)),
      "up": ((d,), (f,)),
      "gate_up": ((d,), (2, f)),
      "down": ((f,), (d,)),
  }[kind]


def resolve_module_ranks(paths: Sequence[str], rank: int | Mapping[str, int]) -> dict[str, int]:
  """{path: rank} for every path; a mapping must cover every path and every key must match one."""
  paths = list(paths)
  try:
    ranks = squeeze.resolve_ranks(paths, rank)
  except ValueError as e:
    raise ValueError(f"LoRAConfig.rank: {e}") from None
  missing = [p for p, r in ranks.items() if r is None]
  if missing:
    raise ValueError(
        f"LoRAConfig.rank: no rank for LoRA module {missing[0]!r} ({len(missing)} modules "
        f"unmatched); add a key for it or a '*' default, keys are {list(rank)}"
    )
  return ranks


def lora_shapes(model_config, config) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{path: (a_shape, b_shape)} of every LoRA module (layer order, then ``config.kinds()`` order).

  ``model_config``: a gemma ``TransformerConfig`` or a transformer module (its ``.config``); ``config``: a
  ``lora.LoRAConfig`` (its ``kinds()`` and ``rank`` are read). Pure python.
  """
  cfg = text_config(model_config)
  paths = [module_path(i, kind) for i in range(cfg.num_layers) for kind in config.kinds()]
  ranks = resolve_module_ranks(paths, config.rank)
  out = {}
  for p in paths:
    _, kind = module_kind(p)
    in_dims, out_dims = _io_dims(cfg, kind)
    out[p] = ((*in_dims, ranks[p]), (ranks[p], *out_dims))
  return out


def lora_param_count(model_config, config) -> int:
  """Σ over modules of r · (prod(in_dims) + prod(out_dims))."""
  return sum(math.prod(a) + math.prod(b) for a, b in lora_shapes(model_config, config).values())
