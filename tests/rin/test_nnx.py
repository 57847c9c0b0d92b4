"""rin.nnx against the linen reference: same outputs from the same weights, the parameter
trees convert both ways unchanged, checkpoints of one load into the other, bad trees are
refused with the paths named."""
import numpy as np
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import rin
from rin import layers
from rin import nnx as rnnx
from tests.rin import tiny_video_config
from tests.rin.tiny import tiny_config

B, M, D, N, T = 2, 8, 32, 16, 16   # batch, latents, latent width, tokens, interface width


def assert_same(ref, got, rtol=1e-5):
  """float32 agreement at rounding level, relative to the output's scale."""
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    r, g = np.asarray(r), np.asarray(g)
    assert r.shape == g.shape and r.dtype == g.dtype, (r.shape, r.dtype, g.shape, g.dtype)
    scale = max(float(np.abs(r).max()), 1e-30)
    err = float(np.abs(r - g).max())
    assert err <= rtol * scale, f"max |linen - nnx| = {err:.3g} > {rtol} x scale {scale:.3g}"


def assert_identical_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def linen_tree(linen_module, *args, seed=0):
  """linen's parameter tree (paths, shapes, dtypes from its own init) holding random values:
  no parameter sits at its init constant (LN0's zero scale would hide self-conditioning),
  and no init program is compiled (eval_shape only traces)."""
  shapes = jax.eval_shape(linen_module.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(s):
    fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 4.0
    return jnp.asarray(rng.normal(size=s.shape).astype(s.dtype) / np.sqrt(fan_in))
  return jax.tree.map(fill, shapes)


def _z():
  return _normal(1, (B, M, D))


def _x():
  return _normal(2, (B, N, T))


# (linen layer, nnx constructor, inputs). The nnx layers take their input widths up front.
LAYERS = {
    "latent_self_attention": (
        lambda **kw: layers.LatentSelfAttention(num_heads=2, **kw),
        lambda rngs, **kw: rnnx.LatentSelfAttention(D, num_heads=2, rngs=rngs, **kw),
        lambda: (_z(),)),
    "read_block": (
        lambda **kw: layers.ReadBlock(num_heads=2, **kw),
        lambda rngs, **kw: rnnx.ReadBlock(D, T, num_heads=2, rngs=rngs, **kw),
        lambda: (_z(), _x())),
    "read_block_width_8": (
        lambda **kw: layers.ReadBlock(num_heads=2, width=8, **kw),
        lambda rngs, **kw: rnnx.ReadBlock(D, T, num_heads=2, width=8, rngs=rngs, **kw),
        lambda: (_z(), _x())),
    "write_block": (
        lambda **kw: layers.WriteBlock(num_heads=2, mlp_ratio=2.0, **kw),
        lambda rngs, **kw: rnnx.WriteBlock(T, D, num_heads=2, mlp_ratio=2.0, rngs=rngs, **kw),
        lambda: (_x(), _z())),
    "write_block_no_mlp": (
        lambda **kw: layers.WriteBlock(num_heads=2, mlp_ratio=0.0, **kw),
        lambda rngs, **kw: rnnx.WriteBlock(T, D, num_heads=2, mlp_ratio=0.0, rngs=rngs, **kw),
        lambda: (_x(), _z())),
    "rin_block": (
        lambda **kw: layers.RINBlock(latent_layers=2, latent_heads=2, rw_heads=2,
                                     latent_mlp_ratio=2.0, interface_mlp_ratio=2.0, **kw),
        lambda rngs, **kw: rnnx.RINBlock(D, T, latent_layers=2, latent_heads=2, rw_heads=2,
                                         latent_mlp_ratio=2.0, interface_mlp_ratio=2.0,
                                         rngs=rngs, **kw),
        lambda: (_z(), _x())),
}


# Both run eagerly: op by op, so the second reuses the first's per-op compilations (a
# jitted tiny RIN compiles for seconds on CPU) and both run the same primitives.
def _linen_call(linen_module, params, *args, **kw):
  return linen_module.apply({"params": params}, *args, **kw)


def _nnx_call(module, *args, **kw):
  return module(*args, **kw)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_same_outputs_from_linen_weights_and_back(name):
  make_linen, make_nnx, inputs = LAYERS[name]
  lin, args = make_linen(), inputs()
  params = linen_tree(lin, *args)
  # linen weights -> nnx
  net = rnnx.from_linen(lin, params)
  assert type(net).__name__ == type(lin).__name__
  assert_same(_linen_call(lin, params, *args), _nnx_call(net, *args))
  assert_identical_trees(rnnx.linen_params(net), params)
  # nnx's own init has linen's tree (shapes, dtypes) and runs in linen to the same numbers
  own = make_nnx(nnx.Rngs(3))
  lin2, params2 = rnnx.to_linen(own)
  assert lin2 == lin
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params2) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), params)
  assert_same(_linen_call(lin2, params2, *args), _nnx_call(own, *args))


def test_layer_kernel_implementation_is_passed_through():
  """The same switch reaches the ops: pallas_tpu in its interpreter matches linen's."""
  kw = dict(implementation="pallas_tpu", interpret=True)
  lin = layers.ReadBlock(num_heads=2, **kw)
  args = (_z(), _x())
  params = linen_tree(lin, *args)
  net = rnnx.from_linen(lin, params)
  assert net.config.implementation == "pallas_tpu" and net.config.interpret
  assert_same(_linen_call(lin, params, *args), net(*args))
  with pytest.raises(ValueError, match="implementation='flash_v9' is unknown"):
    rnnx.ReadBlock(D, T, num_heads=2, implementation="flash_v9", rngs=nnx.Rngs(0))(*args)


# ---------------------------------------------------------------------------------------
# Whole models.
# ---------------------------------------------------------------------------------------

def _image_setup(**overrides):
  m = dict(tiny_config().model, **overrides)
  lin = rin.RIN(**m)
  x = _normal(0, (B, m["image_size"], m["image_size"], m["channels"]))
  g = jnp.array([0.2, 0.7])
  labels = jnp.arange(B, dtype=jnp.int32) % m["num_classes"]
  args = (x, g, labels)
  return lin, linen_tree(lin, *args), args


def _video_setup(**overrides):
  m = dict(tiny_video_config.get_config().model.to_dict(), **overrides)
  lin = rin.VideoRIN(**m)
  frame = (m["image_size"], m["image_size"], m["channels"])
  x = _normal(0, (B, m["num_frames"] - m["cond_frames"]) + frame)
  cond = _normal(1, (B, m["cond_frames"]) + frame)
  args = (x, jnp.array([0.3, 0.8]), cond)
  return lin, linen_tree(lin, *args), args


@pytest.fixture(scope="module")
def image():
  return _image_setup()


@pytest.fixture(scope="module")
def nnx_born():
  """A RIN initialised by nnx itself (its own initialisers, as a user would start)."""
  return rnnx.RIN(rngs=nnx.Rngs(3), **tiny_config().model)


def _apply_both(lin, params, net, args, **kw):
  return _linen_call(lin, params, *args, **kw), _nnx_call(net, *args, **kw)


def test_rin_same_outputs_and_latents(image):
  lin, params, args = image
  net = rnnx.from_linen(lin, params)
  assert isinstance(net, rnnx.RIN) and net.config == lin
  ref, got = _apply_both(lin, params, net, args)
  assert_same(ref, got)
  # self-conditioning on the returned latents (LN0's scale is not zero in this tree)
  with_prev = _apply_both(lin, params, net, args + (ref[1],))
  assert float(jnp.abs(with_prev[0][0] - ref[0]).max()) > 1e-3
  assert_same(*with_prev)
  # train=True with dropout and drop_path at 0 is the same function
  assert_same(*_apply_both(lin, params, net, args, train=True))


def test_rin_bf16_compute_same_outputs():
  """bf16 compute too: the nnx LayerNorm keeps linen's float32 normalisation (see
  rin.nnx._layer_norm); with nnx's default promotion this differs by ~1% of the scale."""
  lin, params, args = _image_setup(dtype=jnp.bfloat16)
  assert_same(*_apply_both(lin, params, rnnx.from_linen(lin, params), args))


def test_rin_under_jit(image):
  lin, params, args = image
  net = rnnx.from_linen(lin, params)
  assert_same(_linen_call(lin, params, *args), nnx.jit(lambda n, *a: n(*a))(net, *args))


def test_nnx_initialised_weights_run_in_linen(nnx_born, image):
  lin, params, args = image
  lin2, own = rnnx.to_linen(nnx_born)
  assert lin2 == lin
  assert jax.tree.map(lambda a: (a.shape, a.dtype), own) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), params)
  # nnx's own init uses linen's initialisers: LN0 starts at zero, biases at zero, LN at one
  np.testing.assert_array_equal(own["self_cond_ln0"]["scale"], 0.0)
  np.testing.assert_array_equal(own["block_0"]["read"]["bq"], 0.0)
  np.testing.assert_array_equal(own["block_1"]["write"]["mlp_ln_scale"], 1.0)
  assert 0.015 < float(np.std(own["pos_latents"])) < 0.025           # truncated normal 0.02
  assert_same(_linen_call(lin2, own, *args), _nnx_call(nnx_born, *args))


def test_rin_round_trips_are_identical(image, nnx_born):
  lin, params, _ = image
  net = rnnx.from_linen(lin, params)
  lin2, back = rnnx.to_linen(net)
  assert lin2 == lin
  assert_identical_trees(back, params)                           # linen -> nnx -> linen
  again = rnnx.from_linen(*rnnx.to_linen(nnx_born))              # nnx -> linen -> nnx
  assert_identical_trees(rnnx.linen_params(again), rnnx.linen_params(nnx_born))
  assert nnx.graphdef(again) == nnx.graphdef(nnx_born)
  # the linen tree is nnx's own pure-dict form of the module's parameters
  assert_identical_trees(nnx.to_pure_dict(nnx.state(net, nnx.Param)), params)


@pytest.mark.parametrize("tape_pos_encoding", ["learned", "sin_cos_plus_learned"])
def test_video_rin_same_outputs(tape_pos_encoding):
  lin, params, args = _video_setup(tape_pos_encoding=tape_pos_encoding)
  if tape_pos_encoding != "learned":   # a nonzero residual, so both parts are exercised
    params = jax.tree.map(np.asarray, params)
    params["pos_interface"] = np.asarray(_normal(5, params["pos_interface"].shape)) * 0.1
  net = rnnx.from_linen(lin, params)
  assert isinstance(net, rnnx.VideoRIN) and net.config == lin
  assert_same(*_apply_both(lin, params, net, args))
  assert_identical_trees(rnnx.to_linen(net)[1], params)
  # nnx's own initialisation follows the encoding too (zero residual for sin-cos).
  born = rnnx.VideoRIN(rngs=nnx.Rngs(0), **dict(tiny_video_config.get_config().model.to_dict(),
                                                 tape_pos_encoding=tape_pos_encoding))
  pos = np.asarray(born.pos_interface[...])
  assert (np.abs(pos).max() == 0) == (tape_pos_encoding != "learned")


def test_train_mode_randomness(image):
  _, params, args = image
  lin = rin.RIN(**dict(tiny_config().model, dropout=0.2, drop_path=0.2))
  net = rnnx.from_linen(lin, params)
  a = net(*args, train=True, rngs=jax.random.key(0))
  b = net(*args, train=True, rngs=jax.random.key(0))
  c = net(*args, train=True, rngs=nnx.Rngs(dropout=1))             # an nnx.Rngs works too
  assert_identical_trees({"o": a[0]}, {"o": b[0]})                # a key fixes the masks
  assert float(jnp.abs(a[0] - c[0]).max()) > 1e-3                 # another key, other masks
  off = net(*args)                                                  # eval: no dropout
  assert_same(_linen_call(lin, params, *args), off)
  assert float(jnp.abs(a[0] - off[0]).max()) > 1e-3
  with pytest.raises(ValueError, match=r"train mode needs random numbers: pass rngs="):
    net(*args, train=True)


# ---------------------------------------------------------------------------------------
# Checkpoints. Outputs from identical trees are covered above; these check the trees.
# ---------------------------------------------------------------------------------------

def test_linen_checkpoint_loads_into_nnx_and_back(image, nnx_born, tmp_path):
  lin, params, _ = image
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "linen", {"params": params})       # a linen variables dict
  ckpt.wait_until_finished()
  net = rnnx.from_linen(lin, ckpt.restore(tmp_path / "linen"))
  assert_identical_trees(rnnx.linen_params(net), params)
  # nnx's checkpoint as a pure dict (linen_params == nnx.to_pure_dict of the Param state)
  ckpt.save(tmp_path / "nnx", rnnx.linen_params(nnx_born))
  ckpt.wait_until_finished()
  raw = ckpt.restore(tmp_path / "nnx")
  assert_identical_trees(raw, rnnx.linen_params(nnx_born))
  assert jax.tree.structure(raw) == jax.tree.structure(params)    # what linen's apply takes
  # nnx's own style (save nnx.state, restore into an abstract state) carries the same
  # values: restored into a module, they read out as the linen tree
  ckpt.save(tmp_path / "state", nnx.state(net, nnx.Param))
  ckpt.wait_until_finished()
  other = nnx.eval_shape(lambda: rnnx.RIN(rngs=nnx.Rngs(0), **tiny_config().model))
  nnx.update(other, ckpt.restore(tmp_path / "state", nnx.state(other, nnx.Param)))
  assert_identical_trees(rnnx.linen_params(other), params)


def test_npz_round_trip(image, nnx_born, tmp_path):
  _, params, _ = image
  flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
  np.savez(tmp_path / "p.npz", **flat)
  with np.load(tmp_path / "p.npz") as f:
    loaded = unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})
  net = nnx.clone(nnx_born)
  rnnx.load_linen_params(net, loaded)
  assert_identical_trees(rnnx.linen_params(net), params)


# ---------------------------------------------------------------------------------------
# Clear errors.
# ---------------------------------------------------------------------------------------

def test_wrong_trees_are_refused_with_the_paths_named(image):
  lin, params, args = image
  net = rnnx.from_linen(lin, params)
  before = rnnx.linen_params(net)
  flat = flatten_dict(params)

  missing = unflatten_dict({k: v for k, v in flat.items() if k != ("readout", "bias")})
  with pytest.raises(ValueError, match=r"missing 1: readout/bias.*another model config"):
    rnnx.load_linen_params(net, missing)
  extra = unflatten_dict({**flat, ("block_9", "read", "wq"): flat[("block_0", "read", "wq")]})
  with pytest.raises(ValueError, match=r"unexpected 1: block_9/read/wq"):
    rnnx.load_linen_params(net, extra)
  wrong = unflatten_dict({**flat, ("stem", "bias"): jnp.zeros((3,))})
  with pytest.raises(ValueError, match=r"stem/bias has shape \(3,\), the module \(16,\)"):
    rnnx.load_linen_params(net, wrong)
  not_array = unflatten_dict({**flat, ("stem", "bias"): [0.0] * 16})
  with pytest.raises(ValueError, match=r"stem/bias is a list, not an array"):
    rnnx.load_linen_params(net, not_array)
  with pytest.raises(TypeError, match="expected a nested dict of arrays"):
    rnnx.load_linen_params(net, [params])
  assert_identical_trees(rnnx.linen_params(net), before)     # nothing was changed

  # another config's tree (a bigger latent width) into this model
  other = rin.RIN(**dict(tiny_config().model, latent_dim=64))
  other_params = jax.eval_shape(lambda: other.init(jax.random.PRNGKey(0), *args))["params"]
  with pytest.raises(ValueError, match=r"parameter\(s\) do not fit: .*has shape"):
    rnnx.load_linen_params(net, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                             other_params))


def test_from_linen_and_constructor_errors(image):
  lin, params, _ = image
  with pytest.raises(TypeError, match="no nnx counterpart of MLP"):
    rnnx.from_linen(layers.MLP(2.0), {})
  with pytest.raises(ValueError, match="not a ReadBlock params tree"):
    rnnx.from_linen(layers.ReadBlock(num_heads=2), params)      # a whole model's tree
  with pytest.raises(TypeError, match="unexpected keyword argument 'latent_width'"):
    rnnx.RIN(rngs=nnx.Rngs(0), latent_width=3)
  with pytest.raises(ValueError, match="latent width 32 is not divisible by 3 heads"):
    rnnx.LatentSelfAttention(D, num_heads=3, rngs=nnx.Rngs(0))
  net = rnnx.from_linen(lin, params)
  x, g, labels = image[2]
  with pytest.raises(ValueError, match="images of shape .* do not fit this model"):
    net(x[:, :4], g, labels)                                     # linen's own input checks
