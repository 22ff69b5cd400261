"""PEFT adapter I/O and the `lora-squeeze` command (the lora_squeeze/adapters package).

Adapters are built here with plain numpy + the safetensors library (a tiny Llama-like layout: 2 layers of
q, k, v, o, gate, up, down, plus an embedding and a conv LoRA and a modules_to_save tensor), squeezed through
the CLI, and every module's new effective ΔW = scale·B@A (scale from the *written* config, resolved with
PEFT's pattern rule implemented independently below) is checked against a float64 numpy SVD truncation of
the original effective ΔW. The outputs are read back with the safetensors library, not our reader.

The Gemma 3 export/import tests (second half) use the tiny 2-layer Gemma 3 of models.py; their reference for
the Hugging Face layout is transformers' checkpoint conversion, re-implemented here, and two of them run the
model itself, so a wrong head order or a transposed factor fails.
"""

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_squeeze import adapters, lora, lora_layout, models, squeeze

HIDDEN, KV, FFN, VOCAB = 32, 16, 64, 64
PREFIX = "base_model.model."
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (in, out) per module type. max(in, out) is 32 or 64 everywhere, so a whole adapter costs two compiles.
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, FFN),
    "up_proj": (HIDDEN, FFN),
    "down_proj": (FFN, HIDDEN),
}
TOL = 1e-5


# --------------------------------------------------------------------------------------------------------
# Building adapters, and PEFT's view of them (independent of the code under test).
# --------------------------------------------------------------------------------------------------------


def peft_lookup(pattern: dict, name: str, default):
  """PEFT's get_pattern_key rule: first key (dict order) with re.match(rf"(.*\\.)?({key})$", name)."""
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def old_peft_lookup(config: dict, name: str):
  """PEFT < 0.14: one key for both dicts, from chain(rank_pattern, alpha_pattern), rule .*\\.{key}$."""
  keys = list(config["rank_pattern"]) + list(config["alpha_pattern"])
  key = next((k for k in keys if re.match(rf".*\.{k}$", name)), name)
  return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])


def module_names(layers: int = 2, kinds=KINDS, extras: bool = True) -> list[str]:
  names = []
  for layer in range(layers):
    for kind in kinds:
      group = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
      names.append(f"model.layers.{layer}.{group}.{kind}")
  if extras:
    names += ["model.embed_tokens", "model.vision.patch_conv"]
  return names


def make_tensors(config: dict, names: list[str], *, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """PEFT-layout LoRA tensors with a decaying spectrum (like trained adapters), ranks from the config."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name in names:
    r = peft_lookup(config.get("rank_pattern", {}), name, config["r"])
    decay = 0.75 ** np.arange(r)
    if name.endswith("embed_tokens"):  # nn.Embedding: lora_embedding_A (r, num_embeddings), B (dim, r)
      tensors[f"{PREFIX}{name}.lora_embedding_A"] = rng.standard_normal((r, VOCAB)) / math.sqrt(VOCAB)
      tensors[f"{PREFIX}{name}.lora_embedding_B"] = rng.standard_normal((HIDDEN, r)) * decay * 0.1
    elif name.endswith("patch_conv"):  # nn.Conv2d(8, 32, 2): lora_A (r, 8, 2, 2), lora_B (32, r, 1, 1)
      tensors[f"{PREFIX}{name}.lora_A.weight"] = rng.standard_normal((r, 8, 2, 2)) / math.sqrt(32)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = (rng.standard_normal((HIDDEN, r)) * decay * 0.1)[:, :, None, None]
    else:
      n_in, n_out = SHAPES[name.rsplit(".", 1)[-1]]
      tensors[f"{PREFIX}{name}.lora_A.weight"] = rng.standard_normal((r, n_in)) / math.sqrt(n_in)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = rng.standard_normal((n_out, r)) * decay * 0.1
  tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  tensors[f"{PREFIX}lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)  # modules_to_save
  return tensors


def write_adapter(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "adapter_config.json").write_text(json.dumps(config))
  save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
  return directory


def base_config(**overrides) -> dict:
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": "tiny-llama",
      "r": 16,
      "lora_alpha": 32,
      "target_modules": list(KINDS) + ["embed_tokens", "patch_conv"],
      "modules_to_save": ["lm_head"],
      "use_rslora": False,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  config.update(overrides)
  return config


def make_adapter(directory: Path, *, dtype=np.float32, names=None, **overrides) -> Path:
  config = base_config(**overrides)
  return write_adapter(directory, config, make_tensors(config, names or module_names(), dtype=dtype))


def effective_deltas(directory: Path) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray]]:
  """{module: float64 scale·B@A (out, in)}, the config, and the raw tensors, as PEFT would see them."""
  config = json.loads((directory / "adapter_config.json").read_text())
  tensors = load_file(str(directory / "adapter_model.safetensors"))
  deltas = {}
  for key, a in tensors.items():
    match = re.match(r"(.+)\.lora_(embedding_)?A(\.weight)?$", key)
    if not match:
      continue
    name = match[1][len(PREFIX) :]
    b = tensors[key.replace("_A", "_B")]
    r = peft_lookup(config["rank_pattern"], name, config["r"])
    alpha = peft_lookup(config["alpha_pattern"], name, config["lora_alpha"])
    assert a.shape[0] == r and b.shape[1] == r, (name, a.shape, b.shape, r)
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    deltas[name] = scale * b.astype(np.float64).reshape(b.shape[0], r) @ a.astype(np.float64).reshape(r, -1)
  return deltas, config, tensors


def truncate(w: np.ndarray, k: int) -> np.ndarray:
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


def energy_rank(w: np.ndarray, energy: float) -> int:
  s2 = np.linalg.svd(w, compute_uv=False) ** 2
  return int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy - 1e-12) + 1)


def assert_truncations(before: dict, after: dict, ranks: dict | int, tol: float = TOL) -> None:
  assert set(before) == set(after)
  for name, w in before.items():
    k = ranks if isinstance(ranks, int) else ranks[name]
    want = truncate(w, k)
    err = np.linalg.norm(after[name] - want) / np.linalg.norm(want)
    assert err < tol, f"{name}: relative error {err:.2e} vs float64 SVD truncation at rank {k}"


def run_cli(*argv) -> int:
  return adapters.main([str(a) for a in argv] + (["--no-progress"] if argv[0] != "inspect" else []))


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
  """main() would turn on JAX's on-disk compile cache for the whole (shared) test process; not in tests."""
  monkeypatch.setenv("LORA_SQUEEZE_JAX_CACHE", "")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
  return make_adapter(tmp_path_factory.mktemp("plain") / "in")


# --------------------------------------------------------------------------------------------------------
# Squeezing: exactness against float64 SVD.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_squeeze_matches_float64_svd_truncation(tmp_path, adapter_dir, variant):
  if variant == "plain":
    src = adapter_dir
  elif variant == "rslora":
    src = make_adapter(tmp_path / "in", use_rslora=True, lora_alpha=8)
  else:  # per-module r and alpha; layer 1's down_proj (r=4) grows to 6, exactly
    src = make_adapter(
        tmp_path / "in",
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 4},
        alpha_pattern={"v_proj": 64, "layers.1.mlp.down_proj": 2},
    )
  out = tmp_path / "out"
  assert run_cli("squeeze", src, out, "--rank", 6) == 0
  before, _, src_tensors = effective_deltas(src)
  after, config, tensors = effective_deltas(out)
  assert_truncations(before, after, 6)
  # Scale 1 everywhere: lora_alpha = r, no patterns, rsLoRA off; other fields kept.
  assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 6, False)
  assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
  assert config["base_model_name_or_path"] == "tiny-llama" and config["modules_to_save"] == ["lm_head"]
  # Shapes: A (6, *in), B (out, 6, 1, ...); the modules_to_save tensor is copied unchanged.
  for key, x in src_tensors.items():
    if "lora_" in key:
      want = (6, *x.shape[1:]) if "_A" in key else (x.shape[0], 6, *x.shape[2:])
      assert tensors[key].shape == want and tensors[key].dtype == x.dtype, key
  np.testing.assert_array_equal(tensors[f"{PREFIX}lm_head.weight"], src_tensors[f"{PREFIX}lm_head.weight"])
  if variant == "patterns":  # the grown directions: zero B columns, bounded (kaiming) A rows
    b = tensors[f"{PREFIX}model.layers.1.mlp.down_proj.lora_B.weight"]
    a = tensors[f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"]
    assert np.all(b[:, 4:] == 0) and np.all(b[:, :4].any(axis=0))
    assert 0 < np.abs(a[4:]).max() <= math.sqrt(6 / FFN)


def test_real_peft_fixture_squeezes_to_the_float64_truncation(tmp_path):
  # Saved by PEFT itself (tests/fixtures/make_fixtures.py): a tiny Llama, r=4, lora_alpha=8, v_proj at r=2.
  src = Path(__file__).parent / "fixtures" / "peft_llama"
  out = tmp_path / "out"
  assert run_cli("squeeze", src, out, "--rank", 2) == 0
  before, config_in, _ = effective_deltas(src)
  assert config_in["rank_pattern"] == {"v_proj": 2} and len(before) == 14
  after, config, _ = effective_deltas(out)
  assert_truncations(before, after, 2)
  assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2, 2, {})


def test_cli_runs_as_a_module_in_a_subprocess(tmp_path):
  src = make_adapter(tmp_path / "in", names=module_names(1, ("q_proj", "v_proj"), extras=False))
  out = tmp_path / "out"
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  proc = subprocess.run(
      [sys.executable, "-m", "lora_squeeze.adapters", "squeeze", str(src), str(out), "--rank", "4"],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert "16->4 (2)" in proc.stdout and "wrote" in proc.stdout
  before, _, _ = effective_deltas(src)
  after, config, _ = effective_deltas(out)
  assert_truncations(before, after, 4)


@pytest.mark.parametrize("method", ["svd", "rsvd"])
def test_methods_forming_delta_w(tmp_path, method):
  src = make_adapter(tmp_path / "in", names=module_names(1, ("q_proj",), extras=False))
  assert run_cli("squeeze", src, tmp_path / "out", "--rank", 4, "--method", method) == 0
  before, _, _ = effective_deltas(src)
  after, _, _ = effective_deltas(tmp_path / "out")
  if method == "svd":
    assert_truncations(before, after, 4)
  else:  # randomized: close to optimal, not equal
    for name, w in before.items():
      optimal = np.linalg.norm(w - truncate(w, 4))
      assert np.linalg.norm(w - after[name]) <= 1.01 * optimal


def test_energy_picks_one_rank_for_all(tmp_path, adapter_dir):
  before, _, _ = effective_deltas(adapter_dir)
  want = max(energy_rank(w, 0.9) for w in before.values())
  assert run_cli("squeeze", adapter_dir, tmp_path / "out", "--energy", 0.9) == 0
  after, config, _ = effective_deltas(tmp_path / "out")
  assert config["r"] == want and config["rank_pattern"] == {}
  assert_truncations(before, after, want)


def test_energy_per_module_writes_rank_pattern(tmp_path, adapter_dir):
  before, _, _ = effective_deltas(adapter_dir)
  want = {name: energy_rank(w, 0.9) for name, w in before.items()}
  assert len(set(want.values())) > 1  # the test adapter's modules do differ
  assert run_cli("squeeze", adapter_dir, tmp_path / "out", "--energy", 0.9, "--per-module") == 0
  after, config, tensors = effective_deltas(tmp_path / "out")  # asserts shapes match the resolved r
  assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
  assert_truncations(before, after, want)
  for name, r in want.items():
    assert peft_lookup(config["rank_pattern"], name, config["r"]) == r
    assert peft_lookup(config["alpha_pattern"], name, config["lora_alpha"]) == r  # scale 1
    assert old_peft_lookup(config, name) == (r, r)  # old PEFT releases read it the same way
  assert all(not key.split(".")[0].isdigit() for key in config["rank_pattern"])


def test_dry_run_writes_nothing(tmp_path, adapter_dir, capsys):
  out = tmp_path / "out"
  assert run_cli("squeeze", adapter_dir, out, "--energy", 0.95, "--per-module", "--dry-run") == 0
  text = capsys.readouterr().out
  assert not out.exists() and list(tmp_path.iterdir()) == []
  for name in module_names():
    assert name in text
  assert "would write" in text and "retention" in text


def test_bfloat16_round_trip(tmp_path):
  src = make_adapter(tmp_path / "in", dtype=ml_dtypes.bfloat16)
  before, _, src_tensors = effective_deltas(src)  # float64 of the stored bf16 values
  assert src_tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == ml_dtypes.bfloat16
  assert run_cli("squeeze", src, tmp_path / "keep", "--rank", 6) == 0
  after, _, tensors = effective_deltas(tmp_path / "keep")
  assert all(x.dtype == ml_dtypes.bfloat16 for k, x in tensors.items() if "lora_" in k)
  assert_truncations(before, after, 6, tol=2e-2)  # bf16 rounding of the new factors
  assert run_cli("squeeze", src, tmp_path / "f32", "--rank", 6, "--dtype", "float32") == 0
  after, _, tensors = effective_deltas(tmp_path / "f32")
  assert all(x.dtype == np.float32 for k, x in tensors.items() if "lora_" in k)
  assert_truncations(before, after, 6)


def test_existing_output_needs_force(tmp_path, adapter_dir, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "marker").write_text("x")
  assert run_cli("squeeze", adapter_dir, out, "--rank", 6) == 2
  assert "--force" in capsys.readouterr().err and (out / "marker").exists()
  assert run_cli("squeeze", adapter_dir, out, "--rank", 6, "--force") == 0
  assert not (out / "marker").exists() and (out / "adapter_config.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------------------
# inspect.
# --------------------------------------------------------------------------------------------------------


def test_inspect_prints_table_and_plot(tmp_path, adapter_dir, capsys):
  png = tmp_path / "retention.png"
  assert run_cli("inspect", adapter_dir, "--plot", png) == 0
  text = capsys.readouterr().out
  assert "V(r/2)" in text and "V(r/8)" in text and "mean retention by module type" in text
  lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("model.")}
  assert set(lines) == set(module_names())
  before, _, _ = effective_deltas(adapter_dir)
  w = before["model.layers.0.mlp.down_proj"]
  s = np.linalg.svd(w, compute_uv=False)
  row = lines["model.layers.0.mlp.down_proj"]
  assert float(row[4]) == pytest.approx(s[0], rel=1e-2)  # top singular value (3 digits)
  assert float(row[-3]) == pytest.approx((s[:8] ** 2).sum() / (s**2).sum(), abs=1e-5)  # V(r/2)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------
# Bad inputs: one clear line on stderr, exit 2, no output directory.
# --------------------------------------------------------------------------------------------------------


def _break(kind: str, directory: Path) -> str:
  """Makes the adapter in ``directory`` bad in one way; returns a fragment the error message must contain."""
  config = base_config()
  tensors = make_tensors(config, module_names())
  weights = directory / "adapter_model.safetensors"
  victim = f"{PREFIX}model.layers.1.mlp.up_proj"
  if kind == "truncated":
    write_adapter(directory, config, tensors)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    return "truncated"
  if kind == "corrupt_header":
    write_adapter(directory, config, tensors)
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{["
    weights.write_bytes(bytes(data))
    return "not a valid safetensors file"
  if kind == "missing_config":
    write_adapter(directory, config, tensors)
    (directory / "adapter_config.json").unlink()
    return "adapter_config.json"
  if kind == "missing_lora_B":
    del tensors[f"{victim}.lora_B.weight"]
    write_adapter(directory, config, tensors)
    return "model.layers.1.mlp.up_proj"
  if kind == "missing_lora_A":
    del tensors[f"{victim}.lora_A.weight"]
    write_adapter(directory, config, tensors)
    return "no lora_A"
  if kind == "shape_mismatch":
    tensors[f"{victim}.lora_B.weight"] = np.zeros((FFN, 17), np.float32)
    write_adapter(directory, config, tensors)
    return "[64, 17]"
  if kind == "nan":  # found late, after layer 0 was squeezed into the temporary output
    tensors[f"{victim}.lora_A.weight"][3, 5] = np.nan
    write_adapter(directory, config, tensors)
    return "NaN"
  if kind == "rank_inconsistent":
    write_adapter(directory, {**config, "r": 8}, tensors)
    return "r=8"
  raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "corrupt_header",
        "missing_config",
        "missing_lora_B",
        "missing_lora_A",
        "shape_mismatch",
        "nan",
        "rank_inconsistent",
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(tmp_path, kind, capsys):
  src = tmp_path / "in"
  src.mkdir()
  fragment = _break(kind, src)
  out = tmp_path / "out"
  assert run_cli("squeeze", src, out, "--rank", 6) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("lora-squeeze: error:"), err
  assert fragment in err, err
  assert "Traceback" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no OUT_DIR, no temporary left behind


def test_argument_errors_exit_2(tmp_path, adapter_dir, capsys):
  assert run_cli("squeeze", adapter_dir, tmp_path / "o", "--energy", 1.5) == 2
  assert run_cli("squeeze", adapter_dir, tmp_path / "o", "--rank", 4, "--per-module") == 2
  with pytest.raises(SystemExit) as exc:  # argparse: neither --rank nor --energy
    adapters.main(["squeeze", str(adapter_dir), str(tmp_path / "o")])
  assert exc.value.code == 2
  assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------
# Misuse guards: nothing the command is asked to do may destroy its input or leave debris behind.
# --------------------------------------------------------------------------------------------------------


def run_subprocess(*argv, fault: str | None = None) -> subprocess.CompletedProcess:
  """The command itself, in its own process (``python -m lora_squeeze.adapters``), no compile cache."""
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LORA_SQUEEZE_JAX_CACHE": ""}
  env.pop("LORA_SQUEEZE_FAULT", None)
  if fault is not None:
    env["LORA_SQUEEZE_FAULT"] = fault
  with subprocess.Popen(
      [sys.executable, "-m", "lora_squeeze.adapters", *map(str, argv), "--no-progress"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
  ) as child:
    out, err = child.communicate(timeout=300)
  proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
  proc.pid = child.pid  # the command's own PID (no shell in between): the kill test looks for it
  return proc


def assert_one_error_line(returncode: int, err: str, *fragments: str) -> None:
  assert returncode == 2, err
  err = err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("lora-squeeze: error:"), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in err, err


def small_names() -> list[str]:
  return module_names(1, ("q_proj", "v_proj"), extras=False)


def tree(root: Path) -> dict[str, bytes | None]:
  """Every path under ``root`` with its bytes (None for directories and symlinks)."""
  return {
      str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
      for p in sorted(root.rglob("*"))
  }


def test_output_that_is_contains_or_lies_inside_the_input_is_refused(tmp_path, capsys):
  x = tmp_path / "x"
  src = make_adapter(x / "a" / "adapter", names=small_names())
  (x / "a" / "notes.txt").write_text("beside the adapter")
  (x / "b.txt").write_text("two levels up")
  (tmp_path / "link").symlink_to(x / "a")  # a second name for IN's parent
  before = tree(tmp_path)
  # OUT = IN's parent with --force used to delete IN and its neighbours: the command itself refuses.
  proc = run_subprocess("squeeze", src, x / "a", "--rank", 4, "--force")
  assert_one_error_line(proc.returncode, proc.stderr, "contains the input directory")
  assert tree(tmp_path) == before
  cases = [
      (x, src, "contains the input directory"),
      (src, src, "is the input directory"),
      (src / "sub", src, "lies inside the input directory"),
      (tmp_path / "link", src, "contains the input directory"),  # through a symlink
      (tmp_path / "link" / "adapter", src, "is the input directory"),
      (x, tmp_path / "link" / "adapter", "contains the input directory"),
  ]  # IN named through a symlink
  for out, inp, fragment in cases:
    for extra in (["--force"], ["--dry-run"]):
      assert run_cli("squeeze", inp, out, "--rank", 4, *extra) == 2, (out, inp, extra)
      assert_one_error_line(2, capsys.readouterr().err, fragment)
  assert tree(tmp_path) == before


def test_rank_above_full_rank_is_capped_per_module(tmp_path, adapter_dir, capsys):
  before, _, _ = effective_deltas(adapter_dir)
  full = {name: min(w.shape) for name, w in before.items()}  # 32, or 16 for k_proj and v_proj
  assert set(full.values()) == {16, 32}
  # Library: a rank above r_src (16) but below min(m, n) stays, as documented; above, it is capped.
  with adapters.PeftAdapter(adapter_dir) as adapter:
    planned = adapters.plan_ranks(adapter.modules, None, rank=20)
  assert planned == {name: min(20, r) for name, r in full.items()}

  out = tmp_path / "out"
  for dry in (True, False):
    assert run_cli("squeeze", adapter_dir, out, "--rank", 100, *(["--dry-run"] if dry else [])) == 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lora-squeeze: note: --rank 100 exceeds"), err
    assert "16 modules" in err and "capped" in err and "largest 32" in err, err
    if dry:  # the plan the real run then follows
      rows = [line.split() for line in captured.out.splitlines() if line.startswith("model.")]
      assert {row[0]: int(row[4]) for row in rows} == full
  after, config, _ = effective_deltas(out)  # checks each module's shapes against its resolved r
  assert config["r"] == config["lora_alpha"] == 32 and len(config["rank_pattern"]) == 4
  for name, r in full.items():
    assert peft_lookup(config["rank_pattern"], name, config["r"]) == r
    assert peft_lookup(config["alpha_pattern"], name, config["lora_alpha"]) == r  # scale 1
    assert old_peft_lookup(config, name) == (r, r)
  assert_truncations(before, after, full)  # at full rank: ΔW exactly as before


def test_killed_squeeze_leaves_a_partial_dir_that_the_next_run_removes(tmp_path):
  src = make_adapter(tmp_path / "in", names=small_names())
  out = tmp_path / "out"
  proc = run_subprocess("squeeze", src, out, "--rank", 4, fault="squeeze_after_module:0")
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  leftovers = [p for p in tmp_path.iterdir() if p.name not in ("in",)]
  assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.") and leftovers[0].name.endswith(".partial")
  assert (leftovers[0] / "adapter_model.safetensors").exists() and not out.exists()
  dead = leftovers[0].name
  assert f".{proc.pid}@" in dead  # the writer's PID is in the name
  # Also a stale `.old` of the same OUT, a live writer's partial dir (this process), and a dead writer's
  # partial dir for another OUT name: only the dead writers' dirs of this OUT may go.
  stale_old = tmp_path / (dead[: -len("partial")] + "old")
  (stale_old / "x").mkdir(parents=True)
  live = tmp_path / dead.replace(f".{proc.pid}@", f".{os.getpid()}@")
  live.mkdir()
  other = tmp_path / dead.replace(".out.", ".other.", 1)
  other.mkdir()

  proc = run_subprocess("squeeze", src, out, "--rank", 4)
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", live.name, other.name])
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  before, _, _ = effective_deltas(src)
  after, _, _ = effective_deltas(out)
  assert_truncations(before, after, 4)


def test_outputs_get_the_permissions_mkdir_gives(tmp_path, adapter_dir):
  def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)

  old = os.umask(0o022)
  try:
    assert run_cli("squeeze", adapter_dir, tmp_path / "out", "--rank", 4) == 0
    assert mode(tmp_path / "out") == 0o755
    assert all(mode(p) == 0o644 for p in (tmp_path / "out").iterdir())
    assert run_cli("squeeze", adapter_dir, tmp_path / "out", "--rank", 4, "--force") == 0
    assert mode(tmp_path / "out") == 0o755
    with adapters.atomic_dir(tmp_path / "export") as tmp:  # export_peft's writer
      (tmp / "f").write_text("x")
    assert mode(tmp_path / "export") == 0o755
    os.umask(0o077)
    with adapters.atomic_dir(tmp_path / "private") as tmp:
      (tmp / "f").write_text("x")
    assert mode(tmp_path / "private") == 0o700
  finally:
    os.umask(old)


def test_unknown_plot_format_is_refused_before_any_work(tmp_path, adapter_dir, capsys):
  proc = run_subprocess("inspect", adapter_dir, "--plot", tmp_path / "x.xyz")
  assert_one_error_line(proc.returncode, proc.stderr, "x.xyz", ".png", ".pdf", ".svg")
  assert proc.stdout == ""  # no table: the spectra were never computed
  for path, fragment in ((tmp_path / "retention", "no file extension"), (tmp_path / "no" / "r.png", "no such")):
    assert run_cli("inspect", adapter_dir, "--plot", path) == 2
    captured = capsys.readouterr()
    assert_one_error_line(2, captured.err, fragment)
    assert captured.out == ""
  assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------------------


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {
      "bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
      "f16": rng.standard_normal((4,)).astype(np.float16),
      "f32": rng.standard_normal((2, 3, 1)).astype(np.float32),
      "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
      "empty": np.zeros((0, 4), np.float32),
  }
  adapters.save_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
  theirs = load_file(str(tmp_path / "ours.safetensors"))
  save_file(tensors, str(tmp_path / "lib.safetensors"))
  with adapters.SafetensorsReader(tmp_path / "lib.safetensors") as reader:
    ours = {k: reader.read(k) for k in reader.tensors}
  for k, x in tensors.items():
    for y in (theirs[k], ours[k]):
      assert y.dtype == x.dtype and y.shape == x.shape
      np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
  entries = [(k, adapters.DTYPE_CODES[x.dtype], x.shape) for k, x in tensors.items()]
  assert adapters.safetensors_size(entries, {"format": "pt"}) == (tmp_path / "ours.safetensors").stat().st_size


def test_pattern_rule_and_written_keys():
  keys = {"q_proj": 8, "layers.1.mlp.down_proj": 4, r"layers\.[23]\..*v_proj": 2}
  get = lambda name: adapters.get_pattern_key(keys, name)  # noqa: E731
  assert get("model.layers.0.self_attn.q_proj") == "q_proj"
  assert get("model.layers.1.mlp.down_proj") == "layers.1.mlp.down_proj"
  assert get("model.layers.11.mlp.down_proj") is None  # a key matches at a dot boundary only
  assert get("model.layers.3.self_attn.v_proj") == r"layers\.[23]\..*v_proj"
  assert get("model.layers.0.self_attn.xq_proj") is None
  names = [f"model.layers.{i}.self_attn.{k}" for i in (1, 11, 21) for k in ("q_proj", "k_proj")] + ["lm_head"]
  written = adapters.pattern_keys(names)
  for name, key in written.items():
    assert [n for n in names if adapters.get_pattern_key([key], n)] == [name]
  assert written["model.layers.1.self_attn.q_proj"] == "layers.1.self_attn.q_proj"
  assert written["lm_head"] == "lm_head"


def test_peft_scale_rules():
  config = adapters.PeftAdapterConfig.from_dict(base_config(rank_pattern={"q_proj": 4}, alpha_pattern={"k_proj": 64}))
  assert config.scale("model.layers.0.self_attn.q_proj") == 32 / 4
  assert config.scale("model.layers.0.self_attn.k_proj") == 64 / 16
  assert config.scale("model.layers.0.mlp.up_proj") == 32 / 16
  rs = adapters.PeftAdapterConfig.from_dict(base_config(use_rslora=True))
  assert rs.scale("model.layers.0.mlp.up_proj") == 32 / 4
  with pytest.raises(adapters.AdapterError, match="peft_type"):
    adapters.PeftAdapterConfig.from_dict(base_config(peft_type="IA3"))


# --------------------------------------------------------------------------------------------------------
# Gemma 3: our LoRA tree <-> PEFT adapters (export_peft / import_peft).
#
# The reference for the Hugging Face layout is written here independently of the adapters package: each module's ΔW
# in gemma's einsum layout (the weights lora_fuse.fuse updates and the model multiplies), mapped to HF weights
# by transformers' own checkpoint conversion (convert_gemma3_weights_orbax_to_hf.py: q_einsum (N, d, H) ->
# transpose(0, 2, 1).reshape(N*H, d), kv_einsum[c] likewise, attn_vec_einsum (N, H, d) -> transpose(2, 0, 1)
# .reshape(d, N*H), gating_einsum (2, F, d)[c] as is, linear (F, d) -> .T), and back (for the forwards).
# --------------------------------------------------------------------------------------------------------

G_SEP = lora.LoRAConfig(rank=4)
G_JOINT = lora.LoRAConfig(rank={"*/attn/*": 3, "*": 2}, joint_kv=True, joint_gate_up=True)
G_MIXED = lora.LoRAConfig(
    rank={"layer_1/mlp/*": 5, "*/attn/o_lora": 2, "*": 4}, targets=("q", "v", "o", "gate", "up", "down")
)
G_ALPHA = lora.LoRAConfig(rank=4, alpha=8.0)
G_ALPHA_MIXED = lora.LoRAConfig(rank={"*/mlp/*": 3, "*": 2}, alpha=6.0)  # exported with the scale folded
G_CONFIGS = {"separate": G_SEP, "joint": G_JOINT, "mixed": G_MIXED, "alpha": G_ALPHA}
HF_STEMS = {
    "causal_lm": "model.layers",
    "conditional_generation": "model.language_model.layers",
    "legacy": "language_model.model.layers",
}
PROJ_GROUP = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@pytest.fixture(scope="module")
def gemma_cfg():
  """The tiny Gemma 3 (2 layers; 4 query heads of 16 over 2 KV heads, d 64, F 128)."""
  return models.model_config("tiny", num_layers=2)


def trained_lora(cfg, config, seed: int = 0, std: float = 0.3) -> dict:
  """LoRA params with random a AND b (as after training), float32 jax arrays in lora.py's layout."""
  rng = np.random.default_rng(seed)
  tree: dict = {}
  for path, (a_shape, b_shape) in lora_layout.lora_shapes(cfg, config).items():
    node = tree
    for k in path.split("/"):
      node = node.setdefault(k, {})
    node["a"] = jnp.asarray((std * rng.standard_normal(a_shape)).astype(np.float32))
    node["b"] = jnp.asarray((std * rng.standard_normal(b_shape)).astype(np.float32))
  return tree


def gemma_deltas(params: dict, config) -> dict[tuple[int, str], np.ndarray]:
  """{(layer, "q_einsum" | "kv_einsum" | "attn_vec_einsum" | "gating_einsum" | "linear"): float64 ΔW} in
  gemma's weight layouts (k, v and gate, up land in slices [0], [1] of the shared weight)."""
  out: dict[tuple[int, str], np.ndarray] = {}

  def add(key, delta, index=None):
    if index is None:
      out[key] = out.get(key, 0) + delta
    else:
      full = out.get(key, np.zeros((2, *delta.shape)))
      full[index] += delta
      out[key] = full

  for path, pair in squeeze.lora_pairs(params).items():
    layer, kind = lora_layout.module_kind(path)
    a, b = np.asarray(pair["a"], np.float64), np.asarray(pair["b"], np.float64)
    s = config.scale(a.shape[-1])
    if kind == "q":
      add((layer, "q_einsum"), s * np.einsum("dr,rnh->ndh", a, b))
    elif kind in ("k", "v"):
      add((layer, "kv_einsum"), s * np.einsum("dr,rnh->ndh", a, b), 0 if kind == "k" else 1)
    elif kind == "kv":
      add((layer, "kv_einsum"), s * np.einsum("dr,rckh->ckdh", a, b))
    elif kind == "o":
      add((layer, "attn_vec_einsum"), s * np.einsum("nhr,rd->nhd", a, b))
    elif kind in ("gate", "up"):  # transpose_gating_einsum: gating_einsum (2, F, d)
      add((layer, "gating_einsum"), s * np.einsum("dr,rf->fd", a, b), 0 if kind == "gate" else 1)
    elif kind == "gate_up":
      add((layer, "gating_einsum"), s * np.einsum("dr,rcf->cfd", a, b))
    else:
      add((layer, "linear"), s * np.einsum("fr,rd->fd", a, b))
  return out


def gemma_to_hf(deltas: dict, stem: str = "model.layers") -> dict[str, np.ndarray]:
  """transformers' checkpoint conversion of gemma-layout weights: {HF module name: (out, in)}."""
  out = {}
  for (layer, weight), w in deltas.items():
    p = f"{stem}.{layer}"
    if weight == "q_einsum":
      out[f"{p}.self_attn.q_proj"] = w.transpose(0, 2, 1).reshape(-1, w.shape[1])
    elif weight == "kv_einsum":
      for c, proj in enumerate(("k_proj", "v_proj")):
        if w[c].any():  # a slot no adapter wrote (targets without k) is no module
          out[f"{p}.self_attn.{proj}"] = w[c].transpose(0, 2, 1).reshape(-1, w.shape[2])
    elif weight == "attn_vec_einsum":
      out[f"{p}.self_attn.o_proj"] = w.transpose(2, 0, 1).reshape(w.shape[2], -1)
    elif weight == "gating_einsum":
      for c, proj in enumerate(("gate_proj", "up_proj")):
        if w[c].any():
          out[f"{p}.mlp.{proj}"] = w[c]
    else:
      out[f"{p}.mlp.down_proj"] = w.T
  return out


def base_plus_hf(base: dict, hf: dict[str, np.ndarray], cfg) -> dict:
  """Gemma base params plus HF-layout deltas, mapped back with the inverse of the conversion above."""
  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  new = jax.tree.map(lambda x: np.array(x, np.float64), base)
  for name, w in hf.items():
    match = re.match(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$", name)
    layer, proj = f"layer_{match[1]}", match[3]
    attn, mlp = new[layer]["attn"], new[layer]["mlp"]
    if proj == "q":
      attn["q_einsum"]["w"] += w.reshape(n, h, d).transpose(0, 2, 1)
    elif proj in ("k", "v"):
      attn["kv_einsum"]["w"][0 if proj == "k" else 1] += w.reshape(k, h, d).transpose(0, 2, 1)
    elif proj == "o":
      attn["attn_vec_einsum"]["w"] += w.reshape(d, n, h).transpose(1, 2, 0)
    elif proj in ("gate", "up"):
      mlp["gating_einsum"][0 if proj == "gate" else 1] += w
    else:
      mlp["linear"] += w.T
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new)


def hf_deltas(directory: Path) -> dict[str, np.ndarray]:
  """{HF module name: float64 scale·B@A} of a PEFT directory, as PEFT computes it (effective_deltas)."""
  return effective_deltas(directory)[0]


def assert_deltas_match(got: dict, want: dict, tol: float = 1e-6) -> None:
  assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:4]
  for name, w in want.items():
    assert got[name].shape == w.shape, (name, got[name].shape, w.shape)
    err = np.linalg.norm(got[name] - w) / np.linalg.norm(w)
    assert err < tol, f"{name}: relative Frobenius error {err:.2e}"


def leaves_by_path(params: dict) -> dict[str, np.ndarray]:
  return {f"{p}/{side}": np.asarray(pair[side]) for p, pair in squeeze.lora_pairs(params).items() for side in "ab"}


def _peft_name_set(cfg, config, stem: str) -> set[str]:
  return {
      f"{stem}.{i}.{PROJ_GROUP[p]}.{p}" for i in range(cfg.num_layers) for p in (f"{t}_proj" for t in config.targets)
  }


@pytest.mark.parametrize("name", list(G_CONFIGS))
def test_gemma_round_trip_is_bitwise(tmp_path, gemma_cfg, name):
  config = G_CONFIGS[name]
  params = trained_lora(gemma_cfg, config, seed=1)
  out = tmp_path / "peft"
  written = adapters.export_peft(
      params, out, lora_config=config, model_config=gemma_cfg, base_model_name_or_path="google/gemma-3-270m"
  )
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  assert json.loads((out / "adapter_config.json").read_text()) == written
  back, back_config = adapters.import_peft(
      out, model_config=gemma_cfg, joint_kv=config.joint_kv, joint_gate_up=config.joint_gate_up
  )
  want, got = leaves_by_path(params), leaves_by_path(back)
  assert set(got) == set(want)
  for path, x in want.items():
    assert got[path].dtype == np.float32 and got[path].shape == x.shape, path
    np.testing.assert_array_equal(got[path].view(np.uint32), x.view(np.uint32), err_msg=path)
  # The returned config describes the same modules, ranks and scale (a rank mapping comes back per module).
  assert lora_layout.lora_shapes(gemma_cfg, back_config) == lora_layout.lora_shapes(gemma_cfg, config)
  assert (back_config.alpha, back_config.targets, back_config.joint_kv, back_config.joint_gate_up) == (
      config.alpha,
      config.targets,
      config.joint_kv,
      config.joint_gate_up,
  )
  if not isinstance(config.rank, dict):
    assert back_config == config


def test_gemma_mixed_ranks_with_alpha_fold_the_scale(tmp_path, gemma_cfg):
  """alpha/r differs between modules of different rank; vLLM applies one lora_alpha/r to all, so the
  export folds each module's scale and writes scale 1 everywhere; ΔW survives the round trip."""
  config = G_ALPHA_MIXED
  params = trained_lora(gemma_cfg, config, seed=2)
  out = tmp_path / "peft"
  written = adapters.export_peft(params, out, lora_config=config, model_config=gemma_cfg)
  assert written["lora_alpha"] == written["r"] and written["alpha_pattern"] == written["rank_pattern"]
  assert not written["use_rslora"] and written["rank_pattern"]
  peft_deltas = hf_deltas(out)  # asserts every tensor's rank is the one the config resolves
  assert_deltas_match(peft_deltas, gemma_to_hf(gemma_deltas(params, config)))
  back, back_config = adapters.import_peft(out, model_config=gemma_cfg)
  assert back_config.alpha is None
  assert lora.lora_ranks(back) == lora.lora_ranks(params)
  assert_deltas_match(gemma_to_hf(gemma_deltas(back, back_config)), gemma_to_hf(gemma_deltas(params, config)))


@pytest.mark.parametrize("layout", ["causal_lm", "conditional_generation"])
@pytest.mark.parametrize("name", list(G_CONFIGS))
def test_exported_delta_w_is_the_hf_layout(tmp_path, gemma_cfg, name, layout):
  """scale·B@A from the files (PEFT's rule, incl. rank/alpha patterns) equals our ΔW put through transformers'
  conversion, for every module; and vLLM's single scale lora_alpha/r is every module's scale."""
  config = G_CONFIGS[name]
  params = trained_lora(gemma_cfg, config, seed=3)
  out = tmp_path / "peft"
  adapters.export_peft(
      params,
      out,
      lora_config=config,
      model_config=gemma_cfg,
      layout=layout,
      base_model_name_or_path="google/gemma-3-4b-pt",
  )
  deltas, written, tensors = effective_deltas(out)
  stem = HF_STEMS[layout]
  assert set(deltas) == _peft_name_set(gemma_cfg, config, stem)
  assert_deltas_match(deltas, gemma_to_hf(gemma_deltas(params, config), stem))
  assert all(x.dtype == np.float32 for x in tensors.values())
  assert (written["peft_type"], written["task_type"], written["bias"]) == ("LORA", "CAUSAL_LM", "none")
  assert written["base_model_name_or_path"] == "google/gemma-3-4b-pt"
  assert written["modules_to_save"] is None and not written["use_dora"] and not written["fan_in_fan_out"]
  projs = [f"{t}_proj" for t in config.targets]
  if layout == "causal_lm":
    assert written["target_modules"] == projs
  else:  # a regex PEFT fullmatches: the language model's projections, not the SigLIP tower's q/k/v_proj
    pattern = written["target_modules"]
    assert all(re.fullmatch(pattern, n) for n in deltas)
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert re.search(r"\((.*?)\)\$?$", pattern)[1].split("|") == projs  # vLLM's reading of the regex
  vllm_scale = written["lora_alpha"] / written["r"]
  for module in deltas:
    r = peft_lookup(written["rank_pattern"], module, written["r"])
    assert peft_lookup(written["alpha_pattern"], module, written["lora_alpha"]) / r == vllm_scale
    assert old_peft_lookup(written, module)[1] / old_peft_lookup(written, module)[0] == vllm_scale


@pytest.fixture(scope="module")
def tiny_model(gemma_cfg):
  """(transformer, random base params, tokens, jitted base forward) of the 2-layer tiny Gemma 3."""
  transformer = models.make_transformer("tiny", num_layers=2)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 1, transformer.config.num_embed)
  shapes = jax.eval_shape(transformer.init, jax.random.key(0), tokens)["params"]
  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda x: jnp.asarray((0.2 * rng.standard_normal(x.shape)).astype(np.float32)), shapes)
  forward = jax.jit(lambda p, t: transformer.apply({"params": p}, t).logits)
  return transformer, base, tokens, forward


def lora_logits(tiny_model, params, config) -> np.ndarray:
  transformer, base, tokens, _ = tiny_model
  model = lora.LoRA(model=transformer, config=config)
  return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(lora.merge_params(base, params), tokens))


@pytest.mark.parametrize("name", ["alpha", "joint"])
def test_exported_adapter_drives_the_model_like_ours(tmp_path, gemma_cfg, tiny_model, name):
  """The real check of head order and transposes: the model with our LoRA and the model whose weights got
  the PEFT file's ΔW (mapped back by transformers' conversion) give the same logits; the same ΔW with the
  query heads or o_proj's input features in the wrong order does not."""
  config = G_CONFIGS[name]
  _, base, tokens, forward = tiny_model
  params = trained_lora(gemma_cfg, config, seed=4)
  adapters.export_peft(params, tmp_path / "peft", lora_config=config, model_config=gemma_cfg)
  deltas = hf_deltas(tmp_path / "peft")
  ours = lora_logits(tiny_model, params, config)
  plain = np.asarray(forward(base, tokens))
  via_peft = np.asarray(forward(base_plus_hf(base, deltas, gemma_cfg), tokens))
  effect = np.abs(ours - plain).max()
  assert effect > 0.1  # the adapter matters
  np.testing.assert_allclose(via_peft, ours, atol=2e-3 * effect, rtol=0)
  n, h = gemma_cfg.num_heads, gemma_cfg.head_dim
  for module, perm in (
      ("q_proj", lambda w: w.reshape(n, h, -1).transpose(1, 0, 2).reshape(n * h, -1)),
      ("o_proj", lambda w: w.reshape(-1, n, h).transpose(0, 2, 1).reshape(-1, n * h)),
  ):
    wrong = {k: perm(w) if k.endswith(module) else w for k, w in deltas.items()}
    bad = np.asarray(forward(base_plus_hf(base, wrong, gemma_cfg), tokens))
    assert np.abs(bad - ours).max() > 100 * np.abs(via_peft - ours).max(), module


def write_gemma_peft(
    directory: Path,
    cfg,
    config: dict,
    *,
    stem: str = "model.layers",
    kinds=KINDS,
    seed: int = 0,
    dtype=np.float32,
    extra: dict | None = None,
) -> dict[str, np.ndarray]:
  """A PEFT Gemma 3 adapter written directly (safetensors library + json); returns its tensors."""
  rng = np.random.default_rng(seed)
  d, f = cfg.embed_dim, cfg.hidden_dim
  nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dims = {
      "q_proj": (d, nh),
      "k_proj": (d, kh),
      "v_proj": (d, kh),
      "o_proj": (nh, d),
      "gate_proj": (d, f),
      "up_proj": (d, f),
      "down_proj": (f, d),
  }
  tensors = {}
  for layer in range(cfg.num_layers):
    for proj in kinds:
      name = f"{stem}.{layer}.{PROJ_GROUP[proj]}.{proj}"
      r = peft_lookup(config.get("rank_pattern", {}), name, config["r"])
      n_in, n_out = dims[proj]
      tensors[f"{PREFIX}{name}.lora_A.weight"] = (rng.standard_normal((r, n_in)) / math.sqrt(n_in)).astype(dtype)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = (0.05 * rng.standard_normal((n_out, r))).astype(dtype)
  tensors.update(extra or {})
  write_adapter(directory, config, tensors)
  return tensors


def gemma_peft_config(**overrides) -> dict:
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": "google/gemma-3-270m",
      "r": 4,
      "lora_alpha": 16,
      "target_modules": list(KINDS),
      "use_rslora": False,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  config.update(overrides)
  return config


@pytest.mark.parametrize("stem", list(HF_STEMS))
@pytest.mark.parametrize("variant", ["patterns", "rslora"])
def test_import_hand_written_peft_adapter_folds_its_scale(tmp_path, gemma_cfg, stem, variant):
  if variant == "patterns":  # lora_alpha != r, per-module ranks and alphas (scales 4, 8, 16/6, 3/4)
    config = gemma_peft_config(rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3})
  else:
    config = gemma_peft_config(use_rslora=True, lora_alpha=6, r=8)
  write_gemma_peft(
      tmp_path / "in",
      gemma_cfg,
      config,
      stem=HF_STEMS[stem],
      dtype=ml_dtypes.bfloat16 if stem == "legacy" else np.float32,
  )
  want = hf_deltas(tmp_path / "in")
  params, our_config = adapters.import_peft(tmp_path / "in", model_config=gemma_cfg)
  assert our_config.alpha is None and our_config.targets == lora_layout.TARGETS
  assert lora_layout.lora_shapes(gemma_cfg, our_config) == {
      p: (tuple(x["a"].shape), tuple(x["b"].shape)) for p, x in squeeze.lora_pairs(params).items()
  }
  if variant == "patterns":
    ranks = lora.lora_ranks(params)
    assert ranks["layer_0/attn/q_lora"] == 2 and ranks["layer_1/mlp/down_lora"] == 6
    assert ranks["layer_0/mlp/down_lora"] == 4 and isinstance(our_config.rank, dict)
  assert_deltas_match(gemma_to_hf(gemma_deltas(params, our_config), HF_STEMS[stem]), want)


def test_imported_adapter_drives_the_model_like_the_hf_weights(tmp_path, gemma_cfg, tiny_model):
  _, base, tokens, forward = tiny_model
  config = gemma_peft_config(rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 2})
  write_gemma_peft(tmp_path / "in", gemma_cfg, config, stem=HF_STEMS["conditional_generation"], seed=5)
  want = np.asarray(forward(base_plus_hf(base, hf_deltas(tmp_path / "in"), gemma_cfg), tokens))
  params, our_config = adapters.import_peft(tmp_path / "in", model_config=gemma_cfg)
  got = lora_logits(tiny_model, params, our_config)
  effect = np.abs(want - np.asarray(forward(base, tokens))).max()
  assert effect > 0.05
  np.testing.assert_allclose(got, want, atol=2e-3 * effect, rtol=0)


def test_import_keeps_a_common_alpha_bit_for_bit(tmp_path, gemma_cfg):
  config = gemma_peft_config(rank_pattern={"layers.0.mlp.up_proj": 2})  # one lora_alpha: alpha/r per module
  tensors = write_gemma_peft(tmp_path / "in", gemma_cfg, config)
  params, our_config = adapters.import_peft(tmp_path / "in", model_config=gemma_cfg)
  assert our_config.alpha == 16.0
  name = f"{PREFIX}model.layers.0.mlp.up_proj"
  pair = params["layer_0"]["mlp"]["up_lora"]
  np.testing.assert_array_equal(np.asarray(pair["a"]), tensors[f"{name}.lora_A.weight"].T)
  np.testing.assert_array_equal(np.asarray(pair["b"]), tensors[f"{name}.lora_B.weight"].T)
  assert_deltas_match(gemma_to_hf(gemma_deltas(params, our_config)), hf_deltas(tmp_path / "in"))
  folded, folded_config = adapters.import_peft(tmp_path / "in", model_config=gemma_cfg, keep_alpha=False)
  assert folded_config.alpha is None
  assert_deltas_match(gemma_to_hf(gemma_deltas(folded, folded_config)), hf_deltas(tmp_path / "in"))


@pytest.mark.parametrize("alpha_pattern", [{"k_proj": 8}, {}])
def test_import_joint_from_independent_halves(tmp_path, gemma_cfg, alpha_pattern):
  """K and V (gate and up) with their own lora_A: joint import stacks them, rank r_k + r_v, ΔW exact (with
  one lora_alpha kept as alpha, each half's alpha/r_half over alpha/(r_k + r_v) is folded in)."""
  config = gemma_peft_config(rank_pattern={"v_proj": 3, "up_proj": 2}, alpha_pattern=alpha_pattern)
  write_gemma_peft(tmp_path / "in", gemma_cfg, config, seed=6)
  params, our_config = adapters.import_peft(tmp_path / "in", model_config=gemma_cfg, joint_kv=True, joint_gate_up=True)
  assert our_config.joint_kv and our_config.joint_gate_up
  assert our_config.alpha == (None if alpha_pattern else 16.0)
  ranks = lora.lora_ranks(params)
  assert ranks["layer_0/attn/kv_lora"] == 4 + 3 and ranks["layer_1/mlp/gate_up_lora"] == 4 + 2
  assert "layer_0/attn/k_lora" not in ranks
  assert_deltas_match(gemma_to_hf(gemma_deltas(params, our_config)), hf_deltas(tmp_path / "in"))


def test_export_bfloat16(tmp_path, gemma_cfg):
  params = trained_lora(gemma_cfg, G_ALPHA, seed=8)
  adapters.export_peft(params, tmp_path / "peft", lora_config=G_ALPHA, model_config=gemma_cfg, dtype="bfloat16")
  deltas, _, tensors = effective_deltas(tmp_path / "peft")
  assert all(x.dtype == ml_dtypes.bfloat16 for x in tensors.values())
  assert_deltas_match(deltas, gemma_to_hf(gemma_deltas(params, G_ALPHA)), tol=2e-2)


def test_export_to_an_existing_directory_needs_force(tmp_path, gemma_cfg):
  params = trained_lora(gemma_cfg, G_SEP)
  out = tmp_path / "out"
  out.mkdir()
  (out / "marker").write_text("x")
  with pytest.raises(adapters.AdapterError, match="force"):
    adapters.export_peft(params, out, lora_config=G_SEP, model_config=gemma_cfg)
  assert (out / "marker").exists()
  adapters.export_peft(params, out, lora_config=G_SEP, model_config=gemma_cfg, force=True)
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kind", ["wrong_shape", "nan", "joint_mismatch", "missing_module", "bad_layout"])
def test_export_errors_leave_no_directory(tmp_path, gemma_cfg, kind):
  config = G_SEP
  params = trained_lora(gemma_cfg, config)
  kwargs = {}
  if kind == "wrong_shape":  # 3 query heads instead of 4
    params["layer_1"]["attn"]["q_lora"]["b"] = jnp.ones((4, 3, 16))
    fragment = "layer_1/attn/q_lora"
  elif kind == "nan":
    params["layer_1"]["mlp"]["down_lora"]["a"] = params["layer_1"]["mlp"]["down_lora"]["a"].at[2, 1].set(jnp.nan)
    fragment = "NaN"
  elif kind == "joint_mismatch":  # separate k/v params exported as if joint
    config = lora.LoRAConfig(rank=4, joint_kv=True)
    fragment = "kv_lora"
  elif kind == "missing_module":
    del params["layer_0"]["mlp"]["up_lora"]
    fragment = "layer_0/mlp/up_lora"
  else:
    kwargs["layout"] = "seq2seq"
    fragment = "layout"
  with pytest.raises(adapters.AdapterError, match=re.escape(fragment)):
    adapters.export_peft(params, tmp_path / "out", lora_config=config, model_config=gemma_cfg, **kwargs)
  assert list(tmp_path.iterdir()) == []  # no output, no temporary left behind


def _break_gemma(kind: str, directory: Path, cfg) -> str:
  config = gemma_peft_config()
  victim = f"{PREFIX}model.layers.1.mlp.up_proj"
  if kind == "missing_lora_B":
    tensors = write_gemma_peft(directory, cfg, config)
    del tensors[f"{victim}.lora_B.weight"]
    write_adapter(directory, config, tensors)
    return "model.layers.1.mlp.up_proj"
  if kind == "wrong_shape":  # a hidden size of 63, not the model's 64
    tensors = write_gemma_peft(directory, cfg, config)
    tensors[f"{victim}.lora_A.weight"] = np.zeros((4, 63), np.float32)
    write_adapter(directory, config, tensors)
    return "A [4, 63]"
  if kind == "unknown_module":  # a LoRA on the SigLIP tower
    vision = f"{PREFIX}model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    write_gemma_peft(
        directory,
        cfg,
        config,
        stem=HF_STEMS["conditional_generation"],
        extra={
            f"{vision}.lora_A.weight": np.zeros((4, 32), np.float32),
            f"{vision}.lora_B.weight": np.zeros((32, 4), np.float32),
        },
    )
    return "vision_tower"
  if kind == "layer_out_of_range":  # an adapter for a deeper model
    write_gemma_peft(directory, models.model_config("tiny", num_layers=3), config)
    return "layer 2 is out of range"
  if kind == "nan":
    tensors = write_gemma_peft(directory, cfg, config)
    tensors[f"{victim}.lora_B.weight"][7, 1] = np.nan
    write_adapter(directory, config, tensors)
    return "NaN"
  if kind == "modules_to_save":
    write_gemma_peft(
        directory,
        cfg,
        {**config, "modules_to_save": ["lm_head"]},
        extra={f"{PREFIX}lm_head.weight": np.zeros((8, 64), np.float32)},
    )
    return "lm_head"
  if kind == "missing_layer":  # layers_to_transform=[0]: our LoRA adapts every layer
    tensors = write_gemma_peft(directory, cfg, config)
    write_adapter(directory, config, {k: v for k, v in tensors.items() if ".layers.1." not in k})
    return "layer 1 adapts []"
  if kind == "joint_needs_both":
    write_gemma_peft(directory, cfg, config, kinds=("q_proj", "k_proj"))
    return "joint_kv"
  raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing_lora_B",
        "wrong_shape",
        "unknown_module",
        "layer_out_of_range",
        "nan",
        "modules_to_save",
        "missing_layer",
        "joint_needs_both",
    ],
)
def test_import_errors_name_the_problem(tmp_path, gemma_cfg, kind):
  src = tmp_path / "in"
  src.mkdir()
  fragment = _break_gemma(kind, src, gemma_cfg)
  with pytest.raises(adapters.AdapterError, match=re.escape(fragment)):
    adapters.import_peft(src, model_config=gemma_cfg, joint_kv=kind == "joint_needs_both")


def test_export_cli_squeeze_import(tmp_path, gemma_cfg):
  """Post-Squeeze through the PEFT files: export at rank 8 (alpha 16, so PEFT's scale is 2), `lora-squeeze
  squeeze --rank 3`, import: every module's ΔW is squeeze_factors' rank-3 ΔW of ours (= the float64 SVD
  truncation), and lora.change_rank on our tree gives the same ΔW."""
  config = lora.LoRAConfig(rank=8, alpha=16.0)
  params = trained_lora(gemma_cfg, config, seed=7)
  adapters.export_peft(params, tmp_path / "peft", lora_config=config, model_config=gemma_cfg)
  assert run_cli("squeeze", tmp_path / "peft", tmp_path / "small", "--rank", 3) == 0
  small, small_config = adapters.import_peft(tmp_path / "small", model_config=gemma_cfg)
  assert small_config.rank == 3 and small_config.alpha is None  # the squeeze writes scale 1
  changed, changed_config = lora.change_rank(params, 3, config)
  new_pairs, changed_pairs = squeeze.lora_pairs(small), squeeze.lora_pairs(changed)
  for path, pair in squeeze.lora_pairs(params).items():
    a, b = squeeze.to_matrices(np.asarray(pair["a"]), np.asarray(pair["b"]))
    half = np.float32(math.sqrt(config.scale(8)))
    out = squeeze.squeeze_factors(np.asarray(a) * half, np.asarray(b) * half, 3)
    want = np.asarray(out.a, np.float64) @ np.asarray(out.b, np.float64)
    full = config.scale(8) * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    for got_pair, got_config in ((new_pairs[path], small_config), (changed_pairs[path], changed_config)):
      ga, gb = squeeze.to_matrices(np.asarray(got_pair["a"]), np.asarray(got_pair["b"]))
      assert ga.shape[-1] == 3
      got = got_config.scale(3) * np.asarray(ga, np.float64) @ np.asarray(gb, np.float64)
      assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, path
      assert np.linalg.norm(got - truncate(full, 3)) / np.linalg.norm(want) < 1e-5, path
