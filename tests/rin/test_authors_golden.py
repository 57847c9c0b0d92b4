"""Golden values recorded once from the authors' TensorFlow code (google-research/pix2seq @
eabd4e9; how: tests/data/README.md): forward pass, training loss and every gradient of a small
TAPE/RIN, their LR schedule, their attention-kernel init and their time embedding.

Tolerances (float32 rounding, per tensor):
- forward outputs and gradients: |ours - theirs| <= 1e-4 * max|theirs| per tensor (the
  tensor's own scale, no global floor). Measured: <= 3.6e-6 (forward), <= 3.3e-5 (gradients).
  Where that comes from: the time embedding's phase gamma*1000*freq rounds at ulp(1000) =
  6e-5 and the two codes form freq differently, so the embeddings differ by up to 6.5e-5
  (below); the authors' own float32 run is itself up to 1.2e-5 (of each tensor's max) from a
  float64 evaluation of the same network. 1e-4 is 3x the measured worst case; any structural
  difference (a head split, a missing LN or residual, a transposed kernel) is O(1).
- the key-projection biases' gradients are exactly zero in exact arithmetic (softmax is
  invariant to a per-query constant): both sides must be ~0 against the key kernels' scale.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import rin
from rin import diffusion, layers, optim
from rin import train_state, train_step
from rin.configs import base
from rin.model import timestep_embedding

GOLDEN = __file__.rsplit("/", 2)[0] + "/data/authors_golden_small.npz"
EPS32 = float(np.finfo(np.float32).eps)
FWD_BWD_TOL = 1e-4      # of each tensor's largest |value|; see the module docstring

# The small config the authors' ImageTapeDenoiser was built with (num_layers "2,1",
# latent_slots 6, latent_dim 36 -> time-embedding width 9 (odd), tape_dim 24, 8x8x3, patch 2,
# time_on_latent and cond_on_latent, self_cond "latent", no dropout).
SMALL = dict(image_size=8, channels=3, patch_size=2, num_latents=6, latent_dim=36,
             latent_heads=4, latent_mlp_ratio=2.0, num_blocks=2, latent_layers_per_block=(2, 1),
             interface_dim=24, interface_mlp_ratio=2.0, rw_heads=4, num_classes=10,
             self_cond_mlp_ratio=2.0, dropout=0.0, drop_path=0.0)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as d:
    return {k: d[k] for k in d.files}


def _params(golden):
  return unflatten_dict({tuple(k[len("param/"):].split("/")): jnp.asarray(v)
                         for k, v in golden.items() if k.startswith("param/")})


def _assert_close(ours, theirs, name, tol=FWD_BWD_TOL):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
  scale = np.max(np.abs(theirs))
  err = np.max(np.abs(ours - theirs))
  assert err <= tol * scale, f"{name}: max|diff| {err:.3g} > {tol:g} * max|theirs| ({scale:.3g})"


def test_golden_file_is_the_recorded_one(golden):
  assert str(golden["meta/authors_commit"]) == "eabd4e9"
  assert int(golden["cifar10/param_count"]) == 30_951_180
  ours = flatten_dict(jax.eval_shape(lambda: rin.RIN(**SMALL).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)),
      jnp.zeros((1,), jnp.int32)))["params"], sep="/")
  theirs = {k[len("param/"):]: v.shape for k, v in golden.items() if k.startswith("param/")}
  # The authors' 136 variables map one to one onto this model's parameter tree.
  assert {k: v.shape for k, v in ours.items()} == theirs


@pytest.mark.parametrize("tag", ["zero_prev", "nonzero_prev"])
def test_forward_matches_the_authors(golden, tag):
  model = rin.RIN(**SMALL)
  prev = golden["fwd/prev_latents"] * (tag == "nonzero_prev")
  pred, z = jax.jit(model.apply)({"params": _params(golden)}, golden["fwd/x_t"],
                                 golden["fwd/gamma"], golden["fwd/labels"], prev)
  _assert_close(pred, golden[f"fwd/{tag}/prediction"], f"{tag} prediction")
  _assert_close(z, golden[f"fwd/{tag}/latents"], f"{tag} latents")


def test_nonzero_previous_latents_matter(golden):
  # The recorded weights give self-conditioning's LN0 non-zero scale, so the two forward
  # cases really differ (otherwise the nonzero_prev case would test nothing new).
  a, b = golden["fwd/zero_prev/prediction"], golden["fwd/nonzero_prev/prediction"]
  assert np.max(np.abs(a - b)) > 0.1 * np.max(np.abs(a))


def _small_train_config():
  cfg = base.get_config()
  # latent_layers_per_block is an int field in base; a per-block tuple needs a fresh dict.
  cfg.model = ml_collections.ConfigDict(dict(cfg.model.to_dict(), **SMALL))
  cfg.diffusion.update(train_schedule="sigmoid@-3,3,0.9", target="eps", loss_type="eps",
                       self_cond_rate=0.9)
  return cfg


def test_training_loss_and_every_gradient_match_the_authors(golden, monkeypatch):
  """rin.train_step.loss_and_metrics (two passes, per-example self-conditioning mask, eps loss)
  with its t / noise / keep draws replaced by the ones the authors' noise_denoise was given."""
  cfg = _small_train_config()
  model = train_state.create_model(cfg)
  b, shape = golden["loss/t"].shape[0], golden["loss/eps"].shape
  real = {n: getattr(jax.random, n) for n in ("uniform", "normal", "bernoulli")}
  used = []

  # flax also calls initialisers (through eval_shape) to check parameter shapes: only the
  # loss's own draws, recognised by their shapes, are replaced.
  def uniform(key, s=(), *a, **k):
    if tuple(s) == (b,):
      used.append("t")
      return jnp.asarray(golden["loss/t"])
    return real["uniform"](key, s, *a, **k)

  def normal(key, s=(), *a, **k):
    if tuple(s) == shape:
      used.append("eps")
      return jnp.asarray(golden["loss/eps"])
    return real["normal"](key, s, *a, **k)

  def bernoulli(key, p=0.5, s=None):
    assert tuple(s) == (b, 1, 1) and p == pytest.approx(0.9), (p, s)
    used.append("keep")
    return jnp.asarray(golden["loss/self_cond_keep"] > 0.5).reshape(b, 1, 1)

  monkeypatch.setattr(jax.random, "uniform", uniform)
  monkeypatch.setattr(jax.random, "normal", normal)
  monkeypatch.setattr(jax.random, "bernoulli", bernoulli)
  batch = {"image": jnp.asarray(golden["loss/x0"]), "label": jnp.asarray(golden["loss/labels"])}
  loss, grads = jax.value_and_grad(train_step.loss_and_metrics)(
      _params(golden), model, cfg, batch, jax.random.PRNGKey(0))
  assert sorted(used) == ["eps", "keep", "t"]
  # A scalar: relative error only. Measured 8.5e-8; 16 eps32 leaves room for summation order.
  assert float(loss) == pytest.approx(float(golden["loss/loss"]), rel=16 * EPS32)

  flat = flatten_dict(grads, sep="/")
  assert set(flat) == {k[len("grad/"):] for k in golden if k.startswith("grad/")}
  for name, g in flat.items():
    ref = golden[f"grad/{name}"]
    if name.endswith("/bk") or name.endswith("/k/bias"):
      # Zero in exact arithmetic; both sides hold only rounding noise.
      k_scale = np.max(np.abs(golden[f"grad/{name[:-len('bk')]}wk" if name.endswith("bk")
                                     else f"grad/{name[:-len('bias')]}kernel"]))
      assert np.max(np.abs(ref)) < 1e-5 * k_scale and np.max(np.abs(g)) < 1e-5 * k_scale, name
      continue
    _assert_close(g, ref, f"grad {name}")


def test_train_schedule_gamma_matches_the_authors(golden):
  t = golden["gamma_schedule/t"]
  # float32 on both sides: the cosines' argument rounds at ~1 ulp, and |d gamma / d arg| <= 1,
  # so a few eps32 absolute (near gamma -> 0 the relative error of cos^2 grows; 3.7e-8 seen).
  for spec in ("cosine", "simple_linear", "sigmoid@-3,3,0.9", "cosine@0.2,1,1"):
    np.testing.assert_allclose(diffusion.get_schedule(spec)(jnp.asarray(t)),
                               golden[f"gamma_schedule/{spec}"], rtol=8 * EPS32, atol=4 * EPS32,
                               err_msg=spec)
  np.testing.assert_allclose(diffusion.get_schedule("sigmoid@-3,3,0.9")(golden["loss/t"]),
                             golden["loss/gamma"], rtol=8 * EPS32)


@pytest.mark.parametrize("case", ["small_cosine@0.8", "cifar10_cosine@0.8",
                                  "imagenet64_cosine@0.7"])
def test_learning_rate_schedule_matches_the_authors_warmup_and_decay(golden, case):
  base_lr, warmup, total, r = golden[f"lr/{case}/hparams"]
  cfg = ml_collections.ConfigDict(dict(learning_rate=base_lr, warmup_steps=int(warmup),
                                       decay_fraction=r, lr_schedule="cosine@r",
                                       end_lr_factor=0.0))
  fn = optim.learning_rate_schedule(cfg, int(total))
  steps, theirs = golden[f"lr/{case}/steps"], golden[f"lr/{case}/lr"]
  ours = np.array([float(fn(int(s))) for s in steps])
  # Both are float32 cosines of float32 arguments: the argument pi*step/decay_steps rounds at
  # ~1 ulp of pi, cos' slope <= 1, so |diff| <= a few eps32 * base_lr.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=8 * EPS32 * base_lr,
                             err_msg=f"{case} at steps {steps}")
  assert theirs[-1] > 0.09 * base_lr   # the authors' cosine@r does not end at 0


def test_attention_kernel_init_std_matches_keras_mha_at_cifar10_shapes(golden):
  names, stds = golden["cifar10/attn_names"], golden["cifar10/attn_std"]
  shapes, heads = golden["cifar10/attn_shapes"], golden["cifar10/attn_heads"]
  assert len(names) == 48
  key = jax.random.PRNGKey(7)
  for i, (name, std, shape, h) in enumerate(zip(names, stds, shapes, heads)):
    role = "out" if str(name).endswith(("/wo", "/out/kernel")) else "qkv"
    w = layers.attention_kernel_init("keras_mha", int(h), role)(
        jax.random.fold_in(key, i), tuple(int(s) for s in shape))
    n = int(np.prod(shape))
    # Two independent uniform samples of n values: the relative standard error of each std
    # estimate is sqrt((kurtosis - 1) / (4n)) = sqrt(0.2 / n) (kurtosis 1.8); 5 sigma of the
    # difference: 0.6-1.2% at these sizes (2-D xavier is 2.1-5.2x off).
    tol = 5 * math.sqrt(0.4 / n)
    assert float(jnp.std(w)) == pytest.approx(float(std), rel=tol), (str(name), role, tol)


@pytest.mark.parametrize("dim", [9, 7, 128])
def test_time_embedding_matches_the_authors(golden, dim):
  gamma = golden["time_emb/gamma"]
  theirs = golden[f"time_emb/dim{dim}"].astype(np.float64)
  ours = np.asarray(timestep_embedding(jnp.asarray(gamma), dim), np.float64)
  # Per value: the phase gamma*1000*freq rounds at ~1 ulp of itself on each side (and freq
  # is formed differently), sin/cos move by at most that; standardising divides by the std.
  phase = gamma.astype(np.float64) * 1000.0
  tol = np.broadcast_to(4 * EPS32 * (1.0 + phase[:, None]) / _raw_std(gamma, dim)[:, None],
                        theirs.shape)
  err = np.abs(ours - theirs)
  assert np.all(err <= tol), (f"dim {dim}: worst |diff| {err.max():.3g}, allowed there "
                              f"{tol.flat[np.argmax(err - tol)]:.3g} (gamma {gamma[np.argmax(err - tol) // dim]})")


def _raw_std(gamma, dim):
  """Std over features of the un-standardised sinusoid (the authors' formula, float64)."""
  i = np.arange(dim)
  ang = gamma.astype(np.float64)[:, None] * 1000.0 / np.power(1e4, 2 * (i // 2) / dim)[None]
  emb = np.concatenate([np.sin(ang[:, 0::2]), np.cos(ang[:, 1::2])], -1)
  return emb.std(-1)
