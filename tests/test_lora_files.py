"""Single-file LoRAs (kohya / diffusers), kohya's dynamic rank rules, and the light install.

The fixtures in tests/fixtures/ were written by the real producers (diffusers' convert_state_dict_to_kohya,
PEFT, FluxPipeline.save_lora_weights, lycoris-lora): see tests/fixtures/make_fixtures.py. Every expected
value here is computed independently of lora_squeeze: ΔW from the raw tensors with each format's documented
scale rule, truncated with numpy's float64 SVD.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_squeeze import adapters, rank_rules

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TOL = 2e-5


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
  monkeypatch.setenv("LORA_SQUEEZE_JAX_CACHE", "")


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
  with safe_open(str(path), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def run_cli(*argv) -> int:
  return adapters.main([str(a) for a in argv] + ["--no-progress"])


def kohya_deltas(tensors: dict) -> dict[str, np.ndarray]:
  """ΔW = (alpha / r) · up.reshape(out, r) @ down.reshape(r, -1), alpha = r when absent (sd-scripts)."""
  out = {}
  for key, down in tensors.items():
    if key.endswith(".lora_down.weight"):
      prefix = key[: -len(".lora_down.weight")]
      up = tensors[f"{prefix}.lora_up.weight"].astype(np.float64)
      r = down.shape[0]
      alpha = float(tensors[f"{prefix}.alpha"]) if f"{prefix}.alpha" in tensors else r
      out[prefix] = alpha / r * up.reshape(up.shape[0], r) @ down.astype(np.float64).reshape(r, -1)
  return out


def diffusers_deltas(tensors: dict, scale_of=None) -> dict[str, np.ndarray]:
  """ΔW = scale · B @ A; scale = alpha / r with an alpha tensor, else ``scale_of(prefix, r)`` (default 1)."""
  out = {}
  for key, a in tensors.items():
    if key.endswith(".lora_A.weight"):
      prefix = key[: -len(".lora_A.weight")]
      b = tensors[f"{prefix}.lora_B.weight"].astype(np.float64)
      r = a.shape[0]
      if f"{prefix}.alpha" in tensors:
        scale = float(tensors[f"{prefix}.alpha"]) / r
      else:
        scale = scale_of(prefix, r) if scale_of else 1.0
      out[prefix] = scale * b.reshape(b.shape[0], r) @ a.astype(np.float64).reshape(r, -1)
  return out


def truncate(w: np.ndarray, k: int) -> np.ndarray:
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


def assert_truncated(before: dict, after: dict, k: int) -> None:
  assert sorted(before) == sorted(after)
  for name, w in before.items():
    want = truncate(w, k)
    err = np.abs(after[name] - want).max() / max(np.abs(want).max(), 1e-12)
    assert err < TOL, (name, err)


def metadata_scale(metadata: dict) -> "callable":
  """diffusers' lora_adapter_metadata as its loader reads it: lora_alpha / r, patterns by module tail."""
  flat = json.loads(metadata["lora_adapter_metadata"])

  def scale(prefix: str, r: int) -> float:
    component, _, inner = prefix.partition(".")
    rank = flat[f"{component}.r"]
    for key, value in flat.get(f"{component}.rank_pattern", {}).items():
      if inner == key or inner.endswith("." + key):
        rank = value
    alpha = flat[f"{component}.lora_alpha"]
    for key, value in flat.get(f"{component}.alpha_pattern", {}).items():
      if inner == key or inner.endswith("." + key):
        alpha = value
    assert rank == r, (prefix, rank, r)
    return alpha / r

  return scale


# --------------------------------------------------------------------------------------------------------
# Formats: the real producers' files in, the same format out, ΔW the best rank-k approximation.
# --------------------------------------------------------------------------------------------------------


def test_kohya_fixture_squeezes_with_conv_and_loha_copied(tmp_path, capsys):
  src = FIXTURES / "kohya_unet.safetensors"
  out = tmp_path / "small.safetensors"
  assert run_cli("squeeze", src, out, "--rank", 2) == 0
  printed = capsys.readouterr().out
  assert "format: kohya" in printed
  assert "copied unchanged (not a low-rank pair): 5 tensors (5 LoHa)" in printed
  before, meta_in = load(src)
  after, meta = load(out)
  assert any(v.ndim == 4 for k, v in before.items() if k.endswith("lora_down.weight"))  # a conv LoRA is covered
  assert_truncated(kohya_deltas(before), kohya_deltas(after), 2)
  for k, v in after.items():
    if k.endswith(".lora_down.weight"):
      prefix = k[: -len(".lora_down.weight")]
      assert v.shape[0] == 2 and float(after[f"{prefix}.alpha"]) == 2.0  # alpha = new rank: scale 1
      assert after[f"{prefix}.alpha"].dtype == before[f"{prefix}.alpha"].dtype
      up = after[f"{prefix}.lora_up.weight"]
      assert up.shape[1] == 2 and up.shape[2:] == before[f"{prefix}.lora_up.weight"].shape[2:]
  for k in before:
    if ".hada_" in k or k == "lora_unet_down_blocks_0_attentions_0_proj_in.alpha":
      np.testing.assert_array_equal(after[k], before[k])
  assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
  assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
  assert meta["ss_training_comment"].endswith("; tiny fixture") and "4 -> 2" in meta["ss_training_comment"]
  assert not any(k.startswith("sshs_") for k in meta) and "sshs_model_hash" in meta_in


def test_kohya_alpha_is_folded_and_per_module_metadata_names_the_max(tmp_path, capsys):
  """alpha != r (scale 1/4 and 3/4): folded into the factors; --energy --per-module gives ranks that differ."""
  tensors, meta = load(FIXTURES / "kohya_unet.safetensors")
  alphas = [k for k in tensors if k.endswith(".alpha") and "proj_in" not in k]
  for i, k in enumerate(alphas):
    tensors[k] = np.asarray(1.0 if i % 2 else 3.0, np.float16)
  src = tmp_path / "in.safetensors"
  save_file(tensors, str(src), meta)
  out = tmp_path / "out.safetensors"
  assert run_cli("squeeze", src, out, "--energy", 0.9, "--per-module") == 0
  after, new_meta = load(out)
  want, got = kohya_deltas(tensors), kohya_deltas(after)
  ranks = {p: after[f"{p}.lora_down.weight"].shape[0] for p in want}
  assert len(set(ranks.values())) > 1, ranks
  for p, w in want.items():
    s = np.linalg.svd(w, compute_uv=False)
    assert ranks[p] == int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.9 - 1e-12)) + 1
    np.testing.assert_allclose(got[p], truncate(w, ranks[p]), atol=TOL * np.abs(w).max())
    assert float(after[f"{p}.alpha"]) == ranks[p]
  assert new_meta["ss_network_dim"] == str(max(ranks.values()))
  assert "per module, max" in new_meta["ss_training_comment"]


def test_diffusers_fixture_uses_and_rewrites_the_adapter_metadata(tmp_path):
  """FluxPipeline.save_lora_weights: lora_alpha=8, r=4, to_k r=2 via rank_pattern (scales 2 and 4)."""
  src = FIXTURES / "diffusers_flux.safetensors"
  before, meta_in = load(src)
  want = diffusers_deltas(before, metadata_scale(meta_in))
  assert {round(metadata_scale(meta_in)(p, before[f"{p}.lora_A.weight"].shape[0]), 6) for p in want} == {2.0, 4.0}
  out = tmp_path / "out.safetensors"
  assert run_cli("squeeze", src, out, "--rank", 1) == 0
  after, meta = load(out)
  got = diffusers_deltas(after, metadata_scale(meta))
  assert_truncated(want, got, 1)
  flat = json.loads(meta["lora_adapter_metadata"])
  assert flat["transformer.r"] == flat["transformer.lora_alpha"] == 1
  assert flat["transformer.rank_pattern"] == {} and flat["transformer.use_rslora"] is False
  old = json.loads(meta_in["lora_adapter_metadata"])
  assert flat["transformer.target_modules"] == old["transformer.target_modules"]


def test_diffusers_alpha_tensors_and_dora_magnitude(tmp_path, capsys):
  src = FIXTURES / "diffusers_alpha.safetensors"
  before, _ = load(src)
  out = tmp_path / "out.safetensors"
  assert run_cli("squeeze", src, out, "--rank", 3) == 0
  assert "copied unchanged (not a low-rank pair): 1 tensors (1 DoRA magnitude)" in capsys.readouterr().out
  after, _ = load(out)
  assert_truncated(diffusers_deltas(before), diffusers_deltas(after), 3)
  assert {float(v) for k, v in after.items() if k.endswith(".alpha")} == {3.0}
  key = "transformer.single_transformer_blocks.0.proj_mlp.lora_magnitude_vector"
  np.testing.assert_array_equal(after[key], before[key])


def test_inspect_and_dry_run_on_a_file(tmp_path, capsys):
  src = FIXTURES / "kohya_unet.safetensors"
  assert run_cli("inspect", src) == 0
  printed = capsys.readouterr().out
  assert "12 LoRA modules" in printed and "conv" in printed and "linear" in printed
  out = tmp_path / "o.safetensors"
  assert run_cli("squeeze", src, out, "--rank", 2, "--dry-run") == 0
  assert "would write" in capsys.readouterr().out
  assert not out.exists()


def test_existing_output_file_needs_force_and_input_is_never_the_output(tmp_path, capsys):
  src = tmp_path / "in.safetensors"
  shutil.copy(FIXTURES / "diffusers_alpha.safetensors", src)
  original = src.read_bytes()
  out = tmp_path / "out.safetensors"
  out.write_bytes(b"old")
  assert run_cli("squeeze", src, out, "--rank", 2) == 2
  assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"old"
  assert run_cli("squeeze", src, src, "--rank", 2, "--force") == 2
  assert "is the input file" in capsys.readouterr().err and src.read_bytes() == original
  assert run_cli("squeeze", src, out, "--rank", 2, "--force") == 0
  assert load(out)[0]["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (2, 8)


# --------------------------------------------------------------------------------------------------------
# kohya's dynamic rank rules (sd-scripts networks/resize_lora.py), on hand-made spectra.
# --------------------------------------------------------------------------------------------------------


def brute(s, keep) -> int:
  """The smallest r in 1..n for which ``keep(r)`` holds (the formulas of the help text, term by term)."""
  return next(r for r in range(1, len(s) + 1) if keep(r))


SPECTRA = [
    np.array([10.0, 5.0, 2.5, 1.0, 0.5, 0.1]),
    np.array([3.0, 3.0, 1.0, 1.0]),
    np.array([1.0, 0.0, 0.0]),
    np.array([7.0, 1e-3, 1e-4, 1e-5, 0.0]),
]


@pytest.mark.parametrize("s", SPECTRA, ids=range(len(SPECTRA)))
@pytest.mark.parametrize("value", [0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0])
def test_sv_fro_and_cumulative_match_their_formulas(s, value):
  fro = brute(s, lambda r: math.sqrt(np.sum(s[:r] ** 2) / np.sum(s**2)) >= value - 1e-12)
  cum = brute(s, lambda r: np.sum(s[:r]) / np.sum(s) >= value - 1e-12)
  assert rank_rules.rank_sv_fro(s, value) == fro
  assert rank_rules.rank_sv_cumulative(s, value) == cum


@pytest.mark.parametrize("s", SPECTRA, ids=range(len(SPECTRA)))
@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 4.0, 10.0, 100.0, 1e9])
def test_sv_ratio_matches_its_formula(s, ratio):
  assert rank_rules.rank_sv_ratio(s, ratio) == max(1, int(np.sum(s > s[0] / ratio)))


def test_dynamic_rules_at_their_boundaries():
  s = np.array([3.0, 1.0])  # cumulative sums 0.75, 1; squared 0.9, 1
  assert rank_rules.rank_sv_cumulative(s, 0.75) == 1 and rank_rules.rank_sv_cumulative(s, 0.7500001) == 2
  assert rank_rules.rank_sv_fro(s, math.sqrt(0.9)) == 1 and rank_rules.rank_sv_fro(s, 0.95) == 2
  # kohya's ratio rule is strict: s_i > s_max / R. R = 3 puts 1.0 exactly on the threshold: not kept.
  assert rank_rules.rank_sv_ratio(s, 3.0) == 1 and rank_rules.rank_sv_ratio(s, 3.0001) == 2
  assert rank_rules.rank_sv_ratio(np.zeros(4), 10) == rank_rules.rank_sv_fro(np.zeros(4), 0.5) == 1
  assert rank_rules.rank_sv_fro([1.0, 3.0], 0.95) == 2  # unsorted input is sorted first


def designed_file(path: Path, spectra: dict[str, np.ndarray], seed: int = 0) -> None:
  """A diffusers file whose modules' ΔW = B @ A have exactly the given singular values (scale 1)."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, s in spectra.items():
    r = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((24, r)))
    v, _ = np.linalg.qr(rng.standard_normal((20, r)))
    tensors[f"{name}.lora_B.weight"] = (u * s).astype(np.float32)
    # Contiguous: safetensors.numpy.save_file writes a transposed view's buffer in memory order.
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(v.T, np.float32)
  save_file(tensors, str(path))


@pytest.mark.parametrize(
    "flag,value,want",
    [
        ("--sv-ratio", 4.5, {"m.a": 3, "m.b": 1, "m.c": 5}),  # s > s_max / 4.5
        ("--sv-fro", 0.9, {"m.a": 2, "m.b": 1, "m.c": 5}),  # sqrt(cumulative s^2 share) >= 0.9
        ("--sv-cumulative", 0.9, {"m.a": 4, "m.b": 1, "m.c": 5}),  # cumulative s share >= 0.9
    ],
)
def test_dynamic_rules_end_to_end_per_module(tmp_path, flag, value, want):
  spectra = {
      "m.a": np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]),
      "m.b": np.array([5.0, 0.1, 0.05, 0.01, 0.0, 0.0]),
      "m.c": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]),
  }
  for name, s in spectra.items():  # the expectations, from the formulas by hand and by brute force
    if flag == "--sv-ratio":
      assert want[name] == max(1, int(np.sum(s > s[0] / value)))
    elif flag == "--sv-fro":
      assert want[name] == brute(s, lambda r: math.sqrt(np.sum(s[:r] ** 2) / np.sum(s**2)) >= value)
    else:
      assert want[name] == brute(s, lambda r: np.sum(s[:r]) / np.sum(s) >= value)
  src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
  designed_file(src, spectra)
  assert run_cli("squeeze", src, out, flag, value) == 0
  after, _ = load(out)
  assert {n: after[f"{n}.lora_A.weight"].shape[0] for n in spectra} == want
  assert run_cli("squeeze", src, out, flag, value, "--max-rank", 2, "--force") == 0
  after, _ = load(out)
  assert {n: after[f"{n}.lora_A.weight"].shape[0] for n in spectra} == {n: min(r, 2) for n, r in want.items()}


def test_dynamic_rule_on_a_peft_directory_writes_rank_pattern(tmp_path):
  src = tmp_path / "peft"
  src.mkdir()
  rng = np.random.default_rng(1)
  tensors = {}
  for i, s in enumerate([np.array([4.0, 2.0, 1.0, 0.1]), np.array([4.0, 0.1, 0.1, 0.1])]):
    u, _ = np.linalg.qr(rng.standard_normal((16, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((12, 4)))
    tensors[f"base_model.model.layers.{i}.proj.lora_B.weight"] = (u * s).astype(np.float32)
    tensors[f"base_model.model.layers.{i}.proj.lora_A.weight"] = np.ascontiguousarray(v.T, np.float32)
  save_file(tensors, str(src / "adapter_model.safetensors"))
  (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
  assert run_cli("squeeze", src, tmp_path / "out", "--sv-ratio", 3.0) == 0  # 4/3: keeps 4, 2 | 4
  config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  ranks = {
      k: config["rank_pattern"].get(k.split("base_model.model.")[1][: -len(".lora_A.weight")], config["r"])
      for k in tensors
      if k.endswith("lora_A.weight")
  }
  assert sorted(ranks.values()) == [1, 2]


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--sv-ratio", "0.5"], "--sv-ratio must be >= 1"),
        (["--sv-fro", "1.5"], "--sv-fro must be in (0, 1]"),
        (["--sv-cumulative", "0"], "--sv-cumulative must be in (0, 1]"),
        (["--rank", "2", "--max-rank", "3"], "--max-rank goes with"),
        (["--energy", "0.9", "--max-rank", "0"], "--max-rank must be >= 1"),
        (["--sv-fro", "0.9", "--per-module"], "--per-module needs --energy"),
    ],
)
def test_rule_argument_errors(tmp_path, capsys, argv, fragment):
  out = tmp_path / "o.safetensors"
  assert run_cli("squeeze", FIXTURES / "diffusers_alpha.safetensors", out, *argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and fragment in err, err
  assert not out.exists()


# --------------------------------------------------------------------------------------------------------
# Bad input in every format: one line, exit 2, no output and no temporary left.
# --------------------------------------------------------------------------------------------------------


def _bad(kind: str, d: Path) -> tuple[Path, str]:
  """Writes one kind of bad single-file input into ``d``; returns it and a fragment of the error."""
  kohya, kmeta = load(FIXTURES / "kohya_unet.safetensors")
  diff, _ = load(FIXTURES / "diffusers_alpha.safetensors")
  path = d / "bad.safetensors"
  victim = "lora_unet_down_blocks_0_resnets_0_conv1"
  if kind in ("truncated", "lying_header"):
    data = (FIXTURES / "kohya_unet.safetensors").read_bytes()
    if kind == "truncated":
      path.write_bytes(data[: len(data) // 2])
      return path, "truncated"
    path.write_bytes((len(data) * 4).to_bytes(8, "little") + data[8:])  # header length past the end
    return path, "does not fit in the file"
  if kind in ("pickle_suffix", "pickle_content"):
    import pickle  # pylint: disable=g-import-not-at-top

    payload = pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}, protocol=4)
    path = d / ("bad.ckpt" if kind == "pickle_suffix" else "bad.safetensors")
    path.write_bytes(payload)
    return path, "pickle"
  if kind == "nan":
    kohya[f"{victim}.lora_up.weight"][2, 1, 0, 0] = np.inf
    save_file(kohya, str(path), kmeta)
    return path, "NaN/Inf"
  if kind == "rank_mismatch":
    kohya[f"{victim}.lora_up.weight"] = np.zeros((8, 3, 1, 1), np.float32)
    save_file(kohya, str(path), kmeta)
    return path, "shape mismatch"
  if kind == "missing_up":
    del diff["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    save_file(diff, str(path))
    return path, "but no 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight'"
  if kind == "unknown_format":
    save_file({"model.layers.0.weight": np.ones((4, 4), np.float32)}, str(path))
    return path, "not a LoRA this tool knows"
  if kind == "mixed_formats":
    save_file({**kohya, **diff}, str(path))
    return path, "mixes kohya"
  if kind == "bad_alpha":
    kohya[f"{victim}.alpha"] = np.ones(3, np.float32)
    save_file(kohya, str(path))
    return path, "want a scalar"
  raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "lying_header",
        "pickle_suffix",
        "pickle_content",
        "nan",
        "rank_mismatch",
        "missing_up",
        "unknown_format",
        "mixed_formats",
        "bad_alpha",
    ],
)
def test_bad_single_file_input(tmp_path, kind, capsys):
  src_dir = tmp_path / "in"
  src_dir.mkdir()
  src, fragment = _bad(kind, src_dir)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  assert run_cli("squeeze", src, out_dir / "o.safetensors", "--rank", 2) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("lora-squeeze: error:"), err
  assert fragment in err and "Traceback" not in err, err
  assert list(out_dir.iterdir()) == []


def test_pickle_is_never_unpickled(tmp_path, capsys):
  """A pickle whose loading would create a file: refused, and the file never appears."""
  marker = tmp_path / "unpickled"

  class Boom:

    def __reduce__(self):
      return (open, (str(marker), "w"))

  import pickle  # pylint: disable=g-import-not-at-top

  for name in ("adapter.pt", "adapter.safetensors"):
    src = tmp_path / name
    src.write_bytes(pickle.dumps(Boom()))
    assert run_cli("inspect", src) == 2
    assert "pickle" in capsys.readouterr().err
  assert not marker.exists()


def test_peft_directory_with_only_a_pickle_is_refused(tmp_path, capsys):
  src = tmp_path / "peft"
  src.mkdir()
  (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
  (src / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
  assert run_cli("squeeze", src, tmp_path / "out", "--rank", 2) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "torch pickle" in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_killed_file_squeeze_leaves_a_partial_that_the_next_run_removes(tmp_path):
  """SIGKILL after the first module: OUT is absent, the .partial stays; the next run removes it."""
  src, out = FIXTURES / "kohya_unet.safetensors", tmp_path / "out.safetensors"
  env = {
      **os.environ,
      "PYTHONPATH": str(REPO),
      "LORA_SQUEEZE_JAX_CACHE": "",
      "LORA_SQUEEZE_FAULT": "squeeze_after_module:0",
  }
  argv = [sys.executable, "-m", "lora_squeeze.adapters", "squeeze", str(src), str(out), "--rank", "2", "--no-progress"]
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == -9, proc.stderr
  partials = [p.name for p in tmp_path.iterdir()]
  assert len(partials) == 1 and partials[0].startswith(".out.safetensors.") and partials[0].endswith(".partial")
  assert run_cli("squeeze", src, out, "--rank", 2) == 0
  assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# --------------------------------------------------------------------------------------------------------
# The light install: the command and the math import none of the training stack.
# --------------------------------------------------------------------------------------------------------

HEAVY = ("tensorflow", "gemma", "flax", "orbax")


def test_command_imports_no_training_stack():
  code = (
      "import lora_squeeze.squeeze, lora_squeeze.adapters, lora_squeeze.lora_files, sys; "
      f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}); "
      "assert not heavy, heavy; "
      "from lora_squeeze import adapters; adapters.main(['inspect', sys.argv[1], '--no-progress']); "
      "heavy = sorted(m for m in sys.modules if m.split('.')[0] in " + repr(set(HEAVY)) + "); "
      "assert not heavy, heavy; print('light')"
  )
  env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_SQUEEZE_JAX_CACHE": ""}
  proc = subprocess.run(
      [sys.executable, "-c", code, str(FIXTURES / "diffusers_alpha.safetensors")],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().endswith("light")


@pytest.mark.slow
def test_fresh_core_install_squeezes_without_the_training_stack(tmp_path):
  """pip install -c requirements/cpu.lock <repo> (no extras) into a new venv: no tensorflow/gemma/flax/orbax,
  and its lora-squeeze console script squeezes a PEFT adapter and a kohya file."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "lora_squeeze", src / "lora_squeeze", ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  python = shutil.which("python3.11") or sys.executable
  subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
  pip = subprocess.run(
      [
          str(venv / "bin" / "python"),
          "-m",
          "pip",
          "install",
          "-q",
          "-c",
          str(REPO / "requirements" / "cpu.lock"),
          str(src),
      ],
      capture_output=True,
      text=True,
      timeout=1800,
  )
  assert pip.returncode == 0, pip.stderr[-3000:]
  listed = subprocess.run(
      [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
  ).stdout
  names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
  assert "lora-squeeze" in names and "jax" in names
  assert not names & {"tensorflow", "tensorflow-cpu", "gemma", "flax", "orbax-checkpoint", "kauldron"}, names

  peft = tmp_path / "peft"
  peft.mkdir()
  rng = np.random.default_rng(0)
  save_file(
      {
          "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((8, 32)).astype(np.float32),
          "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 8)).astype(np.float32),
      },
      str(peft / "adapter_model.safetensors"),
  )
  (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
  script = venv / "bin" / "lora-squeeze"
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["LORA_SQUEEZE_JAX_CACHE"] = ""
  for argv in (
      [str(peft), str(tmp_path / "peft4")],
      [str(FIXTURES / "kohya_unet.safetensors"), str(tmp_path / "k2.safetensors")],
  ):
    start = time.perf_counter()
    proc = subprocess.run(
        [str(script), "squeeze", *argv, "--rank", "2", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    print(f"{argv[0]}: {time.perf_counter() - start:.1f} s")
  config = json.loads((tmp_path / "peft4" / "adapter_config.json").read_text())
  assert config["r"] == config["lora_alpha"] == 2
  assert load(tmp_path / "k2.safetensors")[1]["ss_network_dim"] == "2"
