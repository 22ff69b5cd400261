"""GGUF LoRA adapters (llama.cpp / ollama): squeeze, convert PEFT <-> GGUF, bad input.

The fixtures in tests/fixtures/gguf/ were written by the real producers: a PEFT adapter on Gemma 3 270M
shapes (PEFT's save_pretrained) and that adapter converted by llama.cpp's own convert_lora_to_gguf.py in
float32 and float16 (tests/fixtures/make_gguf_fixtures.py). Expected values are computed independently of
lora_squeeze, from the raw tensors read with gguf's reader / safetensors: llama.cpp's scale rule
ΔW = (alpha / r_m) · lora_b @ lora_a (scale 1 when alpha is 0), truncated with numpy's float64 SVD.
No torch and no llama.cpp here: experiments/gguf_llamacpp.py runs llama.cpp itself.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from lora_squeeze import adapters

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "gguf"
PEFT = FIXTURES / "peft_gemma3_270m"
GGUF = FIXTURES / "gemma3_270m_lora.gguf"
GGUF16 = FIXTURES / "gemma3_270m_lora_f16.gguf"
TOL = 2e-5


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
  monkeypatch.setenv("LORA_SQUEEZE_JAX_CACHE", "")


def run_cli(*argv) -> int:
  return adapters.main([str(a) for a in argv])


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
  """(metadata {key: value}, tensors {name: array in numpy order}, {name: GGML type name})."""
  r = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
  tensors = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in r.tensors}
  types = {t.name: t.tensor_type.name for t in r.tensors}
  return meta, tensors, types


def deltas(meta: dict, tensors: dict) -> dict[str, np.ndarray]:
  """llama.cpp's ΔW (out, in) per base weight: (alpha / r_m) · lora_b @ lora_a, scale 1 without alpha."""
  alpha = meta.get("adapter.lora.alpha", 0.0)
  out = {}
  for name, a in tensors.items():
    if name.endswith(".lora_a"):
      b = tensors[name[:-1] + "b"].astype(np.float64)
      r = a.shape[0]
      out[name[: -len(".lora_a")]] = (alpha / r if alpha else 1.0) * b @ a.astype(np.float64)
  return out


def truncate(w: np.ndarray, k: int) -> np.ndarray:
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


def rel_fro(x: np.ndarray, y: np.ndarray) -> float:
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def load_peft(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
  with safe_open(str(directory / "adapter_model.safetensors"), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return json.loads((directory / "adapter_config.json").read_text()), tensors


def peft_deltas(config: dict, tensors: dict) -> dict[str, np.ndarray]:
  """PEFT's ΔW per module: lora_alpha / r with rank_pattern / alpha_pattern keys matched as name tails."""

  def pattern(d: dict, name: str, default):
    return next((v for k, v in d.items() if name == k or name.endswith("." + k)), default)

  out = {}
  for key, a in tensors.items():
    if key.endswith(".lora_A.weight"):
      name = key[len("base_model.model.") : -len(".lora_A.weight")]
      r = pattern(config.get("rank_pattern") or {}, name, config["r"])
      assert r == a.shape[0], (name, r, a.shape)
      alpha = pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
      b = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
      out[name] = alpha / r * b @ a.astype(np.float64)
  return out


# --------------------------------------------------------------------------------------------------------
# Convert: what llama.cpp's converter writes, and back.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture,flags", [(GGUF, []), (GGUF16, ["--dtype", "float16"])], ids=["f32", "f16"])
def test_peft_to_gguf_is_byte_for_byte_what_llama_cpp_converter_writes(tmp_path, capsys, fixture, flags):
  out = tmp_path / "ours.gguf"
  assert run_cli("convert", PEFT, out, *flags) == 0  # the architecture from base_model_name_or_path
  printed = capsys.readouterr().out
  assert "general.architecture = gemma3" in printed and "adapter.lora.alpha = 4" in printed
  # Same names, shapes, types, values, alpha and metadata (general.name from the directory name, as the
  # converter's gguf.Metadata heuristics give it), in the same order: the same bytes.
  assert out.read_bytes() == fixture.read_bytes()
  meta, tensors, _ = read_gguf(out)
  assert meta["adapter.lora.alpha"] == 4.0 and meta["general.type"] == "adapter" and len(tensors) == 16


def test_gguf_to_peft_gives_back_the_peft_adapter(tmp_path, capsys):
  out = tmp_path / "peft"
  assert run_cli("convert", GGUF, out) == 0
  assert "lora_alpha = 4" in capsys.readouterr().out
  config, tensors = load_peft(out)
  want_config, want = load_peft(PEFT)
  assert sorted(tensors) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(tensors[key], want[key])  # bit for bit
  assert config["r"] == 2 and config["lora_alpha"] == 4 and config["rank_pattern"] == {"down_proj": 1}
  got, ref = peft_deltas(config, tensors), peft_deltas(want_config, want)
  assert sorted(got) == sorted(ref)
  for name in ref:
    assert rel_fro(got[name], ref[name]) == 0.0, name
  # ... and the effect is llama.cpp's: PEFT's ΔW of each module is the GGUF's.
  meta, gt, _ = read_gguf(GGUF)
  gd = deltas(meta, gt)
  assert rel_fro(got["model.layers.5.self_attn.q_proj"], gd["blk.5.attn_q.weight"]) < 1e-12
  assert rel_fro(got["model.layers.0.mlp.down_proj"], gd["blk.0.ffn_down.weight"]) < 1e-12


def test_gguf_to_peft_keeps_float16_and_names_the_multimodal_layout(tmp_path):
  out = tmp_path / "peft"
  assert run_cli("convert", GGUF16, out, "--layout", "conditional_generation") == 0
  config, tensors = load_peft(out)
  key = "base_model.model.model.language_model.layers.5.self_attn.q_proj.lora_A.weight"
  assert tensors[key].dtype == np.float16 and tensors[key].shape == (2, 640)
  assert config["target_modules"].startswith(".*language_model")
  # Round trip: back to GGUF (arch given, the config has no base model) is the float16 file's tensors.
  back = tmp_path / "back.gguf"
  assert run_cli("convert", out, back, "--arch", "gemma3", "--dtype", "keep") == 0
  _, t1, types = read_gguf(back)
  _, t0, _ = read_gguf(GGUF16)
  assert sorted(t1) == sorted(t0) and set(types.values()) == {"F16"}
  for name in t0:
    np.testing.assert_array_equal(t1[name], t0[name])


def test_peft_with_alpha_pattern_folds_the_scales_llama_cpp_cannot_express(tmp_path, capsys):
  src = tmp_path / "peft"
  shutil.copytree(PEFT, src)
  config = json.loads((src / "adapter_config.json").read_text())
  config["alpha_pattern"] = {"q_proj": 16}
  (src / "adapter_config.json").write_text(json.dumps(config))
  out = tmp_path / "o.gguf"
  assert run_cli("convert", src, out) == 0
  assert "scales folded in" in capsys.readouterr().out
  meta, tensors, _ = read_gguf(out)
  assert meta["adapter.lora.alpha"] == 2.0  # the largest rank
  want = peft_deltas(config, load_peft(src)[1])
  got = deltas(meta, tensors)
  name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 6)
  for name, w in want.items():
    assert rel_fro(got[name_map.get_name(name + ".weight", try_suffixes=(".weight",))], w) < TOL, name


# --------------------------------------------------------------------------------------------------------
# Squeeze: a GGUF LoRA that llama.cpp loads, each ΔW the best rank-k approximation.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", [GGUF, GGUF16], ids=["f32", "f16"])
def test_squeeze_gguf_to_rank_1(tmp_path, capsys, fixture):
  out = tmp_path / "r1.gguf"
  assert run_cli("squeeze", fixture, out, "--rank", 1, "--no-progress") == 0
  assert "adapter.lora.alpha = 1: scale alpha / r = 1 in every module" in capsys.readouterr().out
  meta_in, t_in, types_in = read_gguf(fixture)
  meta, t_out, types = read_gguf(out)
  assert meta == {**meta_in, "adapter.lora.alpha": 1.0}  # architecture, name, ... kept; alpha = the new rank
  assert list(t_out) == list(t_in) and types == types_in  # same tensors, order and types (F16 stays F16)
  before, after = deltas(meta_in, t_in), deltas(meta, t_out)
  tol = TOL if fixture == GGUF else 2e-3  # float16 factors: the output is rounded to float16 again
  for name, w in before.items():
    assert t_out[name + ".lora_a"].shape[0] == 1
    assert rel_fro(after[name], truncate(w, 1)) < tol, name


def test_squeeze_gguf_per_module_ranks_share_one_alpha(tmp_path, capsys):
  """kohya's sv_ratio picks rank 2 for some modules and 1 for others: one alpha (the largest rank) for the
  file, llama.cpp's alpha / r_m folded out of each module's factors."""
  ratio = 1.035
  out = tmp_path / "mixed.gguf"
  assert run_cli("squeeze", GGUF, out, "--sv-ratio", ratio, "--no-progress") == 0
  assert "the largest rank" in capsys.readouterr().out
  meta_in, t_in, _ = read_gguf(GGUF)
  meta, t_out, _ = read_gguf(out)
  assert meta["adapter.lora.alpha"] == 2.0
  ranks = {}
  for name, w in deltas(meta_in, t_in).items():
    s = np.linalg.svd(w, compute_uv=False)
    k = max(1, int((s[: min(w.shape)] > s[0] / ratio).sum()))
    k = min(k, t_in[name + ".lora_a"].shape[0])
    ranks[name] = t_out[name + ".lora_a"].shape[0]
    assert ranks[name] == k == t_out[name + ".lora_b"].shape[1], name
    assert rel_fro(deltas(meta, t_out)[name], truncate(w, k)) < TOL, name
  assert set(ranks.values()) == {1, 2}, ranks


def test_inspect_and_dry_run_on_gguf(tmp_path, capsys):
  assert run_cli("inspect", GGUF, "--no-progress") == 0
  printed = capsys.readouterr().out
  assert "8 LoRA modules" in printed and "attn_q           (  2)" in printed
  out = tmp_path / "o.gguf"
  assert run_cli("squeeze", GGUF, out, "--energy", 0.5, "--dry-run", "--no-progress") == 0
  assert "would write" in capsys.readouterr().out and not out.exists()


def test_gguf_output_suffix_and_existing_output(tmp_path, capsys):
  out = tmp_path / "o.safetensors"
  assert run_cli("squeeze", GGUF, out, "--rank", 1, "--no-progress") == 2
  assert "is a .gguf file" in capsys.readouterr().err and not out.exists()
  out = tmp_path / "o.gguf"
  out.write_bytes(b"old")
  assert run_cli("squeeze", GGUF, out, "--rank", 1, "--no-progress") == 2
  assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"old"
  assert run_cli("convert", GGUF, tmp_path / "x.gguf") == 2
  assert "a GGUF file already" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.
# --------------------------------------------------------------------------------------------------------


def rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    meta: dict | None = None,
    drop=(),
    tensors=None,
    general_type: str | None = None,
) -> None:
  """Writes ``src`` again with gguf's own writer, changing metadata or tensors (numpy order)."""
  r = gguf.GGUFReader(src)
  fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
  w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
  for key, f in fields.items():
    value = f.contents()
    if key == "general.type" and general_type is not None:
      value = general_type
    if meta and key in meta:
      value = meta[key]
    w.add_key_value(key, value, f.types[0])
  data = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in r.tensors}
  data.update(tensors or {})
  for name, x in data.items():
    if name not in drop:
      w.add_tensor(name, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def bad(kind: str, d: Path) -> tuple[Path, str]:
  path = d / "bad.gguf"
  a_key = "blk.0.attn_q.weight.lora_a"
  if kind == "truncated":
    data = GGUF.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"
  if kind == "truncated_header":
    path.write_bytes(GGUF.read_bytes()[:200])
    return path, "truncated or corrupt"
  if kind == "base_model":
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((1024, 640), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(640, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, "a base model GGUF"
  if kind == "adapter_type":
    rewrite(GGUF, path, meta={"adapter.type": "control_vector"})
    return path, "adapter.type' is 'control_vector'"
  if kind == "unpaired":
    rewrite(GGUF, path, drop=("blk.0.attn_q.weight.lora_b",))
    return path, "has no 'blk.0.attn_q.weight.lora_b'"
  if kind == "rank_mismatch":
    rewrite(GGUF, path, tensors={"blk.0.attn_q.weight.lora_b": np.zeros((1024, 3), np.float32)})
    return path, "do not pair"
  if kind == "nan":
    _, t, _ = read_gguf(GGUF)
    x = t[a_key].copy()
    x[1, 7] = np.nan
    rewrite(GGUF, path, tensors={a_key: x})
    return path, "NaN/Inf"
  if kind == "inf_alpha":
    rewrite(GGUF, path, meta={"adapter.lora.alpha": float("inf")})
    return path, "adapter.lora.alpha' is inf"
  if kind == "unknown_arch":
    rewrite(GGUF, path, arch="gemma9")
    return path, "architecture 'gemma9' is not in gguf's name map (nearest: gemma"
  if kind == "foreign_tensor":
    rewrite(
        GGUF,
        path,
        tensors={
            "blk.0.attn_qkv.weight.lora_a": np.zeros((2, 640), np.float32),
            "blk.0.attn_qkv.weight.lora_b": np.zeros((1536, 2), np.float32),
        },
    )
    return path, "'blk.0.attn_qkv.weight' is not a gemma3 weight"
  raise ValueError(kind)


KINDS = [
    "truncated",
    "truncated_header",
    "base_model",
    "adapter_type",
    "unpaired",
    "rank_mismatch",
    "nan",
    "inf_alpha",
    "unknown_arch",
    "foreign_tensor",
]


@pytest.mark.parametrize("command", ["squeeze", "convert"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_gguf_input(tmp_path, capsys, kind, command):
  src_dir = tmp_path / "in"
  src_dir.mkdir()
  src, fragment = bad(kind, src_dir)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  if command == "squeeze":
    code = run_cli("squeeze", src, out_dir / "o.gguf", "--rank", 1, "--no-progress")
  else:
    code = run_cli("convert", src, out_dir / "peft")
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("lora-squeeze: error:"), err
  assert fragment in err and src.name in err and "Traceback" not in err, err
  assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("no_arch", "cannot tell the llama.cpp architecture"),
        ("typo_arch", "architecture 'gema3' is not in gguf's name map (nearest: gemma3)"),
        ("bad_module", "has no llama.cpp name for architecture 'gemma3'"),
        ("extra_tensor", "is not a lora_A/lora_B factor"),
    ],
)
def test_bad_peft_to_gguf(tmp_path, capsys, case, fragment):
  src = tmp_path / "peft"
  shutil.copytree(PEFT, src)
  config = json.loads((src / "adapter_config.json").read_text())
  argv = []
  if case == "no_arch":
    config["base_model_name_or_path"] = "someone/some-model"
  elif case == "typo_arch":
    argv = ["--arch", "gema3"]
  elif case in ("bad_module", "extra_tensor"):
    _, tensors = load_peft(src)
    if case == "bad_module":
      tensors = {k.replace("layers.5.self_attn.q_proj", "layers.5.self_attn.qkv_proj"): v for k, v in tensors.items()}
    else:
      tensors["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    adapters.save_safetensors(src / "adapter_model.safetensors", tensors)
  (src / "adapter_config.json").write_text(json.dumps(config))
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  assert run_cli("convert", src, out_dir / "o.gguf", *argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err
  assert list(out_dir.iterdir()) == []


def test_convert_imports_neither_torch_nor_llama_cpp(tmp_path):
  heavy = ("torch", "llama_cpp", "tensorflow", "gemma", "flax", "orbax", "transformers")
  code = (
      "import sys; from lora_squeeze import adapters; "
      "assert adapters.main(['convert', sys.argv[1], sys.argv[2]]) == 0; "
      "assert adapters.main(['squeeze', sys.argv[2], sys.argv[3], '--rank', '1', '--no-progress']) == 0; "
      f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {set(heavy)!r}); "
      "assert not heavy, heavy; print('light')"
  )
  env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_SQUEEZE_JAX_CACHE": ""}
  proc = subprocess.run(
      [sys.executable, "-c", code, str(PEFT), str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().endswith("light")


def test_a_gguf_name_without_gguf_content_is_named_as_the_bad_input(tmp_path, capsys):
  """A file called .gguf that is not one: the error names the INPUT (not the output path's suffix), exit 2,
  nothing written."""
  bad = tmp_path / "adapter.gguf"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
  out = tmp_path / "out.gguf"
  assert run_cli("squeeze", bad, out, "--rank", "2", "--no-progress") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{bad}: not a GGUF file" in err[0], err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]
