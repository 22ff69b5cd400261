"""``lora-squeeze inspect``: each module's spectrum, retention at r/2, r/4, r/8, and retention curves."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import numpy as np

from lora_squeeze import rank_rules
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.peft_adapter import LoraModule, PeftAdapter
from lora_squeeze.adapters.squeezing import adapter_spectra


@dataclasses.dataclass
class InspectReport:
  """Per-module spectra of an adapter's ΔW_eff (``modules`` and ``spectra`` in file order)."""

  directory: Path
  modules: list[LoraModule]
  spectra: dict[str, np.ndarray]

  def table(self, top: int = 4) -> str:
    width = max(len(m.name) for m in self.modules)
    head = (
        f"{'module':<{width}}  {'out x in':>13}  {'r':>4}  {'scale':>7}  {'top singular values':<{9 * top}}"
        f"  {'V(r/2)':>8}  {'V(r/4)':>8}  {'V(r/8)':>8}"
    )
    lines = [head]
    for m in self.modules:
      s = self.spectra[m.name]
      sv = " ".join(f"{x:8.3g}" for x in s[:top])
      rets = "  ".join(f"{float(rank_rules.retention(s, max(1, m.r // d))):8.5f}" for d in (2, 4, 8))
      lines.append(
          f"{m.name:<{width}}  {m.out_features:>6}x{m.in_features:<6}  {m.r:>4}  {m.scale:>7.4g}  "
          f"{sv:<{9 * top}}  {rets}"
      )
    return "\n".join(lines)

  def summary(self) -> str:
    by_kind = collections.defaultdict(list)
    for m in self.modules:
      by_kind[m.kind].append(m)
    params = sum(m.r * (m.in_features + m.out_features) for m in self.modules)
    ranks = collections.Counter(m.r for m in self.modules)
    lines = [
        f"{len(self.modules)} LoRA modules, {params:,} LoRA parameters, ranks "
        + ", ".join(f"{r} ({c})" for r, c in sorted(ranks.items())),
        "mean retention by module type (V at r/2, r/4, r/8):",
    ]
    for kind, ms in sorted(by_kind.items()):
      means = [
          np.mean([float(rank_rules.retention(self.spectra[m.name], max(1, m.r // d))) for m in ms]) for d in (2, 4, 8)
      ]
      lines.append(f"  {kind:<16} ({len(ms):>3})  " + "  ".join(f"{v:.5f}" for v in means))
    homo = ", ".join(f"{e:g} -> r={rank_rules.choose_homogeneous_rank(self.spectra, e)}" for e in (0.9, 0.95, 0.99))
    lines.append(f"one rank for all modules keeping energy E (lora-squeeze squeeze --energy E): {homo}")
    return "\n".join(lines)

  def plot(self, path: str | os.PathLike) -> None:
    """Retention curves V_k (k = 1..r): the mean over all modules and the mean per module type."""
    check_plot_path(path)
    import matplotlib  # pylint: disable=g-import-not-at-top  (heavy, optional: --plot only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (heavy, optional: --plot only)

    r_max = max(m.r for m in self.modules)
    ks = np.arange(1, r_max + 1)

    def curve(s):
      s2 = np.asarray(s, np.float64) ** 2
      c = np.cumsum(s2) / s2.sum() if s2.sum() > 0 else np.ones_like(s2)
      return np.concatenate([c, np.ones(r_max - len(c))])[:r_max]

    curves = {m.name: curve(self.spectra[m.name]) for m in self.modules}
    by_kind = collections.defaultdict(list)
    for m in self.modules:
      by_kind[m.kind].append(curves[m.name])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, cs in sorted(by_kind.items()):
      ax.plot(ks, np.mean(cs, axis=0), lw=1.2, label=kind)
    ax.plot(ks, np.mean(list(curves.values()), axis=0), color="black", lw=2.5, label="mean (all)")
    for e in (0.9, 0.99):
      ax.axhline(e, color="gray", lw=0.6, ls="--")
    ax.set(
        xlabel="rank $k$",
        ylabel=r"retention $V_k = \sum_{i \leq k} \sigma_i^2 / \sum_i \sigma_i^2$",
        ylim=(0, 1.02),
        xlim=(1, r_max),
        title=f"LoRA energy retention: {self.directory.name}",
    )
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_plot_path(path: str | os.PathLike) -> None:
  """Raises AdapterError unless matplotlib can save a figure to ``path``: an extension it knows (matplotlib's
  own list) in an existing directory. The command runs this before the spectra, so a typo costs no pass
  over the adapter (an unknown format used to end in matplotlib's traceback after all the work; no
  extension would make matplotlib append ".png" to the name)."""
  try:
    from matplotlib.backend_bases import FigureCanvasBase  # pylint: disable=g-import-not-at-top  (heavy, optional)
  except ImportError:
    raise AdapterError("--plot needs matplotlib (pip install matplotlib)") from None
  formats = sorted(FigureCanvasBase.get_supported_filetypes())
  valid = ", ".join(f".{f}" for f in formats)
  path = Path(path)
  suffix = path.suffix.lower()[1:]
  if not suffix:
    raise AdapterError(f"--plot {path}: no file extension; use one of {valid}")
  if suffix not in formats:
    raise AdapterError(f"--plot {path}: unknown plot format '.{suffix}'; use one of {valid}")
  if not path.parent.is_dir():
    raise AdapterError(f"--plot {path}: no such directory {path.parent}")


def inspect_adapter(directory: str | os.PathLike, *, progress: bool = True) -> InspectReport:
  """Spectra of every module's ΔW_eff (efficient route: never forms ΔW); a PEFT directory or a single
  kohya / diffusers file."""
  if not Path(directory).is_dir():
    # lora_files imports this package (adapters/__init__.py imports this module): an import cycle, hence here.
    from lora_squeeze import lora_files  # pylint: disable=g-import-not-at-top  (import cycle)

    with lora_files.open_lora_file(directory) as adapter:
      return InspectReport(
          directory=Path(directory), modules=list(adapter.modules), spectra=adapter_spectra(adapter, progress=progress)
      )
  with PeftAdapter(directory) as adapter:
    return InspectReport(
        directory=Path(directory), modules=list(adapter.modules), spectra=adapter_spectra(adapter, progress=progress)
    )
