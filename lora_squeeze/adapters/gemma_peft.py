"""Gemma 3 LoRAs in and out: our tree (lora.py's layout) <-> a PEFT directory that PEFT and vLLM load on the
Hugging Face Gemma 3 checkpoint::

    export_peft(lora_params, out_dir, *, lora_config, model_config, base_model_name_or_path=None,
                layout="causal_lm" | "conditional_generation", dtype="float32", force=False) -> config dict
    import_peft(in_dir, *, model_config, joint_kv=False, joint_gate_up=False, keep_alpha=True)
        -> (lora_params, lora.LoRAConfig)

* Names: ``base_model.model.<stem>.{i}.self_attn.{q,k,v,o}_proj`` / ``.mlp.{gate,up,down}_proj`` +
  ``.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r). ``<stem>`` is ``model.layers`` for
  Gemma3ForCausalLM (270M, 1B; layout "causal_lm") and ``model.language_model.layers`` for
  Gemma3ForConditionalGeneration (4B, 12B, 27B; "conditional_generation", transformers >= 4.52). Import
  also reads the pre-4.52 ``language_model.model.layers`` and a bare ``layers``. ``HF_BASE_MODELS`` gives
  the hub id and layout of each of our model names.
* Layout: A = a.reshape(-1, r).T and B = b.reshape(r, -1).T for every projection (q: a (d, r),
  b (r, N, H) -> B (N*H, r); o: a (N, H, r) -> A (r, N*H); ...), because gemma's (N, H) head axes flatten
  row-major into Hugging Face's n*H + h features (``_to_hf`` cites the checkpoint conversion this follows).
  No rope permutation: both rotate split halves.
* Joint adapters (``joint_kv`` / ``joint_gate_up``): exported as two PEFT modules (k_proj and v_proj, gate_proj
  and up_proj) with the same lora_A, each of rank r: exact. Imported as separate adapters by default; with
  the joint flag, two modules with bitwise-identical lora_A and equal scale become one rank-r pair (what our
  export writes), any other two become a = [a_1 | a_2] (d, r_1 + r_2) with a block-diagonal b: rank
  r_1 + r_2, each half's ΔW exact, twice the parameters.
* Scale. Export: with ``alpha`` set and one rank for all modules, lora_alpha = alpha (PEFT's alpha / r is
  ours) and the factors are written as they are. Otherwise every module gets scale 1: lora_alpha = r,
  ``alpha_pattern`` mirrors ``rank_pattern`` (``output_config``, the rule the squeeze writes), use_rslora
  false, and a float alpha's alpha / r_m is folded into each module's factors (√ on each side). Why not
  lora_alpha = alpha with a rank_pattern: vLLM reads one scale, lora_alpha / r, for every module (it ignores
  both patterns), so mixed ranks must share a scale to load right there. Import: PEFT's per-module scale
  (lora_alpha / r or / √r with rsLoRA, patterns resolved by ``get_pattern_key``) is kept as the config's
  alpha when one lora_alpha serves every module (no rsLoRA; scale 1 everywhere gives alpha None), so the
  factors come back bit for bit; otherwise (or ``keep_alpha=False``) it is folded into the factors
  (√ on each side) and alpha is None. Mixed ranks come back as a {module path: rank} ``LoRAConfig.rank``.
* Errors (AdapterError, naming the file, module and shapes): params or tensors that do not fit the model
  config, missing halves, NaN/Inf, module names that are not Gemma 3 text projections, layer indices out of
  range, tensors we cannot represent (modules_to_save, DoRA, LoRA biases). Export writes atomically, like
  the squeeze: on any error ``out_dir`` does not exist. ``lora.py`` (flax, gemma) is imported only by
  ``import_peft`` (for ``LoRAConfig``), so the command stays light; names and shapes come from the
  pure-python ``lora_layout.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_squeeze import lora_layout
from lora_squeeze import squeeze
from lora_squeeze.adapters.atomic_output import atomic_dir, check_out_dir
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.peft_adapter import LoraModule, PeftAdapter
from lora_squeeze.adapters.peft_config import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, PeftAdapterConfig
from lora_squeeze.adapters.peft_config import new_config, output_config
from lora_squeeze.adapters.safetensors_io import OUT_CODES, cast_factor, save_safetensors

# Our module kind -> (sub-module, projection) inside a Hugging Face Gemma3DecoderLayer.
HF_PROJECTIONS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
# Where the text decoder layers sit in each Hugging Face class (module names inside PEFT's base model):
# Gemma3ForCausalLM (270M, 1B) and Gemma3ForConditionalGeneration (4B, 12B, 27B; transformers >= 4.52).
HF_LAYOUTS = {"causal_lm": "model.layers", "conditional_generation": "model.language_model.layers"}
# Hub ids of the pretrained checkpoints (the "-it" ones have the same module names) and their class.
HF_BASE_MODELS = {
    "gemma3_270m": ("google/gemma-3-270m", "causal_lm"),
    "gemma3_1b": ("google/gemma-3-1b-pt", "causal_lm"),
    "gemma3_4b": ("google/gemma-3-4b-pt", "conditional_generation"),
    "gemma3_12b": ("google/gemma-3-12b-pt", "conditional_generation"),
}
# Read as well: Gemma3ForConditionalGeneration before transformers 4.52 (``language_model.model.layers``)
# and a bare Gemma3TextModel (``layers``).
_HF_MODULE = re.compile(
    r"^(?P<stem>model\.layers|model\.language_model\.layers|language_model\.model\.layers"
    r"|layers)\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\.(?P<proj>[a-z]+_proj)$"
)
_KIND_OF_PROJ = {proj: (group, kind) for kind, (group, proj) in HF_PROJECTIONS.items()}
_JOINT = {"kv": ("k", "v"), "gate_up": ("gate", "up")}


def _hf_dims(cfg) -> dict[str, tuple[int, int]]:
  """(in_features, out_features) of each Hugging Face projection of a gemma TransformerConfig."""
  d, f = cfg.embed_dim, cfg.hidden_dim
  nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (d, nh), "k": (d, kh), "v": (d, kh), "o": (nh, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def hf_module_name(layer: int, kind: str, layout: str = "causal_lm") -> str:
  """The Hugging Face module name of one projection, e.g. ``model.layers.3.self_attn.q_proj``.

  ``kind``: one of q, k, v, o, gate, up, down (joint kinds are two modules). This is the name PEFT matches
  rank_pattern keys against; the tensors are ``base_model.model.<name>.lora_{A,B}.weight``."""
  if layout not in HF_LAYOUTS:
    raise AdapterError(f"unknown layout {layout!r}; choose one of {', '.join(HF_LAYOUTS)}")
  group, proj = HF_PROJECTIONS[kind]
  return f"{HF_LAYOUTS[layout]}.{layer}.{group}.{proj}"


def target_modules(kinds: Sequence[str], layout: str) -> list[str] | str:
  """adapter_config.json's target_modules: the projection names, or for the multimodal class a regex.

  Gemma3ForConditionalGeneration's SigLIP tower also has ``q_proj``/``k_proj``/``v_proj`` modules, which a
  list would make PEFT wrap too (with zero B, so harmless, but with missing-key warnings). The regex,
  matched by PEFT with ``re.fullmatch`` against full module names, keeps PEFT on the language model; its
  last group lists the projections, the form vLLM's ``is_regex_target_modules`` reads.
  """
  projs = [HF_PROJECTIONS[k][1] for k in kinds]
  if layout == "causal_lm":
    return projs
  return rf".*language_model.*\.({'|'.join(projs)})"


def lora_alpha_json(alpha: float) -> int | float:
  """PEFT types lora_alpha as int: write an integral value as one."""
  return int(alpha) if float(alpha).is_integer() else float(alpha)


def _checked_pairs(lora_params: Mapping, lora_config, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{canonical module path: (a, b) as numpy} in lora_shapes order, after checking the tree against the
  config's modules and the model's projection shapes (ranks are free, as in ``lora.LoRA``)."""
  try:
    expected = lora_layout.lora_shapes(cfg, dataclasses.replace(lora_config, rank=1))  # ranks come from the params
  except ValueError as e:
    raise AdapterError(f"LoRA config: {e}") from None
  pairs = squeeze.lora_pairs(lora_params)
  if not pairs:
    raise AdapterError("LoRA params: no {'a', 'b'} pairs found")
  found: dict[str, tuple[str, Mapping]] = {}
  for path, pair in pairs.items():
    try:
      layer, kind = lora_layout.module_kind(path)
    except ValueError as e:
      raise AdapterError(f"LoRA params: {e}") from None
    canon = lora_layout.module_path(layer, kind)
    if canon in found:
      raise AdapterError(f"LoRA params: module {canon} appears twice ({found[canon][0]!r} and {path!r})")
    found[canon] = (path, pair)
  missing, extra = [p for p in expected if p not in found], sorted(set(found) - set(expected))
  if missing or extra:
    raise AdapterError(
        f"LoRA params do not match {lora_config} on a {cfg.num_layers}-layer model: missing "
        f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
        f"{' ...' if len(extra) > 3 else ''} (joint_kv / joint_gate_up / targets / model config?)"
    )
  out = {}
  for canon, (a_shape, b_shape) in expected.items():
    path, pair = found[canon]
    a, b = np.asarray(pair["a"]), np.asarray(pair["b"])
    if (
        a.ndim != len(a_shape)
        or b.ndim != len(b_shape)
        or a.shape[:-1] != a_shape[:-1]
        or b.shape[1:] != b_shape[1:]
        or a.shape[-1] != b.shape[0]
        or a.shape[-1] < 1
    ):
      raise AdapterError(
          f"LoRA params at {path}: a{list(a.shape)}, b{list(b.shape)} do not fit this model "
          f"config (expected a{list(a_shape[:-1]) + ['r']}, b{['r'] + list(b_shape[1:])})"
      )
    for name, x in (("a", a), ("b", b)):
      finite = np.isfinite(x.astype(np.float32))
      if not finite.all():
        raise AdapterError(
            f"LoRA params at {path}/{name} {list(x.shape)}: {finite.size - int(finite.sum())} " "NaN/Inf values"
        )
    out[canon] = (a, b)
  return out


def _to_hf(kind: str, a: np.ndarray, b: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """[(projection kind, A (r, in), B (out, r))] of one of our pairs: one entry, two for a joint pair.

  Why plain reshapes are right: gemma's einsum weights keep heads as (N, H) axes and Hugging Face's
  checkpoint conversion (transformers' convert_gemma3_weights_orbax_to_hf.py: q_einsum (N, d, H) ->
  ``transpose(0, 2, 1).reshape(N*H, d)``, attn_vec_einsum (N, H, d) -> ``transpose(2, 0, 1).reshape(d,
  N*H)``, kv_einsum[0/1] like q, gating_einsum[0/1] = gate/up, linear -> ``.T``) flattens them row-major,
  feature n*H + h, exactly what ``reshape`` does to our a (N, H, r) and b (r, N, H). No rope permutation:
  both implementations rotate split halves of each head.
  """
  r = a.shape[-1]
  a_t = a.reshape(-1, r).T
  if kind in _JOINT:  # b (r, 2, ...): both halves share A (one input subspace), each its own B
    return [(half, a_t, b[:, i].reshape(r, -1).T) for i, half in enumerate(_JOINT[kind])]
  return [(kind, a_t, b.reshape(r, -1).T)]


def export_peft(
    lora_params: Mapping,
    out_dir: str | os.PathLike,
    *,
    lora_config,
    model_config,
    base_model_name_or_path: str | None = None,
    layout: str = "causal_lm",
    dtype: str = "float32",
    force: bool = False,
) -> dict:
  """Writes a Gemma 3 LoRA (our tree) as a PEFT adapter directory that PEFT and vLLM load on the HF model.

  Args:
    lora_params: the LoRA tree (``init_lora`` / ``split_params(params)[1]`` layout, an optional ``params/``
      prefix allowed). Ranks are read from its shapes, as ``lora.LoRA`` does.
    out_dir: the adapter directory; must not exist unless ``force``. Written atomically.
    lora_config: the ``lora.LoRAConfig`` it was trained with (modules, joint flags, alpha).
    model_config: the gemma TransformerConfig (or a transformer module): checks every shape.
    base_model_name_or_path: written to the config, e.g. ``HF_BASE_MODELS["gemma3_1b"][0]``.
    layout: "causal_lm" (Gemma3ForCausalLM: 270M, 1B) or "conditional_generation"
      (Gemma3ForConditionalGeneration: 4B, 12B, 27B, ``model.language_model.layers``).
    dtype: of the written factors: "float32" (exact), "bfloat16" or "float16".
    force: replace an existing ``out_dir``.

  Returns:
    The adapter_config.json written.

  Raises:
    AdapterError: params that do not fit the config/model (names the module and shapes), NaN/Inf, bad
      arguments; ``out_dir`` is then left absent (or untouched).
  """
  if layout not in HF_LAYOUTS:
    raise AdapterError(f"unknown layout {layout!r}; choose one of {', '.join(HF_LAYOUTS)}")
  if dtype not in OUT_CODES:
    raise AdapterError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUT_CODES)}")
  cfg = lora_layout.text_config(model_config)
  out_dir = Path(out_dir)
  check_out_dir(out_dir, force)
  pairs = _checked_pairs(lora_params, lora_config, cfg)

  modules = []  # (HF name, A, B, our scale): layer order, then q, k, v, o, gate, up, down
  for path, (a, b) in pairs.items():
    layer, kind = lora_layout.module_kind(path)
    scale = lora_config.scale(int(a.shape[-1]))
    for half, a_hf, b_hf in _to_hf(kind, a, b):
      modules.append((hf_module_name(layer, half, layout), a_hf, b_hf, scale))
  ranks = {name: int(a_hf.shape[0]) for name, a_hf, _, _ in modules}

  base = new_config(
      target_modules(lora_config.targets, layout), r=8, lora_alpha=8, base_model_name_or_path=base_model_name_or_path
  )
  if lora_config.alpha is not None and len(set(ranks.values())) == 1:
    # One scale alpha/r for every module: PEFT's own formula, factors written as they are.
    r = next(iter(ranks.values()))
    config = {**base, "r": r, "lora_alpha": lora_alpha_json(lora_config.alpha)}
    fold = {name: 1.0 for name in ranks}
  else:
    # Scale 1 everywhere (lora_alpha = r, alpha_pattern = rank_pattern); alpha/r_m of mixed ranks folded.
    config = output_config(PeftAdapterConfig.from_dict(base), ranks)
    fold = {name: scale for name, _, _, scale in modules}
  check = PeftAdapterConfig.from_dict(config)
  for name, _, _, scale in modules:
    got = check.scale(name) * fold[name]
    if not math.isclose(got, scale, rel_tol=1e-12):
      raise RuntimeError(f"export_peft: module '{name}' would get scale {got}, want {scale}")

  code = OUT_CODES[dtype]
  tensors = {}
  for name, a_hf, b_hf, _ in modules:
    half = np.float32(math.sqrt(fold[name]))
    for key, x in ((f"{PEFT_PREFIX}{name}.lora_A.weight", a_hf), (f"{PEFT_PREFIX}{name}.lora_B.weight", b_hf)):
      x = x.astype(np.float32) if half == 1 else x.astype(np.float32) * half
      tensors[key] = np.ascontiguousarray(cast_factor(x, code, name))
  with atomic_dir(out_dir) as tmp:
    save_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
  return config


def import_peft(
    in_dir: str | os.PathLike,
    *,
    model_config,
    joint_kv: bool = False,
    joint_gate_up: bool = False,
    keep_alpha: bool = True,
) -> tuple[dict, Any]:
  """Reads a PEFT Gemma 3 LoRA adapter directory into our tree and its ``lora.LoRAConfig``.

  Args:
    in_dir: the adapter directory (adapter_config.json + adapter_model.safetensors), any of the layouts in
      the module docstring (detected per module).
    model_config: the gemma TransformerConfig (or transformer) the adapter must fit.
    joint_kv, joint_gate_up: build ``kv_lora`` / ``gate_up_lora`` from the two PEFT modules (see the module
      docstring: rank r when they share lora_A, else rank r_k + r_v with a block-diagonal b).
    keep_alpha: when one lora_alpha (no rsLoRA) describes every module, return it as the config's alpha and
      keep the factors as written; otherwise, or with False, fold each module's scale into its factors.

  Returns:
    (lora params as nested dicts of float32 jax arrays, LoRAConfig): ``rank`` is an int, or a
    {module path: rank} mapping when ranks differ; ``targets`` the projections present.

  Raises:
    AdapterError: a file that is not a Gemma 3 text LoRA for this model config (names the module and shape),
      missing halves, NaN/Inf, tensors we cannot represent (modules_to_save, DoRA, LoRA biases).
  """
  from lora_squeeze import lora  # pylint: disable=g-import-not-at-top  (flax/gemma: never in the command)

  cfg = lora_layout.text_config(model_config)
  dims = _hf_dims(cfg)
  with PeftAdapter(in_dir) as adapter:
    where = adapter.reader.path
    if adapter.config.raw.get("use_dora"):
      raise AdapterError(f"{adapter.directory / CONFIG_NAME}: use_dora is set; DoRA adapters cannot be imported")
    if adapter.passthrough:
      raise AdapterError(
          f"{where}: tensor '{adapter.passthrough[0]}' is not a lora_A/lora_B factor (modules_to_"
          f"save, LoRA biases and DoRA magnitudes cannot be imported; {len(adapter.passthrough)} "
          "such tensors)"
      )
    found: dict[tuple[int, str], LoraModule] = {}
    for m in adapter.modules:
      match = _HF_MODULE.match(m.name)
      group_kind = _KIND_OF_PROJ.get(match["proj"]) if match else None
      if group_kind is None or group_kind[0] != match["group"] or ".lora_embedding_" in m.key_a:
        raise AdapterError(
            f"{where.name}: module '{m.name}' is not a Gemma 3 text projection (expected "
            f"'{HF_LAYOUTS['causal_lm']}.N.self_attn.{{q,k,v,o}}_proj' or '...mlp.{{gate,up,"
            f"down}}_proj', also under {HF_LAYOUTS['conditional_generation']} or "
            "language_model.model.layers)"
        )
      layer, kind = int(match["layer"]), group_kind[1]
      if layer >= cfg.num_layers:
        raise AdapterError(
            f"{where.name}: module '{m.name}': layer {layer} is out of range for a " f"{cfg.num_layers}-layer model"
        )
      if (layer, kind) in found:
        raise AdapterError(
            f"{where.name}: module '{m.name}' has two adapters ('{found[layer, kind].key_a}' " f"and '{m.key_a}')"
        )
      n_in, n_out = dims[kind]
      if m.shape_a != (m.r, n_in) or m.shape_b != (n_out, m.r):
        raise AdapterError(
            f"{where.name}: module '{m.name}': A {list(m.shape_a)}, B {list(m.shape_b)} do not fit "
            f"this model config (expected A [r, {n_in}], B [{n_out}, r])"
        )
      found[layer, kind] = m

    targets = tuple(k for k in lora_layout.TARGETS if any(key[1] == k for key in found))
    for layer in range(cfg.num_layers):
      have = tuple(k for k in targets if (layer, k) in found)
      if have != targets:
        raise AdapterError(
            f"{where.name}: layer {layer} adapts {list(have)} but other layers {list(targets)}; "
            "our LoRA adapts the same projections in every layer"
        )
    for flag, (x, y) in (("joint_kv", _JOINT["kv"]), ("joint_gate_up", _JOINT["gate_up"])):
      if {"joint_kv": joint_kv, "joint_gate_up": joint_gate_up}[flag] and (x in targets) != (y in targets):
        raise AdapterError(
            f"{where.name}: {flag} needs both {x}_proj and {y}_proj adapted; the adapter has "
            f"{[HF_PROJECTIONS[k][1] for k in targets]}"
        )

    alphas = {adapter.config.alpha(m.name) for m in found.values()}
    if all(m.scale == 1.0 for m in found.values()):
      alpha = None
    elif (
        keep_alpha
        and not adapter.config.use_rslora
        and len(alphas) == 1
        and isinstance(next(iter(alphas)), (int, float))
        and next(iter(alphas)) > 0
    ):
      alpha = float(next(iter(alphas)))
    else:
      alpha = None
    our_config = lora.LoRAConfig(rank=1, alpha=alpha, targets=targets, joint_kv=joint_kv, joint_gate_up=joint_gate_up)

    def factors(m: LoraModule, our_rank: int) -> tuple[np.ndarray, np.ndarray]:
      # a (in, r), b (r, out) with PEFT's scale over ours folded, split evenly (1: the factors as stored).
      return adapter.factors(dataclasses.replace(m, scale=m.scale / our_config.scale(our_rank)))

    flat: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    for path, (a_shape, b_shape) in lora_layout.lora_shapes(cfg, our_config).items():  # rank 1: just the dims
      layer, kind = lora_layout.module_kind(path)
      in_dims, out_dims = a_shape[:-1], b_shape[1:]
      if kind in _JOINT:
        m1, m2 = (found[layer, k] for k in _JOINT[kind])
        shared = (
            m1.r == m2.r
            and m1.scale == m2.scale
            and m1.dtype_a == m2.dtype_a
            and np.array_equal(adapter.reader.read(m1.key_a), adapter.reader.read(m2.key_a))
        )
        if shared:  # one input subspace: rank r, exactly the pair it was exported from
          r = m1.r
          a, b1 = factors(m1, r)
          _, b2 = factors(m2, r)
          b = np.stack([b1.reshape(r, *out_dims[1:]), b2.reshape(r, *out_dims[1:])], axis=1)
        else:  # a = [a_1 | a_2], b block-diagonal: rank r_1 + r_2, ΔW of each half exact
          r = m1.r + m2.r
          a1, b1 = factors(m1, r)
          a2, b2 = factors(m2, r)
          a = np.concatenate([a1, a2], axis=1)
          b = np.zeros((r, *out_dims), np.float32)
          b[: m1.r, 0] = b1.reshape(m1.r, *out_dims[1:])
          b[m1.r :, 1] = b2.reshape(m2.r, *out_dims[1:])
      else:
        m = found[layer, kind]
        r = m.r
        a, b = factors(m, r)
      flat[path] = (a.reshape(*in_dims, r), b.reshape(r, *out_dims))
      ranks[path] = r

  rank = next(iter(ranks.values())) if len(set(ranks.values())) == 1 else dict(ranks)
  params: dict = {}
  for path, (a, b) in flat.items():
    node = params
    for k in path.split("/"):
      node = node.setdefault(k, {})
    node["a"], node["b"] = jax.numpy.asarray(a), jax.numpy.asarray(b)
  return params, dataclasses.replace(our_config, rank=rank)
