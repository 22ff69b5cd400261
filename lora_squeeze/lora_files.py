"""Single-file LoRAs (kohya sd-scripts / LyCORIS, diffusers / ComfyUI) for the ``lora-squeeze`` command.

A PEFT adapter is a directory (the ``adapters`` package); the image and video world passes LoRAs around as ONE
``.safetensors`` file without a config, in one of two key layouts, told apart here from the keys alone:

* ``kohya`` (sd-scripts ``networks/lora.py``, LyCORIS LoRA/LoCon, most SD1.5/SDXL/Flux LoRAs on the hubs):
  ``<prefix>.lora_down.weight`` (r, in) or conv (r, in, kh, kw), ``<prefix>.lora_up.weight`` (out, r) or
  (out, r, 1, 1), ``<prefix>.alpha`` (0-d); prefixes ``lora_unet_...``, ``lora_te_`` / ``lora_te1_`` /
  ``lora_te2_``, ``lora_transformer_...``. ΔW = (alpha / r) · up.reshape(out, r) @ down.reshape(r, -1), and
  alpha = r when absent. A conv LoRA (LoCon) is that matrix with down flattened to (r, in·kh·kw), as in
  sd-scripts' ``networks/resize_lora.py``.
* ``diffusers`` (``save_lora_weights`` of the Flux/SD3/Wan pipelines, ComfyUI exports): ``<prefix>.lora_A.weight``
  / ``<prefix>.lora_B.weight`` with an optional per-module ``<prefix>.alpha``: scale alpha / r, else 1.
  diffusers (>= 0.34) also saves the PEFT LoraConfig of each component in the ``lora_adapter_metadata``
  metadata entry, flattened to keys ``<component>.r``, ``<component>.lora_alpha``, ``<component>.rank_pattern``,
  ...; its loader then scales by that config (lora_alpha / r, patterns as PEFT resolves them), so we do
  too, and write the component's config back as the PEFT path writes adapter_config.json (r = lora_alpha,
  mirrored rank_pattern / alpha_pattern, use_rslora false).

Written back in the input's layout with scale 1 for every module, the old scale folded evenly into both
factors (up' = U_r Σ_r^½, down' = Σ_r^½ V_rᵀ), the PEFT path's rule: alpha = the module's new rank where
the input had alpha tensors (a 0-d tensor of the input alpha's dtype, float32 where that dtype cannot hold
the integer). Why not kohya's own resize convention (all of Σ in up, alpha = old scale × new rank): both
give the same ΔW; the even split keeps both factors the same size, which matters in float16/bfloat16.
kohya metadata: ``ss_network_dim`` and ``ss_network_alpha`` (strings) become the largest new rank (alpha =
rank in every module, so the two agree; with per-module ranks they describe the largest module),
``conv_dim`` / ``conv_alpha`` in ``ss_network_args`` likewise for the conv modules, a note is prepended to
``ss_training_comment``, and the ``sshs_*`` file hashes, which the new bytes would contradict, are dropped.

Tensors that are not a low-rank pair (LoHa ``hada_*``, LoKr ``lokr_*``, full diffs ``.diff``, DoRA
magnitudes ``dora_scale`` / ``lora_magnitude_vector``, Tucker LoCon modules with a ``lora_mid``, biases,
alphas of such modules) are copied byte for byte and one line of the summary counts them. A DoRA magnitude
next to a squeezed pair refers to the column norms of W + ΔW: it stays right to the squeeze's accuracy.

Streaming as in the PEFT path: the header is written first, then one module's factors at a time.
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

import numpy as np

from lora_squeeze import adapters
from lora_squeeze import gguf_lora
from lora_squeeze.adapters import AdapterError

# The PEFT path's building blocks, shared so both paths read, plan, cast and write identically.
from lora_squeeze.adapters import FLOAT_CODES, NP_DTYPES  # pylint: disable=g-importing-member
from lora_squeeze.adapters import atomic_file, check_out_file  # pylint: disable=g-importing-member

# Files that are Python pickles (torch.save): never opened as data, since unpickling runs code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The first bytes of a pickle (protocol 2+) and of torch.save's zip container.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")

# What each kind of copied tensor is, for the one-line summary (first match wins).
_PASSTHROUGH_KINDS = (
    ("LoHa", re.compile(r"\.hada_")),
    ("LoKr", re.compile(r"\.lokr_")),
    ("full diff", re.compile(r"\.diff(_b)?$")),
    ("DoRA magnitude", re.compile(r"(\.dora_scale|\.lora_magnitude_vector(\.[^.]+)?(\.weight)?)$")),
    ("Tucker LoCon", re.compile(r"\.lora_(mid|down|up)\.weight$")),
    ("alpha", re.compile(r"\.alpha$")),
    ("bias", re.compile(r"\.(diff_b|bias)$")),
)


@dataclasses.dataclass(frozen=True)
class FileModule(adapters.LoraModule):
  """A LoRA module of a single-file format: ``key_a`` is down / lora_A, ``key_b`` is up / lora_B.

  Attributes (besides LoraModule's):
    key_alpha: the module's 0-d alpha tensor (None: none; scale 1 for diffusers, alpha = r for kohya).
    dtype_alpha: its safetensors dtype code.
  """

  key_alpha: str | None = None
  dtype_alpha: str | None = None

  @property
  def kind(self) -> str:
    """conv or linear, for the inspect summary (kohya prefixes have no dots to split on)."""
    return "conv" if len(self.shape_a) > 2 else "linear"


@dataclasses.dataclass(frozen=True)
class Format:
  """One single-file key layout.

  Attributes:
    name: "kohya" or "diffusers".
    down, up: the key suffixes of the two factors (after the prefix, before ``.weight``).
  """

  name: str
  down: str
  up: str

  def key(self, prefix: str, side: str) -> str:
    return f"{prefix}.{self.down if side == 'down' else self.up}.weight"

  def match(self, key: str) -> tuple[str, str] | None:
    """(prefix, "down" | "up") for a factor key of this layout, else None."""
    for side, suffix in (("down", self.down), ("up", self.up)):
      tail = f".{suffix}.weight"
      if key.endswith(tail) and len(key) > len(tail):
        return key[: -len(tail)], side
    return None


KOHYA = Format(name="kohya", down="lora_down", up="lora_up")
DIFFUSERS = Format(name="diffusers", down="lora_A", up="lora_B")
FORMATS = (KOHYA, DIFFUSERS)


def _check_not_pickle(path: Path) -> None:
  """Refuses a torch pickle by name or by its first bytes, before anything parses it."""
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise AdapterError(
        f"{path}: a '{path.suffix}' file is a Python pickle, which this tool never loads "
        "(unpickling runs code); convert it to .safetensors first"
    )
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError as e:
    raise AdapterError(f"{path}: cannot open ({e.strerror})") from None
  if any(head.startswith(m) for m in _PICKLE_MAGIC):
    raise AdapterError(
        f"{path}: looks like a Python pickle / torch.save file, which this tool never loads "
        "(unpickling runs code); convert it to .safetensors first"
    )


def detect(keys) -> Format:
  """The layout of a file from its tensor names; AdapterError if none or both."""
  found = [f for f in FORMATS if any(f.match(k) for k in keys)]
  if len(found) == 1:
    return found[0]
  if len(found) == 2:
    raise AdapterError(
        "mixes kohya (lora_down/lora_up) and diffusers (lora_A/lora_B) keys; this tool " "squeezes one layout per file"
    )
  kinds = collections.Counter(_passthrough_kind(k) for k in keys)
  what = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) if keys else "no tensors"
  raise AdapterError(
      f"not a LoRA this tool knows: no lora_down/lora_up (kohya) or lora_A/lora_B "
      f"(diffusers) pairs ({what}); nothing to squeeze"
  )


DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


def _diffusers_configs(metadata: dict[str, str] | None) -> dict[str, adapters.PeftAdapterConfig]:
  """{component ("transformer", "unet", ...): its PeftAdapterConfig} from diffusers' ``lora_adapter_metadata``."""
  if not metadata or DIFFUSERS_METADATA_KEY not in metadata:
    return {}
  try:
    flat = json.loads(metadata[DIFFUSERS_METADATA_KEY])
  except json.JSONDecodeError as e:
    raise AdapterError(f"metadata '{DIFFUSERS_METADATA_KEY}' is not JSON ({e})") from None
  if not isinstance(flat, dict):
    raise AdapterError(f"metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
  raw: dict[str, dict] = collections.defaultdict(dict)
  for key, value in flat.items():
    component, _, field = key.partition(".")
    raw[component][field] = value
  return {
      c: adapters.PeftAdapterConfig.from_dict(d, f"metadata '{DIFFUSERS_METADATA_KEY}' ({c})") for c, d in raw.items()
  }


def _passthrough_kind(key: str) -> str:
  return next((kind for kind, pattern in _PASSTHROUGH_KINDS if pattern.search(key)), "other")


class LoraFile:
  """A single-file LoRA opened for reading: layout, modules and tensor index now, factors on demand.

  Attributes:
    path: the file.
    format: its Format.
    reader: the open adapters.SafetensorsReader.
    modules: the FileModules, in file order.
    passthrough: names of every other tensor (copied unchanged).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.exists():
      raise AdapterError(f"{self.path}: no such file or directory")
    if not self.path.is_file():
      raise AdapterError(f"{self.path}: not a regular file")
    _check_not_pickle(self.path)
    self.reader = adapters.SafetensorsReader(self.path)
    try:
      self._index()
    except AdapterError as e:
      self.reader.close()
      msg = str(e)
      raise AdapterError(msg if msg.startswith(str(self.path)) else f"{self.path}: {msg}") from None
    except BaseException:
      self.reader.close()
      raise

  def _index(self) -> None:
    tensors = self.reader.tensors
    self.format = detect(list(tensors))
    sides: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for key in tensors:
      hit = self.format.match(key)
      if hit:
        sides[hit[0]][hit[1]] = key
    configs = _diffusers_configs(self.reader.metadata) if self.format is DIFFUSERS else {}
    self.configs = configs
    # LyCORIS' Tucker-decomposed LoCon (lora_mid) is a three-factor product: not squeezed, copied.
    tucker = {p for p in sides if f"{p}.lora_mid.weight" in tensors}
    self.modules: list[FileModule] = []
    used: set[str] = set()
    for prefix, pair in sides.items():
      if prefix in tucker:
        continue
      if len(pair) != 2:
        have = next(iter(pair))
        miss = "up" if have == "down" else "down"
        raise AdapterError(f"module '{prefix}' has {pair[have]!r} but no {self.format.key(prefix, miss)!r}")
      down, up = tensors[pair["down"]], tensors[pair["up"]]
      if down.dtype not in FLOAT_CODES or up.dtype not in FLOAT_CODES:
        raise AdapterError(
            f"module '{prefix}': LoRA factors must be F64/F32/F16/BF16, got down {down.dtype}, " f"up {up.dtype}"
        )
      if (
          len(down.shape) < 2
          or len(up.shape) < 2
          or down.shape[0] != up.shape[1]
          or down.shape[0] == 0
          or any(d != 1 for d in up.shape[2:])
      ):
        raise AdapterError(
            f"module '{prefix}': shape mismatch, down {list(down.shape)} and up "
            f"{list(up.shape)} (expected down (r, in, ...) and up (out, r, 1, ...) with the same r)"
        )
      r = down.shape[0]
      alpha_key = f"{prefix}.alpha" if f"{prefix}.alpha" in tensors else None
      alpha = float(r)  # no alpha tensor: scale 1 in both layouts (kohya's networks/lora.py: alpha = r)
      component, _, inner = prefix.partition(".")
      if component in configs and alpha_key is None:
        config = configs[component]
        if config.rank(inner) != r:
          raise AdapterError(
              f"module '{prefix}': metadata '{DIFFUSERS_METADATA_KEY}' gives r={config.rank(inner)} "
              f"but lora_A is {list(down.shape)} (r={r})"
          )
        alpha = config.scale(inner) * r
      elif configs:
        raise AdapterError(
            f"module '{prefix}': not covered by metadata '{DIFFUSERS_METADATA_KEY}' (components "
            f"{', '.join(sorted(configs))}) or has its own alpha tensor as well"
        )
      if alpha_key is not None:
        info = tensors[alpha_key]
        if info.dtype not in FLOAT_CODES + ("I64", "I32", "I16", "I8"):
          raise AdapterError(f"module '{prefix}': alpha '{alpha_key}' has dtype {info.dtype}")
        if math.prod(info.shape) != 1:
          raise AdapterError(f"module '{prefix}': alpha '{alpha_key}' has shape {list(info.shape)}, want a scalar")
        alpha = float(self.reader.read(alpha_key).reshape(()))
        if not math.isfinite(alpha):
          raise AdapterError(f"module '{prefix}': alpha '{alpha_key}' is {alpha}")
      self.modules.append(
          FileModule(
              name=prefix,
              key_a=pair["down"],
              key_b=pair["up"],
              shape_a=down.shape,
              shape_b=up.shape,
              dtype_a=down.dtype,
              dtype_b=up.dtype,
              scale=alpha / r,
              key_alpha=alpha_key,
              dtype_alpha=tensors[alpha_key].dtype if alpha_key else None,
          )
      )
      used.update(pair.values())
      if alpha_key:
        used.add(alpha_key)
    if not self.modules:
      raise AdapterError(f"only Tucker LoCon modules (lora_mid), which this tool does not squeeze")
    self.passthrough = [k for k in tensors if k not in used]

  # a = √scale·downᵀ, b = √scale·upᵀ: the same reading as a PEFT adapter's (A is down, B is up).
  factors = adapters.PeftAdapter.factors

  def passthrough_line(self) -> str | None:
    """One line naming what is copied unchanged, by kind (None: nothing)."""
    if not self.passthrough:
      return None
    # An alpha counts as the kind of the tensors beside it (a LoHa module's alpha is part of the LoHa).
    by_prefix = collections.defaultdict(set)
    for k in self.passthrough:
      by_prefix[k.rsplit(".", 1)[0]].add(_passthrough_kind(k))

    def kind(k: str) -> str:
      own = _passthrough_kind(k)
      others = by_prefix[k.rsplit(".", 1)[0]] - {"alpha"}
      return min(others) if own == "alpha" and others else own

    kinds = collections.Counter(kind(k) for k in self.passthrough)
    return (
        f"copied unchanged (not a low-rank pair): {len(self.passthrough)} tensors ("
        + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        + ")"
    )

  def close(self) -> None:
    self.reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_lora_file(path: str | os.PathLike):
  """A LoraFile, or a gguf_lora.GgufLora for a file that starts with the GGUF magic."""
  if gguf_lora.is_gguf(path):
    return gguf_lora.GgufLora(path)
  return LoraFile(path)


def _alpha_tensor(rank: int, code: str | None) -> tuple[str, np.ndarray]:
  """alpha = rank as a 0-d tensor of ``code``, or F32 where ``code`` cannot hold it exactly."""
  dtype = NP_DTYPES.get(code or "F32")
  value = np.asarray(rank).astype(dtype)
  if float(value) != rank:
    code, value = "F32", np.asarray(rank, np.float32)
  return code or "F32", value.reshape(())


def new_metadata(metadata: dict[str, str] | None, fmt: Format, modules, ranks) -> dict[str, str] | None:
  """The output's ``__metadata__`` (see the module docstring for the kohya keys)."""
  if metadata is None:
    return None
  new = dict(metadata)
  if fmt is DIFFUSERS:
    configs = _diffusers_configs(metadata)
    if configs:
      flat = {}
      for component, config in configs.items():
        own = {m.name.partition(".")[2]: ranks[m.name] for m in modules if m.name.partition(".")[0] == component}
        fields = adapters.output_config(config, own) if own else config.raw
        flat.update({f"{component}.{k}": v for k, v in fields.items()})
      new[DIFFUSERS_METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
    return new
  if fmt is not KOHYA:
    return new
  top = max(ranks.values())
  old_top = max(m.r for m in modules)
  per_module = len(set(ranks.values())) > 1
  for key in ("ss_network_dim", "ss_network_alpha"):
    if key in new:
      new[key] = str(top)
  conv = [ranks[m.name] for m in modules if len(m.shape_a) > 2]
  if conv and "ss_network_args" in new:
    try:
      args = json.loads(new["ss_network_args"])
    except json.JSONDecodeError:
      args = None
    if isinstance(args, dict):
      for key in ("conv_dim", "conv_alpha"):
        if key in args:
          args[key] = str(max(conv))
      new["ss_network_args"] = json.dumps(args)
  if "ss_training_comment" in new or "ss_network_dim" in new:
    note = (
        f"lora-squeeze: rank {old_top} -> {'per module, max ' if per_module else ''}{top}, "
        "alpha = rank (scale folded into the factors)"
    )
    comment = new.get("ss_training_comment", "")
    new["ss_training_comment"] = f"{note}; {comment}" if comment else note
  for key in [k for k in new if k.startswith("sshs_")]:
    del new[key]
  return new


def squeeze_file(
    in_path: str | os.PathLike, out_path: str | os.PathLike, options: adapters.SqueezeOptions
) -> adapters.SqueezeReport:
  """``adapters.squeeze_adapter`` for a single-file LoRA (same arguments; see the module docstring).

  Raises:
    AdapterError: bad input or arguments; ``out_path`` is then left absent (or untouched).
  """
  start = time.perf_counter()
  in_path, out_path = Path(in_path), Path(out_path)
  if not in_path.exists():
    raise AdapterError(f"{in_path}: no such file or directory")
  if gguf_lora.is_gguf(in_path):  # told by content, as the two safetensors layouts are
    return gguf_lora.squeeze_gguf(in_path, out_path, options)
  if in_path.suffix.lower() == ".gguf":
    raise AdapterError(f"{in_path}: not a GGUF file (it does not start with the magic {gguf_lora.MAGIC!r})")
  with LoraFile(in_path) as lf:  # the input is judged first (its header only), then the output path
    check_out_file(in_path, out_path, options.force, options.dry_run)
    modules = lf.modules
    plan = adapters.plan_squeeze(lf, options)
    ranks = plan.ranks
    code = options.out_code

    entries, alphas = [], {}
    for m in modules:
      entries += adapters.factor_entries(m, ranks[m.name], code)
      if m.key_alpha:
        alphas[m.name] = _alpha_tensor(ranks[m.name], m.dtype_alpha)
        entries.append((m.key_alpha, alphas[m.name][0], ()))
    entries += [(k, lf.reader.tensors[k].dtype, lf.reader.tensors[k].shape) for k in lf.passthrough]
    metadata = new_metadata(lf.reader.metadata, lf.format, modules, ranks)
    alpha_note = (
        "alpha = new rank"
        if alphas
        else f"{DIFFUSERS_METADATA_KEY}: lora_alpha = r"
        if lf.configs
        else "no alpha tensors"
    )
    top = max(ranks.values())
    report = adapters.SqueezeReport(
        in_dir=in_path,
        out_dir=out_path,
        method=options.method,
        dry_run=options.dry_run,
        modules=[],
        passthrough=list(lf.passthrough),
        copied_files=[],
        config=dict(metadata or {}),
        in_bytes=lf.reader.file_size,
        out_bytes=adapters.safetensors_size(entries, metadata),
        note=plan.note,
        config_line=(
            f"format: {lf.format.name}, scale 1 in every module ({alpha_note}, the old scale folded "
            "into the factors)"
            + (
                f"; ss_network_dim/alpha = {top}"
                + (" (the largest module: ranks differ per module)" if len(set(ranks.values())) > 1 else "")
                if metadata and "ss_network_dim" in metadata
                else ""
            )
        ),
        weights_name=None,
        passthrough_line=lf.passthrough_line(),
    )

    if options.dry_run:
      report.modules = [plan.module_report(m) for m in modules]
      report.seconds = time.perf_counter() - start
      return report

    # The output appears complete or not at all: written beside it, then renamed over it.
    with atomic_file(out_path) as tmp:
      writer = adapters.SafetensorsWriter(tmp, entries, metadata)
      try:
        for m, factors in adapters.squeezed_factors(lf, modules, plan, options, report):
          for key, x in factors:
            writer.write(key, x)
          if m.key_alpha:
            writer.write(m.key_alpha, alphas[m.name][1])
        for k in lf.passthrough:
          writer.write(k, lf.reader.read(k))
        writer.close()
      except BaseException:
        writer.abort()
        raise
  report.seconds = time.perf_counter() - start
  return report
