"""Squeezing a PEFT adapter directory: rank planning, the squeeze loop every format shares, and the report.

The squeeze (Post-Squeeze, the paper's Sec. 3) replaces each module's ΔW_eff by its best rank-r_tgt
approximation (Eckart–Young) via ``squeeze.squeeze_factors``. We hand it a = √scale·Aᵀ (in, r) and
b = √scale·Bᵀ (r, out), so a @ b = ΔW_effᵀ: the transpose has the same singular values, and it keeps
squeeze.py's convention that ``a`` is the input side, which is also the side PEFT initialises randomly (a
rank increase adds random A rows and zero B columns, like a fresh PEFT LoRA). The new factors are
B' = U_r Σ_r^½, A' = Σ_r^½ V_rᵀ for ΔW_eff = U Σ Vᵀ, written with scale 1 (``peft_config.output_config``).

A rank above a module's full rank min(out, in) is capped there (``plan_ranks``; one note on stderr), since
ΔW is exact at full rank. The ``--sv-*`` rules are kohya sd-scripts' dynamic resize rules
(``DYNAMIC_RULES``, ``rank_rules.rank_sv_*``), each module's rank from its own spectrum.

Memory: the adapter is streamed, one module's factors at a time (``safetensors_io``): peak memory is about
one module's factors plus the JAX runtime, whatever the adapter's size. The output directory is built next
to OUT_DIR and renamed into place at the end (``atomic_output``): on any error OUT_DIR does not exist.

Speed (experiments/peft_squeeze_speed.py, squeeze_speed.py, flux_squeeze_speed.py: whole adapters in
seconds on 2 CPU cores, where the full-ΔW SVD route takes hours): the efficient route costs milliseconds
per module, so fixed costs would dominate. It runs on squeeze's host route (numpy/LAPACK: no XLA compile,
no per-call dispatch), and ``squeeze_modules``, the one loop of the PEFT, single-file and GGUF paths, reads
and squeezes modules side by side in threads (``squeeze_host.host_map``) while the caller writes the results in
order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from lora_squeeze import rank_rules, squeeze, squeeze_host
from lora_squeeze.adapters.atomic_output import atomic_dir, check_out_dir, fault_point
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.peft_adapter import LoraModule, PeftAdapter
from lora_squeeze.adapters.peft_config import CONFIG_NAME, TORCH_WEIGHTS_NAME, WEIGHTS_NAME, output_config
from lora_squeeze.adapters.safetensors_io import OUT_CODES, SafetensorsWriter, cast_factor, safetensors_size

METHODS = squeeze.METHODS
DTYPES = ("keep", "float32", "bfloat16", "float16")


def squeeze_matrices(
    a: np.ndarray,
    b: np.ndarray,
    rank: int,
    *,
    method: str = "efficient",
    key: jax.Array | np.ndarray | None = None,
    where: str = "",
    compute_rank: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``squeeze.squeeze_factors`` for one module: (a' (m, rank), b' (rank, n), singular values), numpy float32.

  "efficient" takes squeeze's host route (numpy/LAPACK, nothing compiled). "svd" and "rsvd" run compiled
  XLA programs, where every distinct (shape, rank) costs a compile of seconds on CPU, so "svd" computes at
  ``compute_rank`` (>= rank; one value for a whole adapter) and keeps the first ``rank`` directions: it
  computes the full spectrum and treats each direction on its own, so this is the rank-``rank`` result (also
  for directions re-initialised for lack of energy). "rsvd" sketches with rank + k_o columns, so it always
  runs at ``rank``. ``key``: a PRNG key or its raw key data (``squeeze_factors``).
  """
  if method == "efficient":
    out = squeeze.squeeze_factors(a, b, rank, method=method, key=key, where=where, route="host")
    return out.a, out.b, out.singular_values
  k = rank if method == "rsvd" or compute_rank is None else max(rank, compute_rank)
  # numpy in and out: on a jax.Array every a[None] or slice is a dispatch (~1 ms on CPU) or even a compile.
  out = squeeze.squeeze_factors(a, b, k, method=method, key=key, where=where, route="xla")
  return (np.array(np.asarray(out.a)[:, :rank]), np.array(np.asarray(out.b)[:rank]), np.asarray(out.singular_values))


def progress_bar(iterable, total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr (only on a terminal: None lets tqdm decide), or the bare iterable."""
  if not enabled:
    return iterable
  return tqdm(iterable, total=total, desc=desc, unit="module", file=sys.stderr, disable=None, leave=False)


def squeeze_modules(
    source,
    modules: Sequence[LoraModule],
    ranks: Mapping[str, int],
    *,
    method: str,
    seed: int = 0,
    progress: bool = True,
) -> Iterable[tuple[int, LoraModule, np.ndarray, np.ndarray, np.ndarray]]:
  """(i, module, a', b', singular values) for every module in order: the squeeze of the command, for a PEFT
  directory and a single file alike (``source`` has ``factors(module)``, as PeftAdapter and LoraFile do).

  "efficient": modules are read and squeezed in ``squeeze_host.host_map``'s threads (one per core, at most 8),
  each on the host route with BLAS on one thread; the caller writes each result as it comes, so about one
  module per thread is in memory at a time. "svd"/"rsvd" run one module at a time in this thread
  (``squeeze_matrices``, all at one compute rank, the largest target: ranks are capped at each module's
  full rank, so it never exceeds the largest min(m, n)). Module i's key is
  ``jax.random.split(jax.random.key(seed), len(modules))[i]`` (made in one dispatch, not one per module).
  """
  key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), len(modules))))
  compute_rank = max(ranks[m.name] for m in modules)

  def one(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = modules[i]
    a, b = source.factors(m)
    return squeeze_matrices(
        a, b, ranks[m.name], method=method, where=m.name, key=key_data[i], compute_rank=compute_rank
    )

  indices = range(len(modules))
  results = squeeze_host.host_map(one, indices) if method == "efficient" else map(one, indices)
  for i, (new_a, new_b, s) in enumerate(progress_bar(results, len(modules), "squeeze", progress)):
    yield i, modules[i], new_a, new_b, s


def factor_entries(m: LoraModule, rank: int, code) -> list[tuple[str, str, tuple[int, ...]]]:
  """The header entries (key, dtype code, shape) of module ``m``'s two factors at ``rank``; ``code`` is
  ``SqueezeOptions.out_code``."""
  shape_a, shape_b = m.new_shapes(rank)
  return [(m.key_a, code(m.dtype_a), shape_a), (m.key_b, code(m.dtype_b), shape_b)]


def squeezed_factors(source, modules: Sequence[LoraModule], plan, options, report, fold=None):
  """``squeeze_modules`` for a writer (every format): per module, (module, [(key_a, A'), (key_b, B')]) in the
  input's layout and the output dtype. Once the caller has written them (when it asks for the next module)
  the module's ModuleReport is appended to ``report`` and its fault point passes. ``fold``: module -> a
  factor both new factors are multiplied by (GGUF's √(r_m / alpha)); None for none."""
  ranks, code = plan.ranks, options.out_code
  for i, m, new_a, new_b, s in squeeze_modules(
      source, modules, ranks, method=options.method, seed=options.seed, progress=options.progress
  ):
    if fold is not None:
      f = fold(m)
      if f != 1:
        new_a, new_b = new_a * f, new_b * f
    shape_a, shape_b = m.new_shapes(ranks[m.name])
    yield m, [
        (m.key_a, cast_factor(new_a.T.reshape(shape_a), code(m.dtype_a), m.name)),
        (m.key_b, cast_factor(new_b.T.reshape(shape_b), code(m.dtype_b), m.name)),
    ]
    report.modules.append(plan.module_report(m, s))
    fault_point(f"squeeze_after_module:{i}")


def adapter_spectra(adapter: PeftAdapter, *, progress: bool = True) -> dict[str, np.ndarray]:
  """{module name: all r singular values of its ΔW_eff} (efficient route, never forming ΔW), reading one
  module at a time in ``squeeze_host.host_map``'s threads."""
  values = squeeze_host.host_map(lambda m: squeeze.singular_values(*adapter.factors(m), route="host"), adapter.modules)
  return {m.name: s for m, s in zip(adapter.modules, progress_bar(values, len(adapter.modules), "spectra", progress))}


# kohya sd-scripts' dynamic rank rules (networks/resize_lora.py), each choosing every module's rank from
# its own spectrum: the rank_rules.rank_* function, and the command's flag.
DYNAMIC_RULES = {
    "sv_ratio": rank_rules.rank_sv_ratio,
    "sv_fro": rank_rules.rank_sv_fro,
    "sv_cumulative": rank_rules.rank_sv_cumulative,
}


def check_target(
    rank: int | None,
    energy: float | None,
    per_module: bool,
    *,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> None:
  """Raises AdapterError unless exactly one rule is given: rank (>= 1), energy (in (0, 1]) or a ``dynamic``
  kohya rule (name in DYNAMIC_RULES, value); per_module only with energy; max_rank (>= 1) only with energy
  or a dynamic rule. Run before any work, so a typo fails in a second, not after a pass over the adapter."""
  given = [x for x in (rank, energy, dynamic) if x is not None]
  if len(given) != 1:
    raise AdapterError("give exactly one of --rank, --energy, --sv-ratio, --sv-fro and --sv-cumulative")
  if per_module and energy is None:
    raise AdapterError(
        "--per-module needs --energy (with --rank every module gets the same rank; the --sv-* "
        "rules are always per module)"
    )
  if max_rank is not None:
    if rank is not None:
      raise AdapterError("--max-rank goes with --energy or an --sv-* rule, not --rank")
    if max_rank < 1:
      raise AdapterError(f"--max-rank must be >= 1, got {max_rank}")
  if rank is not None:
    if rank < 1:
      raise AdapterError(f"--rank must be >= 1, got {rank}")
  elif energy is not None:
    if not 0.0 < energy <= 1.0:
      raise AdapterError(f"--energy must be in (0, 1], got {energy}")
  else:
    name, value = dynamic
    if name not in DYNAMIC_RULES:
      raise AdapterError(f"unknown rank rule {name!r}; choose one of {', '.join(DYNAMIC_RULES)}")
    ok = value >= 1.0 if name == "sv_ratio" else 0.0 < value <= 1.0
    if not ok:
      flag = "--" + name.replace("_", "-")
      raise AdapterError(f"{flag} must be {'>= 1' if name == 'sv_ratio' else 'in (0, 1]'}, got {value}")


def wanted_ranks(
    modules: Sequence[LoraModule],
    spectra: Mapping[str, np.ndarray] | None,
    *,
    rank: int | None,
    energy: float | None,
    per_module: bool,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
  """``plan_ranks`` before the full-rank cap (``max_rank`` already applied)."""
  check_target(rank, energy, per_module, dynamic=dynamic, max_rank=max_rank)
  if rank is not None:
    return {m.name: rank for m in modules}
  if dynamic is not None:
    rule, value = DYNAMIC_RULES[dynamic[0]], dynamic[1]
    wanted = {m.name: rule(spectra[m.name], value) for m in modules}
  elif per_module:
    wanted = {m.name: rank_rules.choose_rank(spectra[m.name], energy) for m in modules}
  else:
    r = rank_rules.choose_homogeneous_rank({m.name: spectra[m.name] for m in modules}, energy)
    wanted = {m.name: r for m in modules}
  return {n: min(r, max_rank) if max_rank else r for n, r in wanted.items()}


def plan_ranks(
    modules: Sequence[LoraModule],
    spectra: Mapping[str, np.ndarray] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    per_module: bool = False,
    dynamic: tuple[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
  """Each module's target rank: ``rank`` everywhere, from the retention target ``energy``, or from a kohya
  ``dynamic`` rule (``DYNAMIC_RULES``: each module from its own spectrum), at most ``max_rank``.

  ``energy`` alone: one rank for all, the largest of the per-module choices (``choose_homogeneous_rank``);
  with ``per_module``: each module's own smallest rank with V_r >= energy (``choose_rank``). Every rank is
  capped at the module's full rank min(out, in) (``LoraModule.full_rank``): ΔW_eff is then kept exactly,
  and a higher rank would only add random A rows with zero B columns, bytes that change nothing (``--rank
  1000000`` wrote a 1.9 GiB adapter). A rank above r_src but within the full rank is kept (it grows the
  adapter, ΔW exact).
  """
  wanted = wanted_ranks(
      modules, spectra, rank=rank, energy=energy, per_module=per_module, dynamic=dynamic, max_rank=max_rank
  )
  return {m.name: min(wanted[m.name], m.full_rank) for m in modules}


def cap_note(
    modules: Sequence[LoraModule],
    wanted: Mapping[str, int],
    ranks: Mapping[str, int],
    rank: int | None,
    energy: float | None,
) -> str | None:
  """The one-line note that ``plan_ranks`` capped some modules' ranks (None when it capped none)."""
  capped = [m for m in modules if ranks[m.name] < wanted[m.name]]
  if not capped:
    return None
  what = (
      f"--rank {rank}"
      if rank is not None
      else f"the rank chosen for --energy {energy:g}"
      if energy is not None
      else "the rank chosen by the --sv-* rule"
  )
  return (
      f"{what} exceeds the full rank of {len(capped)} modules; capped at min(m, n) per module (largest "
      f"{max(ranks[m.name] for m in capped)})"
  )


@dataclasses.dataclass(frozen=True)
class SqueezeOptions:
  """What a squeeze should do, for every format (``squeeze_adapter``, ``lora_files.squeeze_file``,
  ``gguf_lora.squeeze_gguf``); the command builds one from its flags. Checked when made (``AdapterError``), so
  a typo fails before any file is opened.

  Attributes:
    rank: one target rank for every module (capped at each module's full rank min(out, in): see
      ``plan_ranks``; the report's ``note`` says when); or
    energy: a retention target (0, 1]: one rank for all modules (the largest per-module choice), or with
      ``per_module`` each module's own rank (a PEFT output writes it as rank_pattern/alpha_pattern); or
    dynamic: a kohya rule (``DYNAMIC_RULES`` name, value), each module's rank from its own spectrum;
    max_rank: with energy or dynamic, no module's rank above this.
    method: "efficient" (Alg. 2, never forms ΔW), "rsvd" (Alg. 1) or "svd" (full SVD of ΔW).
    dtype: "keep" (each factor's input dtype) or float32/bfloat16/float16 for the new factors.
    dry_run: compute the plan (ranks, retention, sizes) and write nothing.
    force: replace an existing output (never the input).
    seed: PRNG seed (rsvd sketches, init of directions without energy); module i (in file order) uses
      ``jax.random.split(jax.random.key(seed), n_modules)[i]``.
    progress: a progress bar on stderr (on a terminal).
  """

  rank: int | None = None
  energy: float | None = None
  per_module: bool = False
  dynamic: tuple[str, float] | None = None
  max_rank: int | None = None
  method: str = "efficient"
  dtype: str = "keep"
  dry_run: bool = False
  force: bool = False
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    if self.method not in METHODS:
      raise AdapterError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
    if self.dtype not in DTYPES:
      raise AdapterError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
    check_target(self.rank, self.energy, self.per_module, dynamic=self.dynamic, max_rank=self.max_rank)

  @property
  def targets(self) -> dict:
    """The rank rule, as keywords of ``plan_ranks`` / ``wanted_ranks``."""
    return dict(
        rank=self.rank, energy=self.energy, per_module=self.per_module, dynamic=self.dynamic, max_rank=self.max_rank
    )

  def out_code(self, original: str) -> str:
    """The safetensors dtype code a new factor is written in: ``original`` (its input's) for dtype "keep"."""
    return original if self.dtype == "keep" else OUT_CODES[self.dtype]


@dataclasses.dataclass(frozen=True)
class RankPlan:
  """``plan_squeeze``'s answer: each module's new rank, the spectra when they were needed, the cap note."""

  ranks: dict[str, int]
  spectra: dict[str, np.ndarray] | None
  note: str | None

  def module_report(self, m: LoraModule, s: np.ndarray | None = None) -> ModuleReport:
    """One module's line of the report: retention from the planning spectra, else from ``s`` (the
    squeeze's own singular values)."""
    s = self.spectra[m.name] if self.spectra is not None else s
    return ModuleReport(
        name=m.name,
        shape=(m.out_features, m.in_features),
        r_src=m.r,
        r_tgt=self.ranks[m.name],
        scale=m.scale,
        retention=float(rank_rules.retention(np.asarray(s), self.ranks[m.name])),
    )


def plan_squeeze(source, options: SqueezeOptions) -> RankPlan:
  """The planning every format shares: the spectra (only when the rule, a dry run or rsvd needs them: a
  pass over the adapter), each module's rank (``plan_ranks``) and the note about ranks capped at full rank.
  ``source`` has ``modules`` and ``factors(module)`` (PeftAdapter, LoraFile, GgufLora)."""
  need_spectra = options.rank is None or options.dry_run or options.method == "rsvd"
  spectra = adapter_spectra(source, progress=options.progress) if need_spectra else None
  wanted = wanted_ranks(source.modules, spectra, **options.targets)
  ranks = {m.name: min(wanted[m.name], m.full_rank) for m in source.modules}  # = plan_ranks
  return RankPlan(ranks, spectra, cap_note(source.modules, wanted, ranks, options.rank, options.energy))


@dataclasses.dataclass
class ModuleReport:
  """One module's squeeze: its name, (out, in), old and new rank, old scale, retention V_{r_tgt}."""

  name: str
  shape: tuple[int, int]
  r_src: int
  r_tgt: int
  scale: float
  retention: float


@dataclasses.dataclass
class SqueezeReport:
  """What ``squeeze_adapter`` did (or, for a dry run, would do)."""

  in_dir: Path
  out_dir: Path
  method: str
  dry_run: bool
  modules: list[ModuleReport]
  passthrough: list[str]
  copied_files: list[str]
  config: dict
  in_bytes: int
  out_bytes: int
  seconds: float = 0.0
  note: str | None = None  # e.g. that ranks were capped at full rank: the command prints it on stderr
  # Single-file formats (lora_files.py): their own line about the written scale and metadata, the file
  # written (no WEIGHTS_NAME inside a directory), and the line about the tensors copied unchanged.
  config_line: str | None = None
  weights_name: str | None = WEIGHTS_NAME
  passthrough_line: str | None = None

  def table(self) -> str:
    width = max(len(m.name) for m in self.modules)
    lines = [f"{'module':<{width}}  {'out x in':>13}  {'r':>4} -> {'r_new':<5}  {'retention':>9}"]
    for m in self.modules:
      lines.append(
          f"{m.name:<{width}}  {m.shape[0]:>6}x{m.shape[1]:<6}  {m.r_src:>4} -> {m.r_tgt:<5}  " f"{m.retention:>9.5f}"
      )
    return "\n".join(lines)

  def summary(self) -> str:
    ret = np.array([m.retention for m in self.modules])
    changes = collections.Counter((m.r_src, m.r_tgt) for m in self.modules)
    grown = sum(1 for m in self.modules if m.r_tgt > m.r_src)
    verb = "would write" if self.dry_run else "wrote"
    lines = [
        f"{len(self.modules)} LoRA modules, ranks "
        + ", ".join(f"{a}->{b} ({c})" for (a, b), c in sorted(changes.items())),
        f"retention V_r: min {ret.min():.5f}, mean {ret.mean():.5f} (fraction of each ΔW's energy kept)",
        self.config_line
        or f"config: r={self.config['r']}, lora_alpha={self.config['lora_alpha']} (scale 1, folded into the "
        f"factors), {len(self.config['rank_pattern'])} rank_pattern entries",
        f"{verb} {self.out_dir}{': ' + self.weights_name if self.weights_name else ''} "
        f"{fmt_bytes(self.out_bytes)} (input {fmt_bytes(self.in_bytes)})"
        + (f", {len(self.passthrough)} other tensors copied" if self.passthrough else "")
        + (f", {len(self.copied_files)} other files copied" if self.copied_files else ""),
    ]
    if self.passthrough_line:
      lines.append(self.passthrough_line)
    if grown:
      lines.append(
          f"note: {grown} modules grew in rank: ΔW is kept exactly, the new directions are "
          "random A rows with zero B columns"
      )
    if not self.dry_run:
      lines.append(f"method {self.method}, {self.seconds:.1f} s")
    return "\n".join(lines)


def fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def squeeze_adapter(in_dir: str | os.PathLike, out_dir: str | os.PathLike, options: SqueezeOptions) -> SqueezeReport:
  """Writes a copy of the PEFT adapter ``in_dir`` at new ranks to ``out_dir`` (see the module docstring).

  Args:
    in_dir, out_dir: adapter directories; ``out_dir`` must not exist unless ``options.force``, and may never
      be ``in_dir``, contain it or lie inside it. A single file ``in_dir`` goes to ``lora_files.squeeze_file``
      (kohya / diffusers) or ``gguf_lora.squeeze_gguf``.
    options: the rank rule, method, dtype, ... (``SqueezeOptions``).

  Returns:
    A SqueezeReport.

  Raises:
    AdapterError: bad input or arguments; ``out_dir`` is then left absent (or untouched).
  """
  start = time.perf_counter()
  in_dir, out_dir = Path(in_dir), Path(out_dir)
  if not in_dir.is_dir():
    # A single file: kohya / diffusers LoRAs (lora_files.py, which imports this module: hence here).
    from lora_squeeze import lora_files  # pylint: disable=g-import-not-at-top  (import cycle)

    return lora_files.squeeze_file(in_dir, out_dir, options)
  # Before opening anything: an OUT_DIR that is, holds or lies in IN_DIR is refused even for a dry run.
  check_out_dir(out_dir, options.force, inputs=(in_dir,), dry_run=options.dry_run)
  with PeftAdapter(in_dir) as adapter:
    plan = plan_squeeze(adapter, options)
    ranks = plan.ranks
    config = output_config(adapter.config, ranks)
    code = options.out_code

    entries = [e for m in adapter.modules for e in factor_entries(m, ranks[m.name], code)]
    entries += [(k, adapter.reader.tensors[k].dtype, adapter.reader.tensors[k].shape) for k in adapter.passthrough]
    metadata = adapter.reader.metadata if adapter.reader.metadata is not None else {"format": "pt"}
    extra_files = sorted(
        p.name
        for p in in_dir.iterdir()
        if p.is_file() and p.name not in (CONFIG_NAME, WEIGHTS_NAME, TORCH_WEIGHTS_NAME)
    )
    report = SqueezeReport(
        in_dir=in_dir,
        out_dir=out_dir,
        method=options.method,
        dry_run=options.dry_run,
        modules=[],
        passthrough=list(adapter.passthrough),
        copied_files=extra_files,
        config=config,
        in_bytes=adapter.reader.file_size,
        out_bytes=safetensors_size(entries, metadata),
        note=plan.note,
    )

    if options.dry_run:
      report.modules = [plan.module_report(m) for m in adapter.modules]
      report.seconds = time.perf_counter() - start
      return report

    with atomic_dir(out_dir) as tmp:
      writer = SafetensorsWriter(tmp / WEIGHTS_NAME, entries, metadata)
      try:
        for _, factors in squeezed_factors(adapter, adapter.modules, plan, options, report):
          for key, x in factors:
            writer.write(key, x)
        for k in adapter.passthrough:
          writer.write(k, adapter.reader.read(k))
      except BaseException:
        writer.abort()
        raise
      writer.close()
      (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
      for name in extra_files:
        shutil.copy2(in_dir / name, tmp / name)
  report.seconds = time.perf_counter() - start
  return report
