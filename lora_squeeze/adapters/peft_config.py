"""A PEFT LoRA adapter's config: file names, per-module r, alpha and scale, and the configs this tool writes.

PEFT applies ΔW_eff = scale · B @ A with scale = lora_alpha / r (lora_alpha / √r with ``use_rslora``),
r and lora_alpha overridden per module by ``rank_pattern`` / ``alpha_pattern`` (matched as in
``get_pattern_key``).

Scale folding (the rule this tool writes, ``output_config``): the output has scale = 1 for every module,
i.e. lora_alpha = r for each module's new r (``alpha_pattern`` mirrors ``rank_pattern`` key for key) and
``use_rslora`` = false; the old scale is folded into the factors. So old and new PEFT versions resolve the
same r and alpha for every module. (With rsLoRA, scale 1 would need the irrational alpha √r; switching
rsLoRA off is exact.)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from lora_squeeze.adapters.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TORCH_WEIGHTS_NAME = "adapter_model.bin"
# PEFT saves LoRA weights under the PeftModel, whose base model is at `base_model.model`; PEFT matches
# rank_pattern/alpha_pattern keys against module names *inside* the base model, so without this prefix.
PEFT_PREFIX = "base_model.model."
# PEFT LoraConfig defaults, for configs that leave a field out.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False}


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str | None:
  """The rank_pattern/alpha_pattern key that applies to ``module_name``, or None.

  PEFT's rule (``peft.utils.other.get_pattern_key``): the first key, in the dict's order, for which
  ``re.match(rf"(.*\\.)?({key})$", module_name)`` matches, i.e. the key, read as a regex, matches the whole
  name or a dot-separated tail of it. (Releases before ~0.14 used ``rf".*\\.{key}$"`` and one lookup for both
  dicts; the patterns this module writes resolve identically under both rules.)
  """
  for key in pattern_keys:
    try:
      if re.match(rf"(.*\.)?({key})$", module_name):
        return key
    except re.error as e:
      raise AdapterError(
          f"{CONFIG_NAME}: rank_pattern/alpha_pattern key {key!r} is not a valid regex " f"({e})"
      ) from None
  return None


@dataclasses.dataclass(frozen=True)
class PeftAdapterConfig:
  """The fields of a PEFT ``LoraConfig`` (adapter_config.json) that decide each module's ΔW_eff.

  ``raw`` is the whole JSON. Not ``lora.LoRAConfig``, our own training config: this one is what PEFT files say.
  """

  raw: dict
  r: int
  lora_alpha: float
  use_rslora: bool
  rank_pattern: dict
  alpha_pattern: dict

  @classmethod
  def from_dict(cls, raw: dict, where: str = CONFIG_NAME) -> "PeftAdapterConfig":
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
      raise AdapterError(f'{where}: peft_type is {peft_type!r}; only LoRA adapters ("LORA") are supported')
    fields = {k: d if raw.get(k) is None else raw[k] for k, d in PEFT_DEFAULTS.items()}
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    if not (isinstance(fields["r"], int) and fields["r"] >= 1):
      raise AdapterError(f"{where}: r must be a positive integer, got {fields['r']!r}")
    if not isinstance(fields["lora_alpha"], (int, float)) or isinstance(fields["lora_alpha"], bool):
      raise AdapterError(f"{where}: lora_alpha must be a number, got {fields['lora_alpha']!r}")
    if not (isinstance(rank_pattern, dict) and isinstance(alpha_pattern, dict)):
      raise AdapterError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    for key, value in rank_pattern.items():
      if not (isinstance(value, int) and value >= 1):
        raise AdapterError(f"{where}: rank_pattern[{key!r}] must be a positive integer, got {value!r}")
    return cls(
        raw=raw,
        r=fields["r"],
        lora_alpha=fields["lora_alpha"],
        use_rslora=bool(fields["use_rslora"]),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )

  def rank(self, module_name: str) -> int:
    key = get_pattern_key(self.rank_pattern, module_name)
    return self.r if key is None else self.rank_pattern[key]

  def alpha(self, module_name: str) -> float:
    key = get_pattern_key(self.alpha_pattern, module_name)
    return self.lora_alpha if key is None else self.alpha_pattern[key]

  def scale(self, module_name: str) -> float:
    """PEFT's ``scaling``: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
    r = self.rank(module_name)
    return self.alpha(module_name) / (math.sqrt(r) if self.use_rslora else r)


def pattern_keys(names: Sequence[str]) -> dict[str, str]:
  """A rank_pattern key per module name that PEFT resolves to that module alone (among ``names``).

  The shortest dot-separated tail of the name that no other module ends with and that starts with a word
  (``layers.3.mlp.down_proj``, not ``3.mlp.down_proj``, for people reading the config), but never the whole
  name when it has more than one component: old PEFT releases (``.*\\.{key}$``) need a dot before the key.
  Falls back to the whole name when no tail qualifies. ``output_config`` checks the result under PEFT's
  regex rule (where ``.`` matches any character).
  """
  parts = {n: n.split(".") for n in names}
  keys = {}
  for k in range(1, max((len(p) for p in parts.values()), default=1)):
    tails = collections.Counter(".".join(p[-k:]) for p in parts.values() if len(p) >= k)
    for n in names:
      if n not in keys and len(parts[n]) > k and not parts[n][-k].isdigit():
        tail = ".".join(parts[n][-k:])
        if tails[tail] == 1:
          keys[n] = tail
  for n in names:
    keys.setdefault(n, n)
  return keys


def new_config(
    target_modules: Sequence[str] | str, *, r: int, lora_alpha: float, base_model_name_or_path: str | None = None
) -> dict:
  """The adapter_config.json of an adapter this tool makes (``export_peft``, GGUF -> PEFT), in PEFT's key
  order: a plain LoRA of ``target_modules`` with rank ``r`` and ``lora_alpha``, no dropout, empty patterns."""
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "r": r,
      "lora_alpha": lora_alpha,
      "lora_dropout": 0.0,
      "target_modules": target_modules,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "modules_to_save": None,
      "use_rslora": False,
      "use_dora": False,
      "rank_pattern": {},
      "alpha_pattern": {},
  }


def output_config(config: PeftAdapterConfig, ranks: Mapping[str, int]) -> dict:
  """The new adapter_config.json: the input's, with r, lora_alpha, rank/alpha_pattern for scale 1.

  The most common new rank becomes ``r`` (= ``lora_alpha``); every other module gets a ``rank_pattern``
  entry and the same key in ``alpha_pattern`` with alpha = its rank; rsLoRA is switched off. Every module
  then has scale 1 under both old and new PEFT matching rules, which is checked here.
  """
  counts = collections.Counter(ranks.values())
  default = max(counts, key=lambda r: (counts[r], r))
  others = [n for n, r in ranks.items() if r != default]
  keys = pattern_keys(list(ranks))
  rank_pattern = {keys[n]: ranks[n] for n in others}
  new = dict(config.raw)
  new.update(
      r=default, lora_alpha=default, use_rslora=False, rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern)
  )
  check = PeftAdapterConfig.from_dict(new)
  for n, r in ranks.items():
    if check.rank(n) != r or check.scale(n) != 1.0:
      raise RuntimeError(
          f"output_config: module '{n}' would resolve to r={check.rank(n)}, "
          f"scale={check.scale(n)} (want r={r}, scale 1)"
      )
  return new
