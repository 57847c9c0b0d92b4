import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rin
from rin import layers
from rin.configs import cifar10, digits, imagenet64
from tests.rin.tiny import tiny_config


def _inputs(cfg, b=2, seed=0):
  m = cfg.model
  k = jax.random.PRNGKey(seed)
  x = jax.random.normal(k, (b, m.image_size, m.image_size, m.channels))
  return x, jnp.linspace(0.1, 0.9, b), jnp.arange(b, dtype=jnp.int32) % m.num_classes


def _count(cfg):
  model = rin.RIN(**cfg.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_inputs(cfg)))
  return sum(v.size for v in jax.tree.leaves(shapes))


def test_cifar10_parameter_count_matches_published():
  n = _count(cifar10.get_config())
  assert abs(n - 30.95e6) / 30.95e6 < 0.005, n


def test_imagenet64_parameter_count():
  assert abs(_count(imagenet64.get_config()) - 157.8e6) / 157.8e6 < 0.005


def test_forward_shapes_and_latents():
  cfg = tiny_config()
  model = rin.RIN(**cfg.model)
  x, g, l = _inputs(cfg)
  params = model.init(jax.random.PRNGKey(0), x, g, l)
  out, z = model.apply(params, x, g, l)
  assert out.shape == x.shape
  assert z.shape == (2, cfg.model.num_latents, cfg.model.latent_dim)
  assert np.all(np.isfinite(out))


def test_self_conditioning_starts_at_zero_effect_then_matters():
  cfg = tiny_config()
  model = rin.RIN(**cfg.model)
  x, g, l = _inputs(cfg)
  params = model.init(jax.random.PRNGKey(0), x, g, l)
  prev = jax.random.normal(jax.random.PRNGKey(5), (2, cfg.model.num_latents, cfg.model.latent_dim))
  out0, _ = model.apply(params, x, g, l, None)
  out1, _ = model.apply(params, x, g, l, prev)
  # LN0 scale and bias start at 0: latents given or not, the output is the same.
  np.testing.assert_allclose(out0, out1, atol=1e-6)
  ln0 = params["params"]["self_cond_ln0"]
  assert np.all(ln0["scale"] == 0) and np.all(ln0["bias"] == 0)
  # Once LN0 is non-zero, the previous latents change the output.
  p2 = jax.tree.map(lambda a: a, params)
  p2["params"]["self_cond_ln0"] = {"scale": jnp.ones_like(ln0["scale"]), "bias": ln0["bias"]}
  out2, _ = model.apply(p2, x, g, l, prev)
  assert float(jnp.max(jnp.abs(out2 - out0))) > 1e-3


def test_class_label_changes_output():
  cfg = tiny_config()
  model = rin.RIN(**cfg.model)
  x, g, l = _inputs(cfg)
  params = model.init(jax.random.PRNGKey(0), x, g, l)
  a, _ = model.apply(params, x, g, l)
  b, _ = model.apply(params, x, g, (l + 1) % 10)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_dropout_and_drop_path_only_in_training():
  cfg = tiny_config()
  cfg.model.update(dropout=0.5, drop_path=0.5)
  model = rin.RIN(**cfg.model)
  x, g, l = _inputs(cfg)
  params = model.init(jax.random.PRNGKey(0), x, g, l)
  e1, _ = model.apply(params, x, g, l, train=False)
  e2, _ = model.apply(params, x, g, l, train=False)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = model.apply(params, x, g, l, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  t2, _ = model.apply(params, x, g, l, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-4


def test_blocks_do_not_share_weights_and_init():
  cfg = tiny_config()
  model = rin.RIN(**cfg.model)
  params = model.init(jax.random.PRNGKey(0), *_inputs(cfg))["params"]
  a, b = params["block_0"]["read"]["wq"], params["block_1"]["read"]["wq"]
  assert a.shape == b.shape and not np.allclose(a, b)
  assert np.all(params["block_0"]["read"]["bq"] == 0)    # biases start at zero
  # The authors' Keras-MHA init: q/k/v U(+-sqrt(6 / (D_in (H + hd)))), out U(+-sqrt(6 / (H (hd + D_out)))).
  h = cfg.model.rw_heads
  for name, role in (("wq", "qkv"), ("wk", "qkv"), ("wv", "qkv"), ("wo", "out")):
    w = np.asarray(params["block_0"]["read"][name])
    d_in, d_out = w.shape
    hd = (d_out if role == "qkv" else d_in) // h
    bound = np.sqrt(6.0 / (d_in * (h + hd) if role == "qkv" else h * (hd + d_out)))
    assert np.max(np.abs(w)) <= bound and np.max(np.abs(w)) > 0.5 * bound, name
  # Everything else: xavier-uniform bound sqrt(6/(fan_in+fan_out)).
  w1 = params["block_0"]["write"]["w1"]
  bound = np.sqrt(6.0 / sum(w1.shape))
  assert np.max(np.abs(w1)) <= bound and np.max(np.abs(w1)) > 0.5 * bound


@pytest.mark.parametrize("attention_init, q_std, out_std", [
    ("keras_mha", 0.00903, 0.0151),   # the authors' CIFAR-10 latent q (measured in their code)
    ("xavier", 0.0442, 0.0442)])
def test_attention_init_std_at_the_cifar10_latent_shape(attention_init, q_std, out_std):
  layer = rin.layers.LatentSelfAttention(num_heads=16, attention_init=attention_init)
  params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 512)))["params"]
  assert float(jnp.std(params["q"]["kernel"])) == pytest.approx(q_std, rel=0.02)
  assert float(jnp.std(params["out"]["kernel"])) == pytest.approx(out_std, rel=0.02)


def test_attention_init_refuses_unknown_names():
  with pytest.raises(ValueError, match="attention_init"):
    rin.layers.attention_kernel_init("he", 4, "qkv")


def test_time_embedding_matches_the_authors_positional_encoding_for_odd_and_even_widths():
  """transformers.positional_encoding: freq_i = 1e4^(-2 floor(i/2) / dim), sin(even) ++ cos(odd)."""
  from rin.model import timestep_embedding
  gamma = np.array([0.0, 0.3, 0.97])
  for dim in (7, 8, 33):
    i = np.arange(dim)
    ang = gamma[:, None] * 1000.0 / np.power(1e4, 2 * (i // 2) / dim)[None]
    emb = np.concatenate([np.sin(ang[:, 0::2]), np.cos(ang[:, 1::2])], -1)
    emb = (emb - emb.mean(-1, keepdims=True)) / (emb.std(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(gamma, jnp.float32), dim), emb,
                               atol=2e-4)


def test_interface_mlp_ratio_zero_skips_mlp():
  cfg = tiny_config()
  cfg.model.interface_mlp_ratio = 0.0
  model = rin.RIN(**cfg.model)
  params = model.init(jax.random.PRNGKey(0), *_inputs(cfg))["params"]
  assert "w1" not in params["block_0"]["write"]
  assert "wq" in params["block_0"]["write"]


def test_wrong_image_size_is_a_clear_error():
  cfg = tiny_config()
  model = rin.RIN(**cfg.model)
  x, g, l = _inputs(cfg)
  with pytest.raises(ValueError, match="do not fit this model"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((2, 10, 10, 1)), g, l)
  cfg.model.patch_size = 3
  with pytest.raises(ValueError, match="not divisible by patch_size=3"):
    rin.RIN(**cfg.model).init(jax.random.PRNGKey(0), x, g, l)


def test_missing_labels_is_a_clear_error():
  cfg = tiny_config()
  x, g, _ = _inputs(cfg)
  with pytest.raises(ValueError, match="labels must be given"):
    rin.RIN(**cfg.model).init(jax.random.PRNGKey(0), x, g, None)


def test_unknown_implementation_is_a_clear_error():
  cfg = tiny_config()
  with pytest.raises(ValueError, match="implementation='flash_v9' is unknown"):
    rin.RIN(**cfg.model, implementation="flash_v9").init(jax.random.PRNGKey(0), *_inputs(cfg))


def test_parameter_tree_is_independent_of_implementation():
  """Same tree whatever implementation name the layers are built with (shape-level)."""
  cfg = tiny_config()
  trees = []
  for impl in (None, "xla"):
    m = rin.RIN(**cfg.model, implementation=impl)
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), *_inputs(cfg)))
    trees.append(jax.tree.map(lambda s: (s.shape, s.dtype), shapes))
  assert trees[0] == trees[1]


def test_bf16_compute_returns_float32_so_carried_latents_keep_one_type():
  # Sampling feeds the latents back in: with bf16 compute they once came back bf16, so an
  # AOT-compiled step (bench.model) refused its own output on the next call.
  cfg = tiny_config()
  model = rin.RIN(**cfg.model, dtype=jnp.bfloat16)
  x, g, l = _inputs(cfg)
  params = model.init(jax.random.PRNGKey(0), x, g, l)
  z0 = jnp.zeros((2, cfg.model.num_latents, cfg.model.latent_dim), jnp.float32)
  step = jax.jit(lambda p, z: model.apply(p, x, g, l, z)).lower(params, z0).compile()
  out, z1 = step(params, z0)
  assert out.dtype == jnp.float32 and z1.dtype == jnp.float32
  out2, z2 = step(params, z1)               # the carried latents are accepted as they are
  assert z2.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out2)))


def test_patch_stem_is_the_strided_conv_it_replaces():
  """rin.model.PatchStem (a matmul, see its docstring) = nn.Conv(p x p, stride p, VALID):
  same parameter names, shapes and initial values, same outputs."""
  import flax.linen as nn
  from rin.model import PatchStem
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))
  stem = PatchStem(5, 2)
  conv = nn.Conv(5, (2, 2), strides=(2, 2), padding="VALID",
                 kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)
  p_stem, p_conv = stem.init(jax.random.PRNGKey(0), x), conv.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(p_stem) == jax.tree.structure(p_conv)
  jax.tree.map(np.testing.assert_array_equal, p_stem, p_conv)
  params = jax.tree.map(lambda a: a + 0.1, p_stem)       # a non-zero bias too
  np.testing.assert_allclose(stem.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 7, 33), (3, 1000)])   # odd and even element counts
def test_dropout_keeps_the_right_fraction_and_the_mean(shape):
  """layers.Dropout (hashed masks): keep rate = 1 - rate (to 2^-33), survivors scaled so the
  mean is preserved (also for bf16 inputs), identity when deterministic, a clear error for
  rate >= 1."""
  x = jnp.ones(shape, jnp.float32)
  rate = 0.1
  drop = layers.Dropout(rate)
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y) != 0
  k = round(0.9 * 2 ** 32) / 2 ** 32
  np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / k, rtol=1e-6)
  n = x.size
  assert abs(kept.mean() - k) < 4 * np.sqrt(k * (1 - k) / n)        # 4 sigma
  big = jnp.ones((256, 1024))
  yb = drop.apply({}, big, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  assert abs(float(yb.mean()) - 1.0) < 4 * np.sqrt((1 - k) / k / big.size)
  # Different keys, different masks; the same key, the same mask.
  y2 = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})
  assert not np.array_equal(np.asarray(y), np.asarray(y2))
  np.testing.assert_array_equal(
      y, drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  with pytest.raises(ValueError, match="dropout rate must lie in"):
    layers.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  # bf16 activations: the 1/k scale is applied in float32 (a bf16 1/0.9 is 1.109375).
  yh = drop.apply({}, x.astype(jnp.bfloat16), deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(0)})
  assert yh.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(yh, np.float32) != 0, kept)
  np.testing.assert_array_equal(np.asarray(yh, np.float32)[kept],
                                np.float32(jnp.bfloat16(1.0 / k)))


def test_counter_hash_bits_look_independent():
  """The dropout mask hash: uniform bits, no correlation between neighbouring elements (along
  either axis) or between two seeds, each checked at 5 sigma on 2^20 draws; seeds differing in
  one bit give unrelated streams; more than 2^32 elements is a clear error."""
  shape = (1024, 1024)
  n = shape[0] * shape[1]
  bits = np.asarray(layers.counter_hash_bits(jnp.array([1, 2], jnp.uint32), shape), np.uint64)
  u = bits.astype(np.float64) / 2 ** 32 - 0.5              # uniform on [-1/2, 1/2): var 1/12
  five_sigma = 5 * np.sqrt(1 / 12 / n)
  assert abs(u.mean()) < five_sigma
  per_bit = np.stack([(bits >> b) & 1 for b in range(32)]).reshape(32, -1).mean(axis=1)
  assert np.all(np.abs(per_bit - 0.5) < 5 * 0.5 / np.sqrt(n)), per_bit
  corr_limit = 5 / np.sqrt(n)                               # correlation of independent draws
  for a, b in [(u[:, 1:], u[:, :-1]), (u[1:], u[:-1])]:
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < corr_limit
  for other_seed in ([1, 3], [0, 2], [2, 2]):               # one bit away, and another
    v = np.asarray(layers.counter_hash_bits(jnp.array(other_seed, jnp.uint32), shape),
                   np.float64) / 2 ** 32 - 0.5
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < corr_limit
    assert np.mean(bits.astype(np.uint32) == (v + 0.5) * 2 ** 32) < 1e-4
  # Keep indicators at rate 0.1: neighbours kept together with probability k^2.
  keep = u < 0.4
  assert abs((keep[:, 1:] & keep[:, :-1]).mean() - 0.9 ** 2) < 5 * np.sqrt(0.81 * 0.19 / n)
  with pytest.raises(ValueError, match="at most 2\\^32 - 1 elements"):
    layers.counter_hash_bits(jnp.array([1, 2], jnp.uint32), (2 ** 16, 2 ** 16))
