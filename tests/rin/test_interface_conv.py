"""The interface conv (conv_kernel_size / conv_dropout): the authors' DepthwiseConvBlock on
the image token grid, this project's space-time extension for video, off = today's model."""
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

import rin
from rin import checkpoint as ckpt_lib
from rin import layers
from rin import nnx as rnnx
from tests.rin import tiny_video_config
from tests.rin.test_nnx import assert_same, linen_tree
from tests.rin.tiny import tiny_config

G = jnp.array([0.2, 0.7])


def _image(**kw):
  m = dict(tiny_config().model.to_dict(), **kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  return rin.RIN(**m), (x, G, jnp.array([1, 2]))


def _video(**kw):
  # the model fields of the tiny video config as they were before the conv (the moving-digits
  # config now turns the conv and sin-cos positions on)
  m = dict(tiny_video_config.get_config().model.to_dict(), conv_kernel_size=0,
           tape_pos_encoding="learned")
  m.update(kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 8, 1))
  c = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8, 8, 1))
  return rin.VideoRIN(**m), (x, G, c)


def _tree_signature(tree):
  f = flatten_dict(tree)
  s = ";".join(f"{'/'.join(k)}:{tuple(v.shape)}" for k, v in sorted(f.items()))
  return hashlib.sha256(s.encode()).hexdigest()[:16], len(f)


# Pinned from the code before the conv existed (commit 2221a04), same script: the parameter
# paths and shapes, and the output of init at PRNGKey(0) on these inputs.
BEFORE = {"image": (("de362c4b12e0c97a", 120), 30.160690307617188, 145.87066650390625),
          "video": (("daba83d663f98372", 70), 32.51315689086914, 259.8028259277344)}


@pytest.mark.parametrize("kind", ["image", "video"])
def test_conv_off_is_the_model_before_the_option(kind):
  make = _image if kind == "image" else _video
  (sig, total, abs_total) = BEFORE[kind]
  default, args = make()
  off, _ = make(conv_kernel_size=0, conv_dropout=0.5)
  p_default = default.init(jax.random.PRNGKey(0), *args)["params"]
  p_off = off.init(jax.random.PRNGKey(0), *args)["params"]
  assert _tree_signature(p_off) == sig
  jax.tree.map(np.testing.assert_array_equal, p_off, p_default)
  out_default, z_default = default.apply({"params": p_default}, *args)
  out, z = off.apply({"params": p_off}, *args, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(out, out_default)
  np.testing.assert_array_equal(z, z_default)
  np.testing.assert_allclose(float(jnp.sum(out)), total, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(jnp.abs(out))), abs_total, rtol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_conv_on_adds_its_parameters_and_starts_near_identity(kind):
  make = _image if kind == "image" else _video
  off, args = make()
  on, _ = make(conv_kernel_size=3)
  p_off = off.init(jax.random.PRNGKey(0), *args)["params"]
  p_on = on.init(jax.random.PRNGKey(0), *args)["params"]
  f_off, f_on = flatten_dict(p_off), flatten_dict(p_on)
  added = set(f_on) - set(f_off)
  assert set(f_off) <= set(f_on)
  for k in f_off:                       # nothing else moves, init values included
    np.testing.assert_array_equal(f_on[k], f_off[k])
  blocks = {k[0] for k in added}
  assert blocks == {f"block_{i}" for i in range(on.num_blocks)}
  assert {k[1:] for k in added} == {("conv", n) for n in layers.CONV_PARAMS}
  dims = 3 if kind == "video" else 2
  assert f_on[("block_0", "conv", "depthwise_kernel")].shape == (3,) * dims + (1, 16)
  # the 1x1 conv starts at ~1e-10 scale: the block starts as the identity (to ~1e-9)
  out_off, _ = off.apply({"params": p_off}, *args)
  out_on, _ = on.apply({"params": p_on}, *args)
  assert float(jnp.abs(out_on - out_off).max()) < 1e-5 * float(jnp.abs(out_off).max())


# ---------------------------------------------------------------------------------------
# The 2-D block against a hand computation.
# ---------------------------------------------------------------------------------------

def _hand_block(x, p, rows, cols, groups):
  """numpy float64, written from the authors' block: depthwise k x k SAME (zero pad, bias)
  -> GroupNorm(groups, eps 1e-5, scale, bias) -> SiLU -> 1x1 conv -> + x; on the first
  rows*cols tokens; loops over places and offsets, no reshapes of the conv."""
  x = np.asarray(x, np.float64)
  b, n, c = x.shape
  k = p["depthwise_kernel"].shape[0]
  w = np.asarray(p["depthwise_kernel"], np.float64)[:, :, 0, :]
  grid = x[:, :rows * cols].reshape(b, rows, cols, c)
  h = np.zeros_like(grid)
  for i in range(rows):
    for j in range(cols):
      acc = np.array(p["depthwise_bias"], np.float64) + np.zeros((b, c))
      for di in range(k):
        for dj in range(k):
          ii, jj = i + di - k // 2, j + dj - k // 2
          if 0 <= ii < rows and 0 <= jj < cols:
            acc = acc + grid[:, ii, jj] * w[di, dj]
      h[:, i, j] = acc
  per = c // groups
  for bi in range(b):
    for g in range(groups):
      sl = h[bi, :, :, g * per:(g + 1) * per]
      h[bi, :, :, g * per:(g + 1) * per] = (sl - sl.mean()) / np.sqrt(sl.var() + 1e-5)
  h = h * np.asarray(p["norm_scale"], np.float64) + np.asarray(p["norm_bias"], np.float64)
  h = h / (1 + np.exp(-h))
  h = h @ np.asarray(p["pointwise_kernel"], np.float64) + np.asarray(p["pointwise_bias"])
  out = x.copy()
  out[:, :rows * cols] += h.reshape(b, rows * cols, c)
  return out


@pytest.mark.parametrize("kernel_size, channels", [(3, 8), (5, 12)])
def test_2d_block_matches_a_hand_computation(kernel_size, channels):
  rows = cols = 4
  x = jax.random.normal(jax.random.PRNGKey(0), (2, rows * cols + 3, channels)) * 2 + 0.5
  block = layers.InterfaceConv(kernel_size, (rows, cols, ()))
  init = block.init(jax.random.PRNGKey(1), x)["params"]
  # The authors' init: depthwise VarianceScaling(1, fan_avg, uniform) with Keras' fans of a
  # [k, k, C, 1] kernel; 1x1 conv VarianceScaling(1e-10, fan_avg, uniform); zero biases.
  dw_limit = math.sqrt(3.0 / ((channels + 1) * kernel_size ** 2 / 2))
  dw = np.abs(np.asarray(init["depthwise_kernel"]))
  assert dw.max() <= dw_limit and dw.max() > 0.8 * dw_limit
  pw = np.abs(np.asarray(init["pointwise_kernel"]))
  assert pw.max() <= math.sqrt(3e-10 / channels) and pw.max() > 0.5 * math.sqrt(3e-10 / channels)
  for name in ("depthwise_bias", "norm_bias", "pointwise_bias"):
    np.testing.assert_array_equal(init[name], 0.0)
  np.testing.assert_array_equal(init["norm_scale"], 1.0)
  # Random values everywhere (a ~0 pointwise conv would hide everything before it).
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32) * 0.5)
            for k, v in init.items()}
  out = np.asarray(block.apply({"params": params}, x))
  want = _hand_block(x, params, rows, cols, groups=min(channels // 4, 32))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  # tokens past the grid pass through bit-for-bit
  np.testing.assert_array_equal(out[:, rows * cols:], np.asarray(x)[:, rows * cols:])


def test_group_count_is_the_authors_rule():
  assert [layers.conv_groups(c) for c in (4, 8, 64, 96, 128, 256, 512)] == \
      [1, 2, 16, 24, 32, 32, 32]


def test_depthwise_conv_equals_lax_grouped_conv():
  """The sum of shifted copies against lax.conv_general_dilated(feature_group_count=C)."""
  for shape, k in (((2, 5, 6, 7), 3), ((2, 5, 6, 7), 5), ((2, 4, 3, 5, 6), 3),
                   ((1, 3, 4, 4, 5), 5)):
    c, d = shape[-1], len(shape) - 2
    g = jax.random.normal(jax.random.PRNGKey(0), shape)
    kern = jax.random.normal(jax.random.PRNGKey(1), (k,) * d + (1, c))
    bias = jax.random.normal(jax.random.PRNGKey(2), (c,))
    spatial = "DHW"[-d:] if d <= 3 else None
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    ref = jax.lax.conv_general_dilated(g, kern, (1,) * d, "SAME", dimension_numbers=dn,
                                       feature_group_count=c,
                                       precision=jax.lax.Precision.HIGHEST) + bias
    got = layers.depthwise_conv_same(g, kern, bias)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # its own VJP (flipped-kernel input gradient, one dot per offset for the kernel) against
    # autodiff of the lax conv
    ct = jax.random.normal(jax.random.PRNGKey(3), shape)
    lax_conv = lambda g, w: jax.lax.conv_general_dilated(
        g, w, (1,) * d, "SAME", dimension_numbers=dn, feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)
    want = jax.vjp(lax_conv, g, kern)[1](ct)
    have = jax.vjp(lambda g, w: layers.depthwise_conv_same(g, w, bias), g, kern)[1](ct)
    for w_, h_ in zip(want, have):
      np.testing.assert_allclose(h_, w_, rtol=1e-4, atol=1e-4 * float(jnp.abs(w_).max()))


# ---------------------------------------------------------------------------------------
# The video extension: one time axis, conditioning steps first.
# ---------------------------------------------------------------------------------------

def test_video_conv_layout_and_neighbourhoods():
  """Which tokens reach which through the depthwise conv of the video block: a token's
  update depends on the tokens within one step of it on the joint (time, row, col) grid
  whose time axis holds the conditioning steps, then the noisy steps. (GroupNorm statistics
  couple every token of the grid, so the dependence is read at the depthwise conv.)"""
  model, _ = _video(num_frames=10, cond_frames=4, image_size=12, patch_size=4)
  g, n_x, n_c = 3, 3, 2                # 6 noisy frames -> 3 steps, 4 conditioning -> 2
  layout = model._conv_layout()
  assert layout == (g, g, ((n_x * g * g, n_c), (0, n_x)))
  n = (n_x + n_c) * g * g
  assert model.num_patches == n

  def place(token):                    # tape token -> (joint time, row, col)
    step, r = divmod(token, g * g)
    t = n_c + step if step < n_x else step - n_x
    return t, r // g, r % g

  c = 2
  kern = jnp.ones((3, 3, 3, 1, c))

  def conv_on_tape(x):
    grid = layers.tape_to_grid(x, layout)
    return layers.add_grid_to_tape(jnp.zeros_like(x),
                                   layers.depthwise_conv_same(grid, kern, jnp.zeros(c)), layout)

  jac = jax.jacobian(conv_on_tape)(jnp.zeros((1, n, c)))[0, :, 0, 0, :, 0]   # [out, in]
  for i in range(n):
    for j in range(n):
      near = max(abs(a - b) for a, b in zip(place(i), place(j))) <= 1
      assert (float(jac[i, j]) != 0.0) == near, (i, place(i), j, place(j))
  # the last conditioning step neighbours the first noisy step: the first noisy token
  # (tape index 0) reads the last conditioning step's same place (tape index 27 + 9)
  assert float(jac[0, n_x * g * g + (n_c - 1) * g * g]) != 0.0
  # and the first conditioning step does not reach any noisy token
  assert float(jnp.abs(jac[:n_x * g * g, n_x * g * g:n_x * g * g + g * g]).max()) == 0.0


def test_video_without_conditioning_frames_has_one_segment():
  model, _ = _video(cond_frames=0)
  assert model._conv_layout() == (2, 2, ((0, 3),))


# ---------------------------------------------------------------------------------------
# linen / nnx parity.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["image", "video"])
def test_linen_and_nnx_give_the_same_outputs(kind):
  lin, args = (_image if kind == "image" else _video)(conv_kernel_size=3, conv_dropout=0.1)
  params = linen_tree(lin, *args)
  net = rnnx.from_linen(lin, params)
  assert_same(lin.apply({"params": params}, *args), net(*args))
  # train mode with conv dropout runs in both (masks differ by design: distribution only)
  out, _ = net(*args, train=True, rngs=jax.random.key(0))
  assert out.shape == args[0].shape
  # nnx's own init: the same tree and the authors' init scales
  m = dict((tiny_config() if kind == "image" else tiny_video_config.get_config()).model,
           conv_kernel_size=3, conv_dropout=0.1)
  born = (rnnx.RIN if kind == "image" else rnnx.VideoRIN)(rngs=nnx.Rngs(0), **m)
  own = rnnx.linen_params(born)
  assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, params)
  pw = np.abs(own["block_0"]["conv"]["pointwise_kernel"])
  assert 0 < pw.max() <= math.sqrt(3e-10 / 16)


# ---------------------------------------------------------------------------------------
# Errors and configs.
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [2, 4, -1, -3, 3.0, True])
def test_bad_kernel_sizes_are_refused(bad):
  lin, args = _image(conv_kernel_size=bad)
  with pytest.raises(ValueError, match=r"conv_kernel_size must be 0 \(no conv\) or an odd "
                                       r"integer >= 1"):
    lin.init(jax.random.PRNGKey(0), *args)
  with pytest.raises(ValueError, match="conv_kernel_size must be 0"):
    rnnx.RIN(rngs=nnx.Rngs(0), **dict(tiny_config().model, conv_kernel_size=bad))


def test_bad_dropout_and_widths_are_refused():
  lin, args = _video(conv_kernel_size=3, conv_dropout=1.0)
  with pytest.raises(ValueError, match=r"conv_dropout must lie in \[0, 1\), got 1.0"):
    lin.init(jax.random.PRNGKey(0), *args)
  lin, args = _image(conv_kernel_size=3, interface_dim=26, rw_heads=2)
  with pytest.raises(ValueError, match=r"min\(interface_dim // 4, 32\) groups.*"
                                       r"interface_dim=26 gives 6"):
    lin.init(jax.random.PRNGKey(0), *args)
  with pytest.raises(ValueError, match="square grid"):
    layers.RINBlock(conv_kernel_size=3, latent_layers=1, latent_heads=2, rw_heads=2).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 8)), jnp.zeros((1, 10, 8)))


def test_workdir_of_a_config_before_the_option_still_resumes(tmp_path):
  cfg = tiny_config()
  saved = json.loads(cfg.to_json())
  for k in ("conv_kernel_size", "conv_dropout"):
    del saved["model"][k]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  ckpt_lib.check_config_matches(str(tmp_path), cfg, write=False)      # no error
  cfg.model.conv_kernel_size = 3
  with pytest.raises(ValueError, match=r"model\.conv_kernel_size: checkpoint 0, config 3"):
    ckpt_lib.check_config_matches(str(tmp_path), cfg, write=False)


def test_lamb_trust_ratio_freezes_the_zero_started_1x1_conv_unless_excluded():
  """Under LAMB's trust ratio the 1x1 conv (init scale 1e-10) moves by ~lr of its own tiny
  norm per step; optim.lamb_exclude takes it out of the trust ratio (and weight decay)."""
  from rin.optim import decay_mask, make_optimizer
  cfg = tiny_config()
  cfg.model.conv_kernel_size = 3
  cfg.optim.update(warmup_steps=0, learning_rate=1e-2)
  model, args = _image(conv_kernel_size=3)
  params = model.init(jax.random.PRNGKey(0), *args)["params"]
  mask = decay_mask(params, ("conv/pointwise_kernel",))
  assert not mask["block_0"]["conv"]["pointwise_kernel"] and mask["block_0"]["conv"][
      "depthwise_kernel"] and mask["block_0"]["read"]["wq"]
  grads = jax.tree.map(jnp.ones_like, params)
  moved = {}
  for exclude in ((), ("conv/pointwise_kernel",)):
    cfg.optim.lamb_exclude = exclude
    tx = make_optimizer(cfg.optim, 100)
    p, s = params, tx.init(params)
    for _ in range(10):
      u, s = tx.update(grads, s, p)
      p = jax.tree.map(lambda a, b: a + b, p, u)
    moved[exclude] = float(jnp.abs(p["block_0"]["conv"]["pointwise_kernel"]).max())
  assert moved[()] < 1e-5                              # frozen near its ~1e-6 init
  assert moved[("conv/pointwise_kernel",)] > 0.05      # ~10 steps x lr 1e-2
