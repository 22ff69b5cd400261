"""Tests for lora_squeeze.lora: layout, forward/grad semantics, fuse/unfuse, rank changes, Gemma 3 shapes.

A tiny random Gemma-3-architecture model (2 layers: one local sliding, one global; 4 heads / 2 KV heads)
carries the numerical tests; the real sizes (270M .. 12B, 4B with its vision tower) only go through
``jax.eval_shape``, so no weights are allocated. Compiles dominate the run time on CPU, so jitted functions
are shared and most comparisons are made on weights (fuse) through one base forward.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma import gm

from lora_squeeze import lora
from lora_squeeze import lora_fuse
from lora_squeeze import lora_layout
from lora_squeeze import lora_matmul
from lora_squeeze import squeeze

# Few distinct configs: every one that runs a forward is an XLA compile (seconds on 2 CPU cores).
SEP = lora.LoRAConfig(rank=4)
SEP_ALPHA = lora.LoRAConfig(rank=4, alpha=8.0)  # same shapes as SEP, scale 2
JOINT = lora.LoRAConfig(rank={"*/attn/*": 3, "*": 2}, joint_kv=True, joint_gate_up=True)


# --------------------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------------------


def _tiny_transformer(dtype=jnp.float32):
  """The project's "tiny" Gemma 3 (models.py), 2 layers; a local fallback while models.py is in flux."""
  try:
    from lora_squeeze import models  # pylint: disable=g-import-not-at-top

    return models.make_transformer("tiny", num_layers=2, dtype=dtype)
  except (ImportError, AttributeError):
    cfg = gm.nn.config.TransformerConfig(
        num_embed=256,
        embed_dim=64,
        hidden_dim=128,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        final_logit_softcap=None,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        attention_types=(gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL),
        sliding_window_size=4,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
    )
    return gm.nn.Transformer(config=cfg, dtype=dtype)


def _random_like(tree, seed, std):
  """Random normal leaves shaped like ``tree`` (numpy: no per-shape XLA compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray((std * rng.standard_normal(x.shape)).astype(x.dtype)), tree)


@pytest.fixture(scope="module")
def tiny():
  """(transformer, base params, tokens, jitted base forward). Params: random normal from abstract shapes
  (cheaper than gemma's jitted init; the values only need to be generic)."""
  transformer = _tiny_transformer()
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 1, transformer.config.num_embed)
  shapes = jax.eval_shape(transformer.init, jax.random.key(0), tokens)["params"]
  base = _random_like(shapes, 0, 0.2)
  base_forward = jax.jit(lambda p, t: transformer.apply({"params": p}, t).logits)
  return transformer, base, tokens, base_forward


_FORWARDS = {}


def lora_forward(transformer, config):
  """One jitted LoRA forward per config (each distinct config is a compile)."""
  if config not in _FORWARDS:
    model = lora.LoRA(model=transformer, config=config)
    _FORWARDS[config] = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)
  return _FORWARDS[config]


def _trained_like(transformer, config, seed=2, std=0.3):
  """LoRA params with b != 0 (as after training)."""
  shapes = jax.eval_shape(lambda: lora.init_lora(jax.random.key(seed), transformer, config))
  return _random_like(shapes, seed, std)


def _close(x, y, tol=2e-5):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  scale = max(np.abs(y).max(), 1e-6)
  assert np.abs(x - y).max() <= tol * scale, f"max |diff| {np.abs(x - y).max():.3g} vs scale {scale:.3g}"


# --------------------------------------------------------------------------------------------------------
# Config, paths and shapes (pure python).
# --------------------------------------------------------------------------------------------------------


def test_config_validation_and_hash():
  cfg = lora.LoRAConfig(rank={"*/attn/*": 4, "*": 2}, alpha=8, targets=["v", "q"])
  assert cfg.targets == ("q", "v")  # canonical order
  assert hash(cfg) == hash(lora.LoRAConfig(rank={"*/attn/*": 4, "*": 2}, alpha=8.0, targets=("q", "v")))
  assert cfg != lora.LoRAConfig(rank={"*": 2, "*/attn/*": 4}, alpha=8, targets=("q", "v"))  # order matters
  with pytest.raises(ValueError, match="unknown"):
    lora.LoRAConfig(rank=2, targets=("q", "proj"))
  with pytest.raises(ValueError, match="int >= 1"):
    lora.LoRAConfig(rank=0)
  with pytest.raises(ValueError, match="joint_kv"):
    lora.LoRAConfig(rank=2, targets=("q", "k"), joint_kv=True)
  with pytest.raises(ValueError, match="alpha"):
    lora.LoRAConfig(rank=2, alpha=-1.0)


def test_module_kind():
  assert lora_layout.module_kind("layer_3/attn/q_lora") == (3, "q")
  assert lora_layout.module_kind("params/layer_12/mlp/gate_up_lora/b") == (12, "gate_up")
  assert lora_layout.module_kind("layer_0/attn/kv_lora") == (0, "kv")
  for bad in ("layer_0/attn/q_einsum", "layer_0/mlp/q_lora", "vision_encoder/x/q_lora", "layer_0/attn/w"):
    with pytest.raises(ValueError, match="not a LoRA module path"):
      lora_layout.module_kind(bad)


def test_shapes_separate_and_joint(tiny):
  transformer = tiny[0]
  c = transformer.config
  d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  sep = lora_layout.lora_shapes(transformer, lora.LoRAConfig(rank=3))
  assert list(sep)[:7] == [f"layer_0/attn/{x}_lora" for x in ("q", "k", "v", "o")] + [
      f"layer_0/mlp/{x}_lora" for x in ("gate", "up", "down")
  ]
  assert sep["layer_1/attn/q_lora"] == ((d, 3), (3, n, h))
  assert sep["layer_1/attn/k_lora"] == sep["layer_1/attn/v_lora"] == ((d, 3), (3, k, h))
  assert sep["layer_1/attn/o_lora"] == ((n, h, 3), (3, d))
  assert sep["layer_1/mlp/gate_lora"] == sep["layer_1/mlp/up_lora"] == ((d, 3), (3, f))
  assert sep["layer_1/mlp/down_lora"] == ((f, 3), (3, d))
  joint = lora_layout.lora_shapes(transformer, lora.LoRAConfig(rank=3, joint_kv=True, joint_gate_up=True))
  assert joint["layer_0/attn/kv_lora"] == ((d, 3), (3, 2, k, h))
  assert joint["layer_0/mlp/gate_up_lora"] == ((d, 3), (3, 2, f))
  assert len(joint) == 5 * c.num_layers and len(sep) == 7 * c.num_layers
  only = lora_layout.lora_shapes(transformer, lora.LoRAConfig(rank=2, targets=("q", "v")))
  assert sorted(only) == ["layer_0/attn/q_lora", "layer_0/attn/v_lora", "layer_1/attn/q_lora", "layer_1/attn/v_lora"]


def test_rank_mapping_and_bad_keys(tiny):
  transformer = tiny[0]
  cfg = lora.LoRAConfig(rank={"layer_1/attn/q_lora": 5, "*/attn/*": 3, "*": 2})
  shapes = lora_layout.lora_shapes(transformer, cfg)
  assert shapes["layer_1/attn/q_lora"][0][-1] == 5
  assert shapes["layer_0/attn/q_lora"][0][-1] == 3 and shapes["layer_1/attn/o_lora"][1][0] == 3
  assert shapes["layer_0/mlp/down_lora"][0][-1] == 2
  params = jax.eval_shape(lambda: lora.init_lora(jax.random.key(0), transformer, cfg))
  assert lora.lora_ranks(params) == {p: s[0][-1] for p, s in shapes.items()}
  with pytest.raises(ValueError, match="layer_9/attn/q_lora"):
    lora_layout.lora_shapes(transformer, lora.LoRAConfig(rank={"layer_9/attn/q_lora": 4, "*": 2}))
  with pytest.raises(ValueError, match="no rank for LoRA module 'layer_0/mlp/gate_lora'"):
    lora_layout.lora_shapes(transformer, lora.LoRAConfig(rank={"*/attn/*": 4}))


# --------------------------------------------------------------------------------------------------------
# Init (pure) and the init-cache trap.
# --------------------------------------------------------------------------------------------------------


def test_init_lora_values_and_two_ranks_in_one_process(tiny):
  transformer, _, tokens, _ = tiny
  for r in (3, 5, 3):  # pure init: no cache can return another rank's shapes
    cfg = lora.LoRAConfig(rank=r)
    params = lora.init_lora(jax.random.key(0), transformer, cfg)
    pairs = squeeze.lora_pairs(params)
    assert {p: (tuple(v["a"].shape), tuple(v["b"].shape)) for p, v in pairs.items()} == lora_layout.lora_shapes(
        transformer, cfg
    )
    for v in pairs.values():
      assert v["a"].dtype == v["b"].dtype == jnp.float32
      assert not np.any(v["b"]) and np.all(np.abs(v["a"]) <= math.sqrt(6 / math.prod(v["a"].shape[:-1])))
  # Through the wrapper's own init too (gemma's nn.jit cache returned the first rank's shapes there).
  for r in (3, 5):
    model = lora.LoRA(model=transformer, config=lora.LoRAConfig(rank=r))
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    got = {p: (v["a"].shape, v["b"].shape) for p, v in squeeze.lora_pairs(lora.split_params(shapes)[1]).items()}
    assert got == lora_layout.lora_shapes(transformer, model.config)


def test_split_merge_roundtrip(tiny):
  transformer, base, _, _ = tiny
  l = jax.eval_shape(lambda: lora.init_lora(jax.random.key(0), transformer, lora.LoRAConfig(rank=2)))
  merged = lora.merge_params(base, l)
  b2, l2 = lora.split_params(merged)
  assert jax.tree.structure(b2) == jax.tree.structure(base)
  assert jax.tree.structure(l2) == jax.tree.structure(l)
  b3, l3 = lora.split_params({"params": merged})
  assert set(b3) == set(l3) == {"params"}
  assert lora.split_params(base)[1] == {}  # no empty dicts left behind
  with pytest.raises(ValueError, match="defined in both"):
    lora.merge_params(base, base)


# --------------------------------------------------------------------------------------------------------
# Forward, gradients, fuse.
# --------------------------------------------------------------------------------------------------------


def test_zero_b_equals_base_exactly(tiny):
  transformer, base, tokens, base_forward = tiny
  cfg = SEP
  l = lora.init_lora(jax.random.key(0), transformer, cfg)
  out = lora_forward(transformer, cfg)(lora.merge_params(base, l), tokens)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(base_forward(base, tokens)))


def test_gradients_only_lora(tiny):
  transformer, base, tokens, _ = tiny
  cfg = SEP
  model = lora.LoRA(model=transformer, config=cfg)

  def loss(l, base):
    logits = model.apply({"params": lora.merge_params(base, l)}, tokens).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

  grad = jax.jit(jax.grad(loss))  # d/d LoRA only: base is a constant of the step
  l = lora.init_lora(jax.random.key(0), transformer, cfg)
  g = grad(l, base)
  assert jax.tree.structure(g) == jax.tree.structure(l)
  for p, pair in squeeze.lora_pairs(g).items():
    # ΔW = a b with b = 0: ∂/∂b = (x a)ᵀ g ≠ 0, ∂/∂a = xᵀ g bᵀ = 0 until b moves.
    assert np.abs(pair["b"]).max() > 0, p
    assert not np.any(pair["a"]), p
  l = jax.tree.map(lambda x, dx: x - 1.0 * dx, l, g)
  g = grad(l, base)
  for p, pair in squeeze.lora_pairs(g).items():
    assert np.abs(pair["a"]).max() > 0 and np.abs(pair["b"]).max() > 0, p


@pytest.mark.parametrize("cfg", [SEP, JOINT], ids=["separate", "joint_rank_mapping"])
def test_fused_equals_lora_and_unfuse_restores(tiny, cfg):
  transformer, base, tokens, base_forward = tiny
  l = _trained_like(transformer, cfg)
  out = lora_forward(transformer, cfg)(lora.merge_params(base, l), tokens)
  fused = lora_fuse.fuse(base, l, cfg)
  assert jax.tree.structure(fused) == jax.tree.structure(base)
  fused_out = base_forward(fused, tokens)
  base_out = base_forward(base, tokens)
  assert np.abs(np.asarray(out - base_out)).max() > 1e-2  # the adapters do something
  _close(out, fused_out)
  restored = lora_fuse.unfuse(fused, l, cfg)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
    np.testing.assert_allclose(x, y, atol=2e-6)


def test_separate_kv_equals_joint_with_block_structure(tiny):
  """Separate K/V adapters are the joint adapter with a block-diagonal (a_k | a_v), (b_k ⊕ b_v) of rank 2r."""
  transformer, base, _, _ = tiny
  sep_cfg = lora.LoRAConfig(rank=3, targets=("k", "v", "gate", "up"))
  joint_cfg = lora.LoRAConfig(rank=6, targets=("k", "v", "gate", "up"), joint_kv=True, joint_gate_up=True)
  sep = _trained_like(transformer, sep_cfg)
  joint = {}
  for i in range(transformer.config.num_layers):
    s = sep[f"layer_{i}"]
    joint[f"layer_{i}"] = {
        "attn": {"kv_lora": _block(s["attn"]["k_lora"], s["attn"]["v_lora"])},
        "mlp": {"gate_up_lora": _block(s["mlp"]["gate_lora"], s["mlp"]["up_lora"])},
    }
  for x, y in zip(
      jax.tree.leaves(lora_fuse.fuse(base, sep, sep_cfg)), jax.tree.leaves(lora_fuse.fuse(base, joint, joint_cfg))
  ):
    np.testing.assert_allclose(x, y, atol=1e-5)


def _block(p, q):
  """a = (a_p | a_q), b = [[b_p, 0], [0, b_q]] stacked on the joint axis: ΔW_joint = (ΔW_p, ΔW_q)."""
  zeros = jnp.zeros_like(p["b"])
  return {
      "a": jnp.concatenate([p["a"], q["a"]], -1),
      "b": jnp.concatenate([jnp.stack([p["b"], zeros], 1), jnp.stack([zeros, q["b"]], 1)], 0),
  }


def test_alpha_scale_is_applied_and_not_cached(tiny):
  """Same shapes, different alpha: the output must follow the scale (a stale nn.jit trace would not)."""
  transformer, base, tokens, base_forward = tiny
  l = _trained_like(transformer, SEP)
  out, out_alpha = (lora_forward(transformer, c)(lora.merge_params(base, l), tokens) for c in (SEP, SEP_ALPHA))
  assert SEP_ALPHA.scale(4) == 2.0
  doubled = jax.tree_util.tree_map_with_path(
      lambda path, x: 2.0 * x if jax.tree_util.keystr(path).endswith("['b']") else x, l
  )
  _close(out_alpha, base_forward(lora_fuse.fuse(base, doubled, SEP), tokens))
  _close(out_alpha, base_forward(lora_fuse.fuse(base, l, SEP_ALPHA), tokens))
  assert np.abs(np.asarray(out_alpha - out)).max() > 1e-2


def test_params_must_match_config(tiny):
  """Joint params under a separate config (or missing adapters) raise instead of being ignored."""
  transformer, base, tokens, _ = tiny
  joint = jax.eval_shape(lambda: lora.init_lora(jax.random.key(0), transformer, JOINT))
  model = lora.LoRA(model=transformer, config=SEP)
  with pytest.raises(ValueError, match=r"missing \['layer_0/attn/k_lora'.*unexpected \['layer_0/attn/kv_lora'"):
    jax.eval_shape(lambda p: model.apply({"params": p}, tokens), lora.merge_params(base, joint))
  with pytest.raises(ValueError, match="missing"):
    jax.eval_shape(lambda p: model.apply({"params": p}, tokens), base)


def test_bfloat16_base_float32_lora(tiny):
  transformer = _tiny_transformer(dtype=jnp.bfloat16)
  tokens = tiny[2]
  cfg = lora.LoRAConfig(rank=4)
  model = lora.LoRA(model=transformer, config=cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  base, l = lora.split_params(params)
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(l)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(lora.init_lora(jax.random.key(0), transformer, cfg))} == {
      jnp.dtype(jnp.float32)
  }
  # The float32 delta is cast to the activations' dtype: the output stays bfloat16.
  out = jax.eval_shape(lambda p: model.apply({"params": p}, tokens).logits, params)
  assert out.dtype == jnp.bfloat16
  fused = jax.eval_shape(lambda b, l: lora_fuse.fuse(b, l, cfg), base, l)
  assert jax.tree.map(lambda x: x.dtype, fused) == jax.tree.map(lambda x: x.dtype, base)


# --------------------------------------------------------------------------------------------------------
# Rank changes with the scale folded in.
# --------------------------------------------------------------------------------------------------------


def _effective_delta(l, cfg):
  """{path: scale · a @ b} in float64."""
  out = {}
  for p, pair in squeeze.lora_pairs(l).items():
    a, b = (np.asarray(x, np.float64) for x in squeeze.to_matrices(pair["a"], pair["b"]))
    out[p] = cfg.scale(a.shape[-1]) * a @ b
  return out


def _truncate(w, r):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_change_rank_folds_scale(tiny, alpha):
  transformer, base, tokens, base_forward = tiny
  cfg = lora.LoRAConfig(rank=4, alpha=alpha, targets=("q",))  # one squeeze shape group: few compiles
  l = _trained_like(transformer, cfg)
  before = _effective_delta(l, cfg)

  # Growing: ΔW is reproduced exactly, so the fused model and its output are unchanged.
  up, up_cfg = lora.change_rank(l, 6, cfg)
  assert up_cfg == lora.LoRAConfig(rank=6, alpha=alpha, targets=("q",))
  after = _effective_delta(up, up_cfg)
  for p in before:
    np.testing.assert_allclose(after[p], before[p], atol=1e-5 * np.abs(before[p]).max())
  _close(base_forward(lora_fuse.fuse(base, up, up_cfg), tokens), base_forward(lora_fuse.fuse(base, l, cfg), tokens))

  # Squeezing: the effective update is the optimal truncation of the old effective update.
  down, down_cfg = lora.change_rank(l, 2, cfg)
  shapes = lora_layout.lora_shapes(transformer, down_cfg)
  assert {p: (v["a"].shape, v["b"].shape) for p, v in squeeze.lora_pairs(down).items()} == shapes
  after = _effective_delta(down, down_cfg)
  for p in before:
    np.testing.assert_allclose(after[p], _truncate(before[p], 2), atol=1e-5 * np.abs(before[p]).max())


def test_change_rank_partial_mapping_keeps_other_modules(tiny):
  transformer = tiny[0]
  cfg = lora.LoRAConfig(rank=4, alpha=4.0, targets=("q", "down"))
  l = _trained_like(transformer, cfg)
  new, new_cfg = lora.change_rank(l, {"*/q_lora": 2}, cfg)
  assert new_cfg.rank == {
      "layer_0/attn/q_lora": 2,
      "layer_0/mlp/down_lora": 4,
      "layer_1/attn/q_lora": 2,
      "layer_1/mlp/down_lora": 4,
  }
  np.testing.assert_array_equal(new["layer_1"]["mlp"]["down_lora"]["a"], l["layer_1"]["mlp"]["down_lora"]["a"])
  assert lora.lora_ranks(new) == {p: s[0][-1] for p, s in lora_layout.lora_shapes(transformer, new_cfg).items()}


# --------------------------------------------------------------------------------------------------------
# Real Gemma 3 sizes, shapes only.
# --------------------------------------------------------------------------------------------------------


def _formula(cfg, rank, layers):
  d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = (d + n * h) + 2 * (d + k * h) + (n * h + d) + 2 * (d + f) + (f + d)
  return layers * rank * per_layer


@pytest.mark.parametrize("name,layers", [("Gemma3_270M", 18), ("Gemma3_1B", 26), ("Gemma3_12B", 48)])
def test_real_sizes_param_count(name, layers):
  transformer = getattr(gm.nn, name)()
  cfg = lora.LoRAConfig(rank=128)
  shapes = jax.eval_shape(lambda: lora.init_lora(jax.random.key(0), transformer, cfg))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert count == lora_layout.lora_param_count(transformer, cfg) == _formula(transformer.config, 128, layers)
  assert len(squeeze.lora_pairs(shapes)) == 7 * layers


def test_gemma3_4b_multimodal_no_lora_in_vision():
  transformer = gm.nn.Gemma3_4B(text_only=False)
  assert transformer.config.vision_encoder is not None
  cfg = lora.LoRAConfig(rank=128)
  model = lora.LoRA(model=transformer, config=cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  base, l = lora.split_params(params)
  assert "vision_encoder" in base and "mm_input_projection" in base["embedder"]
  assert set(l) == {f"layer_{i}" for i in range(34)}  # nothing under vision_encoder / embedder
  got = {p: (v["a"].shape, v["b"].shape) for p, v in squeeze.lora_pairs(l).items()}
  assert got == lora_layout.lora_shapes(transformer, cfg)
  count = sum(x.size for x in jax.tree.leaves(l))
  # 34 layers × 128 × Σ(in+out): q 2560+2048, k,v 2560+1024, o 2048+2560, gate,up,down 2560+10240.
  assert count == lora_layout.lora_param_count(transformer, cfg) == 34 * 128 * 54784 == 238_419_968
  assert {x.dtype for x in jax.tree.leaves(l)} == {jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(base["layer_0"])}


# --------------------------------------------------------------------------------------------------------
# The hand-written backward of the LoRA product (lora_matmul.lora_matmul).
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape,a_shape,b_shape",
    [
        ((2, 5, 6), (6, 3), (3, 4, 2)),  # q: BTD, (D, r), (r, N, H)
        ((2, 5, 4, 2), (4, 2, 3), (3, 6)),  # o: BTNH, (N, H, r), (r, D)
        ((2, 5, 6), (6, 1), (1, 2, 1, 2)),  # joint kv, rank 1
        ((7, 6), (6, 5), (5, 9)),  # 2-D, rank > in
    ],
)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_lora_delta_value_and_backward_equal_float64_formulas(x_shape, a_shape, b_shape, scale):
  """y = s (x a) b and its three gradients, against float64 numpy: gx = s g bᵀ aᵀ, ga = s xᵀ g bᵀ,
  gb = s (x a)ᵀ g (all flattened to matrices), on fresh random inputs."""
  rng = np.random.default_rng(sum(x_shape) + len(b_shape))
  x, a, b = (rng.standard_normal(s).astype(np.float32) for s in (x_shape, a_shape, b_shape))
  out_shape = x_shape[: len(x_shape) - (len(a_shape) - 1)] + b_shape[1:]
  g = rng.standard_normal(out_shape).astype(np.float32)
  y, vjp = jax.vjp(lambda x, a, b: lora_matmul.lora_delta(x, a, b, scale), x, a, b)
  gx, ga, gb = vjp(jnp.asarray(g))

  r = a_shape[-1]
  X = x.astype(np.float64).reshape(-1, math.prod(a_shape[:-1]))
  A, B = a.astype(np.float64).reshape(-1, r), b.astype(np.float64).reshape(r, -1)
  G = g.astype(np.float64).reshape(X.shape[0], -1)
  ref = {"y": scale * X @ A @ B, "gx": scale * G @ B.T @ A.T, "ga": scale * X.T @ G @ B.T, "gb": scale * (X @ A).T @ G}
  got = {"y": y, "gx": gx, "ga": ga, "gb": gb}
  shapes = {"y": out_shape, "gx": x_shape, "ga": a_shape, "gb": b_shape}
  for k in ref:
    assert got[k].shape == shapes[k], (k, got[k].shape)
    want = ref[k].reshape(shapes[k])
    err = np.linalg.norm(np.asarray(got[k], np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-6, (k, err)


@pytest.mark.parametrize(
    "cfg",
    [SEP_ALPHA, JOINT, lora.LoRAConfig(rank=2, targets=("k", "o", "up"))],
    ids=["separate_alpha", "joint_rank_mapping", "one_half_of_kv_and_gating"],
)
def test_model_gradient_with_hand_backward_equals_autodiff(tiny, cfg, monkeypatch):
  """The whole tiny model: loss and LoRA gradients (b != 0) are those of plain autodiff, for separate
  k/v and gate/up (stacked deltas), joint ones, and only one half of each pair (the other half zero)."""
  transformer, base, tokens, _ = tiny
  model = lora.LoRA(model=transformer, config=cfg)
  l = _trained_like(transformer, cfg)

  def loss(l):
    logits = model.apply({"params": lora.merge_params(base, l)}, tokens).logits
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * jnp.arange(tokens.shape[-1]))

  hand = jax.value_and_grad(loss)(l)
  monkeypatch.setattr(lora_matmul, "HAND_BACKWARD", False)
  auto = jax.value_and_grad(loss)(l)
  np.testing.assert_allclose(float(hand[0]), float(auto[0]), rtol=1e-6)
  flat_h, flat_a = jax.tree.leaves(hand[1]), jax.tree.leaves(auto[1])
  assert len(flat_h) == len(flat_a) and all(np.abs(x).max() > 0 for x in flat_a)
  for gh, ga in zip(flat_h, flat_a):
    err = np.linalg.norm(np.asarray(gh, np.float64) - ga) / np.linalg.norm(np.asarray(ga, np.float64))
    assert err < 1e-5, err
