"""PEFT adapter I/O and the `lora-squeeze` command (lora_squeeze/adapters.py).

Adapters are built here with plain numpy + the safetensors library (a tiny Llama-like layout: 2 layers of
q, k, v, o, gate, up, down, plus an embedding and a conv LoRA and a modules_to_save tensor), squeezed through
the CLI, and every module's new effective ΔW = scale·B@A (scale from the *written* config, resolved with
PEFT's pattern rule implemented independently below) is checked against a float64 numpy SVD truncation of
the original effective ΔW. The outputs are read back with the safetensors library, not our reader.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_squeeze import adapters

HIDDEN, KV, FFN, VOCAB = 32, 16, 64, 64
PREFIX = "base_model.model."
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (in, out) per module type. max(in, out) is 32 or 64 everywhere, so a whole adapter costs two compiles.
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (HIDDEN, FFN), "up_proj": (HIDDEN, FFN), "down_proj": (FFN, HIDDEN)}
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
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama",
            "r": 16, "lora_alpha": 32, "target_modules": list(KINDS) + ["embed_tokens", "patch_conv"],
            "modules_to_save": ["lm_head"], "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
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
    name = match[1][len(PREFIX):]
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
    src = make_adapter(tmp_path / "in", rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 4},
                       alpha_pattern={"v_proj": 64, "layers.1.mlp.down_proj": 2})
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


def test_cli_runs_as_a_module_in_a_subprocess(tmp_path):
  src = make_adapter(tmp_path / "in", names=module_names(1, ("q_proj", "v_proj"), extras=False))
  out = tmp_path / "out"
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  proc = subprocess.run([sys.executable, "-m", "lora_squeeze.adapters", "squeeze", str(src), str(out),
                         "--rank", "4"], capture_output=True, text=True, env=env, timeout=300)
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
  assert float(row[-3]) == pytest.approx((s[:8] ** 2).sum() / (s ** 2).sum(), abs=1e-5)  # V(r/2)
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


@pytest.mark.parametrize("kind", ["truncated", "corrupt_header", "missing_config", "missing_lora_B",
                                  "missing_lora_A", "shape_mismatch", "nan", "rank_inconsistent"])
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
# Building blocks.
# --------------------------------------------------------------------------------------------------------


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {"bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
             "f16": rng.standard_normal((4,)).astype(np.float16), "f32": rng.standard_normal((2, 3, 1)).astype(np.float32),
             "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
  adapters.save_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
  theirs = load_file(str(tmp_path / "ours.safetensors"))
  save_file(tensors, str(tmp_path / "lib.safetensors"))
  with adapters.SafetensorsReader(tmp_path / "lib.safetensors") as reader:
    ours = {k: reader.read(k) for k in reader.tensors}
  for k, x in tensors.items():
    for y in (theirs[k], ours[k]):
      assert y.dtype == x.dtype and y.shape == x.shape
      np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))
  entries = [(k, adapters._CODES[x.dtype], x.shape) for k, x in tensors.items()]
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
  config = adapters.LoraConfig.from_dict(base_config(rank_pattern={"q_proj": 4}, alpha_pattern={"k_proj": 64}))
  assert config.scale("model.layers.0.self_attn.q_proj") == 32 / 4
  assert config.scale("model.layers.0.self_attn.k_proj") == 64 / 16
  assert config.scale("model.layers.0.mlp.up_proj") == 32 / 16
  rs = adapters.LoraConfig.from_dict(base_config(use_rslora=True))
  assert rs.scale("model.layers.0.mlp.up_proj") == 32 / 4
  with pytest.raises(adapters.AdapterError, match="peft_type"):
    adapters.LoraConfig.from_dict(base_config(peft_type="IA3"))
