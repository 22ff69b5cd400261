"""``lora-squeeze convert``: a PEFT adapter directory <-> a GGUF LoRA file (llama.cpp / ollama).

    lora-squeeze convert PEFT_DIR OUT.gguf [--arch gemma3]      PEFT -> GGUF (what llama.cpp's converter writes)
    lora-squeeze convert IN.gguf PEFT_DIR [--layout ...]         GGUF -> PEFT

The GGUF format (metadata, tensor names, llama.cpp's alpha / r_m scale) and its reader and writer are
``gguf_lora.py``; this module maps names and scales between the two formats.

Names come from gguf's own name map (``gguf.get_tensor_name_map``, the table llama.cpp's converters use):
PEFT -> GGUF maps each module exactly as the converter does (``base_model.model.`` and ``language_model.``
dropped, then the map). GGUF -> PEFT inverts that map on the Hugging Face names of Gemma 3's projections
(``adapters.hf_module_name``: ``model.layers.N.self_attn.q_proj`` ..., or ``model.language_model.layers``
with ``layout="conditional_generation"``), which are also those of Llama-style decoders (llama, mistral,
qwen2, ...); any other tensor is an error naming it.

Convert PEFT -> GGUF writes float32 by default, as the converter does (``--dtype`` for 16-bit), the
factors as they are and alpha = lora_alpha whenever every module's PEFT scale is lora_alpha / r_m (as
with ``rank_pattern``); an adapter with ``alpha_pattern`` or rsLoRA, whose scales one alpha cannot give
(the converter ignores both), gets the squeeze's rule: alpha = the largest rank, the scales folded in.
GGUF -> PEFT keeps the factors bit for bit: lora_alpha = alpha with ``rank_pattern`` for mixed ranks
(PEFT's alpha / r_m is llama.cpp's), or scale 1 everywhere (lora_alpha = r) for alpha 0.
Everything is written beside OUT and renamed into place: OUT appears whole or not at all.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import gguf
import numpy as np

from lora_squeeze import adapters
from lora_squeeze.adapters import AdapterError
from lora_squeeze.adapters import cast_factor, check_out_file, fmt_bytes  # pylint: disable=g-importing-member
from lora_squeeze.gguf_lora import ADAPTER_TYPE_KEY, ALPHA_KEY, ARCH_KEY, ARCH_NAMES, GGML_OF, SUFFIX
from lora_squeeze.gguf_lora import GgufLora, check_arch, file_alpha, is_gguf, write_gguf


def _n_blocks(names) -> int:
  """One more than the largest layer index in the names (what gguf's name map must cover)."""
  found = [int(x) for n in names for x in re.findall(r"(?:^|\.)(\d+)(?:\.|$)", n)]
  return max(found, default=0) + 1


def gguf_name(hf_module: str, arch: gguf.MODEL_ARCH, name_map=None) -> str | None:
  """The llama.cpp weight name of a Hugging Face module, as llama.cpp's LoRA converter maps it.

  ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight`` (None if the map has no entry): drop
  ``language_model.`` (the multimodal classes' text stack), then gguf's name map."""
  name_map = name_map or gguf.get_tensor_name_map(arch, _n_blocks([hf_module]))
  return name_map.get_name(hf_module.replace("language_model.", "") + ".weight", try_suffixes=(".weight", ".bias"))


def arch_from_config(raw: dict, where: str) -> str:
  """The llama.cpp architecture of a PEFT adapter, from its ``base_model_name_or_path``.

  A local base-model directory: its config.json's ``model_type`` (or ``text_config.model_type``), with a
  ``_text`` suffix dropped (``gemma3_text`` is llama.cpp's ``gemma3``), if gguf knows that name. A Gemma 3
  hub id (``adapters.HF_BASE_MODELS`` and their -it versions): ``gemma3``. Anything else: --arch.
  """
  base = raw.get("base_model_name_or_path")
  hint = ", ".join(n for n in ("gemma3", "llama", "qwen2", "mistral3", "phi3") if n in ARCH_NAMES)
  if isinstance(base, str) and base:
    cfg_path = Path(base) / "config.json"
    if cfg_path.is_file():
      try:
        cfg = json.loads(cfg_path.read_text())
      except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: cannot read JSON ({e})") from None
      types = [cfg.get("model_type"), (cfg.get("text_config") or {}).get("model_type")]
      for t in [t for t in types if isinstance(t, str)]:
        for name in (t, t.removesuffix("_text")):
          if name in ARCH_NAMES:
            return name
      raise AdapterError(
          f"{cfg_path}: model_type {types[0]!r} is not a llama.cpp architecture name that gguf "
          f"knows; pass --arch (e.g. {hint})"
      )
    stems = {hub.removesuffix("-pt") for hub, _ in adapters.HF_BASE_MODELS.values()}
    if any(base == s or base.startswith(s + "-") for s in stems):
      return "gemma3"
  raise AdapterError(
      f"{where}: cannot tell the llama.cpp architecture from base_model_name_or_path "
      f"{base!r} (neither a local model directory nor a known Gemma 3 id); pass --arch "
      f"(e.g. {hint})"
  )


@dataclasses.dataclass
class ConvertReport:
  """What ``convert`` wrote."""

  src: Path
  dst: Path
  direction: str
  modules: int
  ranks: dict
  alpha_line: str
  out_bytes: int
  seconds: float
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    ranks = collections.Counter(self.ranks.values())
    lines = [
        f"{self.direction}: {self.modules} LoRA modules, ranks "
        + ", ".join(f"{r} ({c})" for r, c in sorted(ranks.items())),
        self.alpha_line,
    ]
    lines += self.notes
    lines.append(f"wrote {self.dst} {fmt_bytes(self.out_bytes)} in {self.seconds:.1f} s")
    return "\n".join(lines)


def convert(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    arch: str | None = None,
    layout: str = "causal_lm",
    dtype: str | None = None,
    force: bool = False,
) -> ConvertReport:
  """PEFT adapter directory -> GGUF LoRA file (``out_path`` ends in .gguf), or GGUF LoRA -> PEFT directory.

  Args:
    in_path: a PEFT adapter directory, or a GGUF LoRA file (told by its content).
    out_path: a ``.gguf`` file (PEFT -> GGUF) or a directory (GGUF -> PEFT).
    arch: PEFT -> GGUF: the llama.cpp architecture (default: from the adapter's config; see
      ``arch_from_config``).
    layout: GGUF -> PEFT: the Hugging Face module names, ``adapters.HF_LAYOUTS`` ("causal_lm":
      ``model.layers``, "conditional_generation": ``model.language_model.layers``).
    dtype: of the written factors: "keep", "float32", "bfloat16", "float16" (default: float32 for GGUF,
      as llama.cpp's converter; keep for PEFT).
    force: replace an existing output.

  Raises:
    AdapterError: bad input or arguments; the output is then left absent (or untouched).
  """
  start = time.perf_counter()
  in_path, out_path = Path(in_path), Path(out_path)
  if dtype is not None and dtype not in adapters.DTYPES:
    raise AdapterError(f"unknown --dtype {dtype!r}; choose one of {', '.join(adapters.DTYPES)}")
  if not in_path.exists():
    raise AdapterError(f"{in_path}: no such file or directory")
  if out_path.suffix.lower() == SUFFIX:
    if not in_path.is_dir():
      what = "a GGUF file already" if is_gguf(in_path) else "not a PEFT adapter directory"
      raise AdapterError(f"{in_path}: {what}; convert to {out_path.name} takes a PEFT adapter directory")
    if layout != "causal_lm":
      raise AdapterError("--layout is for GGUF -> PEFT; the GGUF names do not depend on it")
    report = _peft_to_gguf(in_path, out_path, arch=arch, dtype=dtype or "float32", force=force)
  else:
    if in_path.is_dir():
      raise AdapterError(f"{out_path}: converting a PEFT directory needs an OUT ending in {SUFFIX}")
    if not is_gguf(in_path):
      raise AdapterError(
          f"{in_path}: not a GGUF file (no GGUF magic); convert turns a PEFT directory into a "
          f"{SUFFIX} file and a {SUFFIX} file into a PEFT directory"
      )
    if arch is not None:
      raise AdapterError("--arch is for PEFT -> GGUF; a GGUF file states its own architecture")
    if layout not in adapters.HF_LAYOUTS:
      raise AdapterError(f"unknown --layout {layout!r}; choose one of {', '.join(adapters.HF_LAYOUTS)}")
    report = _gguf_to_peft(in_path, out_path, layout=layout, dtype=dtype or "keep", force=force)
  report.seconds = time.perf_counter() - start
  return report


def _peft_to_gguf(in_dir: Path, out_path: Path, *, arch: str | None, dtype: str, force: bool) -> ConvertReport:
  check_out_file(in_dir, out_path, force, False, suffix=SUFFIX)
  with adapters.PeftAdapter(in_dir) as adapter:
    where = str(in_dir / adapters.CONFIG_NAME)
    arch = arch if arch is not None else arch_from_config(adapter.config.raw, where)
    arch_enum = check_arch(arch, "--arch")
    if adapter.passthrough:
      raise AdapterError(
          f"{adapter.reader.path}: tensor '{adapter.passthrough[0]}' is not a lora_A/lora_B "
          f"factor ({len(adapter.passthrough)} such); a GGUF LoRA holds LoRA pairs only"
      )
    name_map = gguf.get_tensor_name_map(arch_enum, _n_blocks(m.name for m in adapter.modules))
    names = {}
    for m in adapter.modules:
      if "lora_embedding" in m.key_a or len(m.shape_a) != 2:
        raise AdapterError(
            f"{adapter.reader.path}: module '{m.name}' is an embedding or conv LoRA; a GGUF "
            "LoRA here holds linear layers only"
        )
      names[m.name] = gguf_name(m.name, arch_enum, name_map)
      if names[m.name] is None:
        raise AdapterError(
            f"{adapter.reader.path}: module '{m.name}' has no llama.cpp name for architecture "
            f"{arch!r} in gguf's name map"
        )
    ranks = {m.name: m.r for m in adapter.modules}
    cfg = adapter.config
    as_is = all(math.isclose(m.scale, cfg.lora_alpha / m.r, rel_tol=1e-12) for m in adapter.modules)
    alpha = float(cfg.lora_alpha) if as_is else file_alpha(ranks.values())

    def code(m, original: str) -> str:  # pylint: disable=unused-argument
      return original if dtype == "keep" else adapters.OUT_CODES[dtype]

    entries = []
    for m in adapter.modules:
      entries += [
          (names[m.name] + ".lora_a", code(m, m.dtype_a), m.shape_a),
          (names[m.name] + ".lora_b", code(m, m.dtype_b), m.shape_b),
      ]
    for c in {c for _, c, _ in entries} - set(GGML_OF):
      raise AdapterError(f"{adapter.reader.path}: {c} factors cannot be written to GGUF; use --dtype float32")

    def tensors():
      for m in adapter.modules:
        if as_is:
          a, b = (adapter.reader.read(k) for k in (m.key_a, m.key_b))
          for k, x in ((m.key_a, a), (m.key_b, b)):
            if not np.isfinite(x.astype(np.float32)).all():
              raise AdapterError(f"{adapter.reader.path}: module '{m.name}': '{k}' contains NaN/Inf values")
        else:
          a_t, b_t = adapter.factors(m)  # √scale folded on each side; llama.cpp multiplies by alpha / r_m
          fold = np.float32(math.sqrt(m.r / alpha))
          a, b = (a_t * fold).T, (b_t * fold).T
        yield names[m.name] + ".lora_a", cast_factor(
            np.asarray(a, np.float32) if dtype != "keep" else a, code(m, m.dtype_a), m.name
        )
        yield names[m.name] + ".lora_b", cast_factor(
            np.asarray(b, np.float32) if dtype != "keep" else b, code(m, m.dtype_b), m.name
        )

    def kv(writer: gguf.GGUFWriter) -> None:
      # The converter's keys, in its order: type, adapter type, the model card's metadata by gguf's own
      # heuristics (general.name from the directory name when the card has none), alpha, quantization version.
      writer.add_type(gguf.GGUFType.ADAPTER)
      writer.add_string(ADAPTER_TYPE_KEY, "lora")
      meta = gguf.Metadata.load(None, in_dir, None, writer.get_total_parameter_count()[0])
      if meta.name is None:
        meta.name = in_dir.name
      meta.set_gguf_meta_model(writer)
      writer.add_float32(ALPHA_KEY, alpha)
      writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    write_gguf(out_path, arch, kv, entries, tensors())
  notes = (
      []
      if as_is
      else [
          "note: alpha_pattern / rsLoRA give scales one GGUF alpha cannot: each folded into its module's factors "
          "(llama.cpp's converter would write lora_alpha and lose them)"
      ]
  )
  return ConvertReport(
      src=in_dir,
      dst=out_path,
      direction=f"PEFT -> GGUF ({ARCH_KEY} = {arch})",
      modules=len(ranks),
      ranks=ranks,
      notes=notes,
      out_bytes=out_path.stat().st_size,
      seconds=0.0,
      alpha_line=f"{ALPHA_KEY} = {alpha:g}"
      + (" (lora_alpha; factors as they are)" if as_is else " (the largest rank; scales folded in)"),
  )


def _gguf_to_peft(in_path: Path, out_dir: Path, *, layout: str, dtype: str, force: bool) -> ConvertReport:
  adapters.check_out_dir(out_dir, force, inputs=(in_path,))
  with GgufLora(in_path) as lf:
    arch_enum = ARCH_NAMES[lf.arch]
    n_blocks = max((m.layer for m in lf.modules if m.layer is not None), default=0) + 1
    name_map = gguf.get_tensor_name_map(arch_enum, n_blocks)
    hf_of = {}
    for layer in range(n_blocks):
      for kind in adapters.HF_PROJECTIONS:
        hf = adapters.hf_module_name(layer, kind, layout)
        g = gguf_name(hf, arch_enum, name_map)
        if g is not None:
          hf_of[g] = hf
    for m in lf.modules:
      if m.weight not in hf_of:
        raise AdapterError(
            f"{in_path}: tensor '{m.key_a}': no Hugging Face name for '{m.weight}' (this tool "
            "names the q/k/v/o/gate/up/down projections of Gemma 3 and Llama-style decoders)"
        )
    ranks = {hf_of[m.weight]: m.r for m in lf.modules}
    counts = collections.Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))
    projs = sorted({hf.rsplit(".", 1)[-1] for hf in ranks})
    kinds = [k for k, (_, proj) in adapters.HF_PROJECTIONS.items() if proj in projs]
    base = adapters.new_config(adapters.target_modules(kinds, layout), r=default, lora_alpha=default)
    if lf.alpha:
      keys = adapters.pattern_keys(list(ranks))
      config = {
          **base,
          "lora_alpha": adapters.lora_alpha_json(lf.alpha),
          "rank_pattern": {keys[n]: r for n, r in ranks.items() if r != default},
      }
      alpha_line = f"lora_alpha = {lf.alpha:g} (the file's alpha; factors bit for bit)"
    else:
      config = adapters.output_config(adapters.PeftAdapterConfig.from_dict(base), ranks)
      alpha_line = f"{ALPHA_KEY} absent or 0 (llama.cpp: scale 1): lora_alpha = r in every module"
    check = adapters.PeftAdapterConfig.from_dict(config)
    for m in lf.modules:
      hf = hf_of[m.weight]
      if check.rank(hf) != m.r or not math.isclose(check.scale(hf), m.scale, rel_tol=1e-12):
        raise RuntimeError(
            f"convert: module '{hf}' would get r={check.rank(hf)}, scale {check.scale(hf)}; "
            f"want r={m.r}, scale {m.scale}"
        )

    def code(original: str) -> str:
      return original if dtype == "keep" else adapters.OUT_CODES[dtype]

    entries, order = [], []
    for m in lf.modules:
      prefix = adapters.PEFT_PREFIX + hf_of[m.weight]
      entries += [
          (f"{prefix}.lora_A.weight", code(m.dtype_a), m.shape_a),
          (f"{prefix}.lora_B.weight", code(m.dtype_b), m.shape_b),
      ]
      order += [(m, m.key_a, m.dtype_a), (m, m.key_b, m.dtype_b)]
    with adapters.atomic_dir(out_dir) as tmp:
      writer = adapters.SafetensorsWriter(tmp / adapters.WEIGHTS_NAME, entries, {"format": "pt"})
      try:
        for (name, c, _), (m, key, _) in zip(entries, order):
          x = lf.reader.read(key)
          finite = np.isfinite(x.astype(np.float32))
          if not finite.all():
            raise AdapterError(
                f"{in_path}: module '{m.name}': '{key}' {list(x.shape)} contains "
                f"{finite.size - int(finite.sum())} NaN/Inf values"
            )
          writer.write(name, cast_factor(x if x.dtype == adapters.NP_DTYPES[c] else x.astype(np.float32), c, m.name))
      except BaseException:
        writer.abort()
        raise
      writer.close()
      (tmp / adapters.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    notes = []
    if lf.passthrough:
      notes.append(
          f"note: {len(lf.passthrough)} *_norm.weight tensors not written (PEFT LoRA has no place for "
          "them; llama.cpp ignores them too)"
      )
    if lf.quantized:
      notes.append(f"note: {'/'.join(lf.quantized)} factors dequantised")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
  return ConvertReport(
      src=in_path,
      dst=out_dir,
      direction=f"GGUF ({ARCH_KEY} = {lf.arch}) -> PEFT ({layout})",
      modules=len(ranks),
      ranks=ranks,
      alpha_line=alpha_line,
      out_bytes=size,
      seconds=0.0,
      notes=notes,
  )
