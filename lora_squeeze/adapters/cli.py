"""The ``lora-squeeze`` command (``python -m lora_squeeze.adapters`` runs it too).

    lora-squeeze squeeze IN OUT --rank R  [--method efficient|rsvd|svd] [--dtype keep|float32|...]
    lora-squeeze squeeze IN OUT --energy E [--per-module] [--max-rank N] [--dry-run] [--force]
    lora-squeeze squeeze IN OUT --sv-ratio R | --sv-fro F | --sv-cumulative C [--max-rank N]
    lora-squeeze inspect IN [--plot retention.png|.pdf|.svg|...]
    lora-squeeze convert PEFT_DIR OUT.gguf [--arch gemma3]  |  lora-squeeze convert IN.gguf PEFT_DIR

Input formats are told by content: a PEFT adapter directory (``squeezing``), a single-file kohya /
LyCORIS / diffusers LoRA (``lora_files.py``) or a GGUF LoRA of llama.cpp / ollama (``gguf_lora.py``); the
``convert`` command is ``gguf_convert.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lora_squeeze import runtime
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.gemma_peft import HF_LAYOUTS
from lora_squeeze.adapters.inspection import check_plot_path, inspect_adapter
from lora_squeeze.adapters.squeezing import DTYPES, DYNAMIC_RULES, METHODS, SqueezeOptions, squeeze_adapter


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="lora-squeeze",
      description="Change the rank of LoRA adapters with SVD (LoRA-Squeeze, arXiv "
      "2602.10993): Hugging Face PEFT adapter directories, single .safetensors files in kohya sd-scripts / "
      "LyCORIS (lora_down/lora_up/alpha) or diffusers / ComfyUI (lora_A/lora_B[/alpha]) form, detected from "
      "the keys, and GGUF LoRAs of llama.cpp / ollama (detected by the GGUF magic), each written back in the "
      "same form. No torch needed.",
  )
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser(
      "squeeze",
      help="write a copy of an adapter at a new rank",
      description="Write IN's adapter at a new rank to OUT (a PEFT directory to a directory, a "
      ".safetensors file to a file). Each module's effective ΔW = scale·B@A is replaced by its "
      "best rank-r approximation; the output has scale 1 (alpha = r), the old scale folded "
      "evenly into both factors. Tensors that are not a low-rank product (LoHa, LoKr, full "
      "diffs, DoRA magnitudes) are copied unchanged.",
  )
  s.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory, a LoRA .safetensors file or a GGUF LoRA")
  s.add_argument("out_dir", metavar="OUT", help="the output directory (PEFT), .safetensors or .gguf file")
  target = s.add_mutually_exclusive_group(required=True)
  target.add_argument(
      "--rank",
      type=int,
      help="the new rank of every module, capped at each module's full "
      "rank min(out, in) (where ΔW is exact; a note on stderr says so). A rank above the "
      "input's r is allowed: ΔW stays exact, the new directions are random A rows with zero "
      "B columns",
  )
  target.add_argument(
      "--energy",
      type=float,
      help="keep this fraction of each module's energy (retention "
      "V_r = Σ_{i≤r} s_i² / Σ s_i² >= E): one rank for all, the largest needed (or per "
      "module with --per-module)",
  )
  target.add_argument(
      "--sv-ratio",
      type=float,
      metavar="R",
      help="kohya's sv_ratio, per module: keep the " "singular values s_i > s_max / R (R >= 1; at least 1)",
  )
  target.add_argument(
      "--sv-fro",
      type=float,
      metavar="F",
      help="kohya's sv_fro, per module: the smallest r "
      "with sqrt(Σ_{i≤r} s_i² / Σ s_i²) >= F (0 < F <= 1; same as --energy F² --per-module)",
  )
  target.add_argument(
      "--sv-cumulative",
      type=float,
      metavar="C",
      help="kohya's sv_cumulative, per module: " "the smallest r with Σ_{i≤r} s_i / Σ s_i >= C (0 < C <= 1)",
  )
  s.add_argument("--max-rank", type=int, metavar="N", help="with --energy or --sv-*: no module above rank N")
  s.add_argument(
      "--per-module",
      action="store_true",
      help="with --energy: each module its own rank (written as rank_pattern/alpha_pattern)",
  )
  s.add_argument(
      "--method",
      choices=METHODS,
      default="efficient",
      help="efficient: never forms ΔW (default); rsvd: randomized SVD of ΔW; svd: full SVD of ΔW",
  )
  s.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype of the new factors (default: as input)")
  s.add_argument("--dry-run", action="store_true", help="print the plan (ranks, retention, size); write nothing")
  s.add_argument(
      "--force",
      action="store_true",
      help="replace OUT if it exists (never IN itself, nor a "
      "directory that is, contains or lies inside IN: refused)",
  )
  s.add_argument("--seed", type=int, default=0, help="PRNG seed (rsvd sketches, init of energy-free directions)")
  s.add_argument("--no-progress", action="store_true", help="no progress bar")
  # PEFT <-> GGUF LoRAs (llama.cpp / ollama): gguf_convert.py.
  c = sub.add_parser(
      "convert",
      help="PEFT adapter directory <-> GGUF LoRA file (llama.cpp --lora, ollama " "ADAPTER)",
      description="Convert a PEFT adapter directory to a GGUF LoRA file (OUT ends in "
      ".gguf; as llama.cpp's convert_lora_to_gguf.py writes it, without torch or the base model) "
      "or a GGUF LoRA file to a PEFT adapter directory (any other OUT).",
  )
  c.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory or a GGUF LoRA file")
  c.add_argument("out_dir", metavar="OUT", help="OUT.gguf, or the PEFT adapter directory to write")
  c.add_argument(
      "--arch",
      help="PEFT -> GGUF: llama.cpp's architecture name (gemma3, llama, ...; default: "
      "from base_model_name_or_path in adapter_config.json)",
  )
  c.add_argument(
      "--layout",
      default="causal_lm",
      choices=tuple(HF_LAYOUTS),
      help="GGUF -> PEFT: module "
      "names of Gemma3ForCausalLM / Llama-style models (causal_lm: model.layers) or of "
      "Gemma3ForConditionalGeneration (model.language_model.layers)",
  )
  c.add_argument(
      "--dtype",
      choices=DTYPES,
      help="dtype of the written factors (default: float32 for GGUF, as " "llama.cpp's converter; keep for PEFT)",
  )
  c.add_argument("--force", action="store_true", help="replace OUT if it exists (never IN)")
  i = sub.add_parser("inspect", help="print each module's spectrum and retention at r/2, r/4, r/8")
  i.add_argument("in_dir", metavar="IN", help="a PEFT adapter directory, a LoRA .safetensors file or a GGUF LoRA")
  i.add_argument(
      "--plot",
      metavar="PATH.png",
      help="also write retention curves to this file; its extension "
      "picks the format (.png, .pdf, .svg, ... : matplotlib's formats), checked before any work",
  )
  i.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The ``lora-squeeze`` command; returns the exit status (2 for user errors, message on stderr).

  Being the command, it also turns on the on-disk compile cache (``runtime.enable_compile_cache``) and
  drops native libraries' harmless log lines (``runtime.quiet_native_logs``); library users call
  ``squeeze_adapter`` / ``inspect_adapter``.
  """
  args = _parser().parse_args(argv)
  runtime.quiet_native_logs()
  try:
    if args.command == "inspect" and args.plot:
      check_plot_path(args.plot)  # before the cache directory and the spectra: a typo costs nothing
    runtime.enable_compile_cache()
    if args.command == "squeeze":
      dynamic = next(((name, getattr(args, name)) for name in DYNAMIC_RULES if getattr(args, name) is not None), None)
      options = SqueezeOptions(
          rank=args.rank,
          energy=args.energy,
          per_module=args.per_module,
          dynamic=dynamic,
          max_rank=args.max_rank,
          method=args.method,
          dtype=args.dtype,
          dry_run=args.dry_run,
          force=args.force,
          seed=args.seed,
          progress=not args.no_progress,
      )
      report = squeeze_adapter(args.in_dir, args.out_dir, options)
      if report.note:
        print(f"lora-squeeze: note: {report.note}", file=sys.stderr)
      if args.dry_run:
        print(report.table())
        print()
      print(report.summary())
    elif args.command == "convert":
      # gguf_convert imports this package (adapters/__init__.py imports this module): hence here.
      from lora_squeeze import gguf_convert  # pylint: disable=g-import-not-at-top  (import cycle)

      print(
          gguf_convert.convert(
              args.in_dir, args.out_dir, arch=args.arch, layout=args.layout, dtype=args.dtype, force=args.force
          ).summary()
      )
    else:
      report = inspect_adapter(args.in_dir, progress=not args.no_progress)
      print(report.table())
      print()
      print(report.summary())
      if args.plot:
        try:
          report.plot(args.plot)
        except OSError as e:
          raise AdapterError(f"{args.plot}: cannot write the plot ({e.strerror})") from None
        print(f"wrote {args.plot}")
  except AdapterError as e:
    print(f"lora-squeeze: error: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:  # `lora-squeeze inspect DIR | head`: stop quietly, like other command-line tools
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
    return 141
  except OSError as e:  # e.g. a full disk: not the user's input, but still one line, not a traceback
    print(f"lora-squeeze: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("lora-squeeze: interrupted (nothing written)", file=sys.stderr)
    return 130
  return 0
