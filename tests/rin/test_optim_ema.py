"""The optimiser update and the EMA: against the authors' LAMB itself (recorded, see
tests/data/README.md) and against a hand computation over a few steps.

The hand LAMB is float64 numpy written from tensorflow_addons' LAMB (tensorflow/addons
@ d208d752, tensorflow_addons/optimizers/lamb.py `_resource_apply_dense`), which the
authors' models/model_utils.py builds as `tfa.optimizers.LAMB(lr, weight_decay_rate,
beta_1, beta_2, epsilon, exclude_from_weight_decay="bias,beta,gamma".split(","))`; with
exclude_from_layer_adaptation unset, tfa uses the same patterns for the trust ratio:

  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  t = the update count (1 first)
  u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) [+ wd * w, unless excluded]
  ratio = ||w|| / ||u|| when both norms are > 0, else 1 [1 if excluded]
  w = w - lr(t - 1) * ratio * u

"excluded": re.search of "bias", "beta" (a LayerNorm's offset) or "gamma" (its scale) in the
Keras variable name. The recorded numbers check the hand LAMB as well, so the hand checks
(gradient clipping, the train step) stand on it. The EMA is theirs
(image_diffusion_model.Trainer.train_step): after the optimiser step,
ema = decay * ema + (1 - decay) * w, no warm-up of the decay. Where they differ on purpose
(README): ours starts as a copy of the initial weights, theirs from the EMA network's own
random init.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from rin import optim, train_state, train_step
from rin.configs import base

AUTHORS_EXCLUDE = ("bias", "beta", "gamma")
# float32 (optax) against float64 (hand). Adam's bias correction 1 - b2^t is a difference of
# nearly equal float32 numbers: at t = 2, 1 - 0.999^2 = 2e-3 carries up to ulp(1) / 2e-3 = 3e-5
# relative error, 1.5e-5 after the square root; it shows where no trust ratio rescales the
# update (biases, LayerNorm, a zero-initialised kernel): measured 1.0e-5. Wrong terms are
# O(1e-2) or more.
RTOL, ATOL = 5e-5, 1e-7


# A small tree with the model's kinds of leaves, each with the Keras name the authors' variable
# of that kind has (what their exclusion rule reads).
SHAPES = {
    ("dense", "kernel"): ((4, 3), "dense/kernel"),
    ("dense", "bias"): ((3,), "dense/bias"),
    ("block_0", "read", "wq"): ((3, 6), "cross_mha/query/kernel"),
    ("block_0", "read", "bq"): ((6,), "cross_mha/query/bias"),
    ("block_0", "read", "ln_scale"): ((3,), "cross_mha/ln/gamma"),
    ("block_0", "read", "ln_bias"): ((3,), "cross_mha/ln/beta"),
    ("stem", "kernel"): ((2, 2, 1, 3), "stem/kernel"),
    ("pos_latents",): ((5, 3), "latent_pos_embedding"),
    ("zero_init", "kernel"): ((3, 3), "zero_init/kernel"),      # ||w|| = 0: ratio 1
}


def _params(seed=0):
  rs = np.random.default_rng(seed)
  flat = {}
  for path, (shape, _) in SHAPES.items():
    flat[path] = np.zeros(shape) if path[0] == "zero_init" else rs.normal(size=shape)
  return flat


def _unflatten(flat):
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = jnp.asarray(v, jnp.float32)
  return out


def _flat(tree):
  return {k: np.asarray(v, np.float64) for k, v in flatten_dict(tree).items()}


def _lr(step, base_lr, warmup, total, r):
  """The authors' WarmUpAndDecay with "cosine@r" (golden-tested in test_authors_golden)."""
  if step < warmup:
    return base_lr * step / warmup
  decay_steps = (total - warmup) / r
  frac = min(step - warmup, decay_steps) / decay_steps
  return base_lr * 0.5 * (1 + math.cos(math.pi * frac))


class HandLamb:
  """tensorflow_addons' LAMB (module docstring) in float64, with optional global-norm
  clipping in front (this project's grad_clip; the authors' LAMB has none)."""

  def __init__(self, o, total):
    self.o, self.total, self.t = o, total, 0
    self.m, self.v = {}, {}

  def step(self, params, grads):
    o = self.o
    if o.grad_clip > 0:
      norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
      grads = {k: g * min(1.0, o.grad_clip / norm) for k, g in grads.items()}
    lr = _lr(self.t, o.learning_rate, o.warmup_steps, self.total, o.decay_fraction)
    self.t += 1
    new = {}
    for k, w in params.items():
      g = grads[k]
      m = o.b1 * self.m.get(k, 0.0) + (1 - o.b1) * g
      v = o.b2 * self.v.get(k, 0.0) + (1 - o.b2) * g * g
      self.m[k], self.v[k] = m, v
      u = (m / (1 - o.b1 ** self.t)) / (np.sqrt(v / (1 - o.b2 ** self.t)) + o.eps)
      excluded = any(re.search(r, SHAPES[k][1]) for r in AUTHORS_EXCLUDE)
      ratio = 1.0
      if not excluded:
        u = u + o.weight_decay * w
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
      new[k] = w - lr * ratio * u
    return new


# A leaf whose gradients are ~1e-7, the size of Adam's epsilon (1e-8): there the update
# depends on where epsilon goes (sqrt(v) + eps, not sqrt(v + eps)).
TINY = {("block_0", "read", "bq"): 1e-7}


def _grads(params, k):
  """A different, leaf-dependent gradient each step (also what _quadratic_loss yields)."""
  return {p: TINY.get(p, 1.0) * (2.0 * (0.5 + 0.1 * k) * w
                                 + np.cos(np.arange(w.size).reshape(w.shape) + k + i))
          for i, (p, w) in enumerate(sorted(params.items()))}


def _config(**optim):
  cfg = base.get_config()
  cfg.optim.update(dict(dict(learning_rate=0.05, warmup_steps=2, decay_fraction=0.8,
                             weight_decay=0.1, ema_decay=0.9), **optim))
  cfg.train.update(num_steps=10, batch_chunks=1)
  return cfg


@pytest.mark.parametrize("grad_clip", [0.0, 1.5])
def test_lamb_update_matches_the_hand_lamb(grad_clip):
  cfg = _config(grad_clip=grad_clip)
  tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
  flat = _params()
  params = _unflatten(flat)
  state = tx.init(params)
  hand = HandLamb(cfg.optim, cfg.train.num_steps)
  update = jax.jit(tx.update)
  for k in range(4):     # warm-up (lr 0, then half) and two cosine steps
    g = _grads(flat, k)
    updates, state = update(_unflatten(g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    flat = hand.step(flat, g)
    for path, want in flat.items():
      np.testing.assert_allclose(_flat(params)[path], want, rtol=RTOL, atol=ATOL,
                                 err_msg=f"step {k} {path}")


def _authors_lamb():
  with np.load(__file__.rsplit("/", 2)[0] + "/data/authors_golden_lamb.npz") as d:
    return {k: d[k] for k in d.files}


def test_lamb_matches_the_authors_tfa_lamb():
  """make_optimizer against the authors' optimiser itself (model_utils.build_optimizer:
  tensorflow_addons LAMB, WarmUpAndDecay cosine@0.8, exclusion "bias,beta,gamma"), recorded
  over five steps (tests/data/README.md), from their initial weights and gradients; and the
  hand LAMB above against the same numbers, so the hand checks below are checked too."""
  gold = _authors_lamb()
  assert str(gold["meta/authors_commit"]) == "eabd4e9"
  base_lr, warmup, total, r, wd, b1, b2, eps, steps = gold["lamb/hparams"]
  cfg = _config(learning_rate=float(base_lr), warmup_steps=int(warmup), decay_fraction=float(r),
                weight_decay=float(wd), b1=float(b1), b2=float(b2), eps=float(eps))
  cfg.train.num_steps = int(total)
  paths = [tuple(p.split("/")) for p in gold["lamb/paths"]]
  names = dict(zip(paths, (str(n) for n in gold["lamb/keras_names"])))
  assert names == {p: SHAPES[p][1] + ":0" for p in SHAPES}
  key = lambda kind, p: f"lamb/{kind}/" + "/".join(p)
  flat = {p: gold[key("init", p)].astype(np.float64) for p in paths}
  params = _unflatten(flat)
  tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
  state, update = tx.init(params), jax.jit(tx.update)
  hand = HandLamb(cfg.optim, cfg.train.num_steps)
  for k in range(int(steps)):
    g = {p: gold[key(f"grad{k}", p)].astype(np.float64) for p in paths}
    updates, state = update(_unflatten(g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    flat = hand.step(flat, g)
    for p in paths:
      theirs = gold[key(f"param{k}", p)]
      np.testing.assert_allclose(_flat(params)[p], theirs, rtol=RTOL, atol=ATOL,
                                 err_msg=f"ours, step {k} {p}")
      np.testing.assert_allclose(flat[p], theirs, rtol=RTOL, atol=ATOL,
                                 err_msg=f"hand LAMB, step {k} {p}")


def test_decay_mask_is_the_authors_name_rule_on_their_model():
  """On the authors' small model's 136 tensors (their names mapped as tests/data/README.md
  says): this project's mask (every >1-D tensor) excludes exactly the tensors whose Keras
  names contain "bias", "beta" or "gamma"."""
  with np.load(__file__.rsplit("/", 2)[0] + "/data/authors_golden_small.npz") as d:
    paths = {tuple(k[len("param/"):].split("/")): d[k] for k in d.files
             if k.startswith("param/")}

  def keras_name(path):
    leaf = path[-1]
    if leaf in ("scale", "ln_scale", "mlp_ln_scale"):
      return "/".join(path[:-1]) + "/layer_norm/gamma"
    if leaf in ("ln_bias", "mlp_ln_bias") or (leaf == "bias" and "ln" in path[-2]):
      return "/".join(path[:-1]) + "/layer_norm/beta"
    if leaf == "bias" or re.fullmatch(r"b[12qkvo]", leaf):
      return "/".join(path[:-1]) + "/dense/bias"
    return "/".join(path)       # kernels and the learned position embeddings

  assert len(paths) == 136
  mask = flatten_dict(optim.decay_mask({"/".join(p): v for p, v in paths.items()}))
  for p in paths:
    authors_excluded = any(r in keras_name(p) for r in AUTHORS_EXCLUDE)
    assert mask[("/".join(p),)] == (not authors_excluded), p


class _FakeModel:
  """init_state only calls model.init; the loss below never calls the model."""

  def init(self, rng, *inputs):
    del rng, inputs
    return {"params": _unflatten(_params())}


def _quadratic_loss(params, model, config, batch, rng, *, mesh=None):
  """sum_leaves (0.5 + 0.1 k) ||w||^2 + <cos(...), w>: gradient _grads(params, k), k =
  batch["k"]; NaN when batch["nan"]."""
  del model, config, rng, mesh
  k = batch["k"]
  total = 0.0
  for i, (path, w) in enumerate(sorted(flatten_dict(params).items())):
    c = jnp.cos(jnp.arange(w.size, dtype=jnp.float32).reshape(w.shape) + k + i)
    total = total + TINY.get(path, 1.0) * ((0.5 + 0.1 * k) * jnp.sum(w * w) + jnp.sum(c * w))
  return jnp.where(batch["nan"], jnp.nan, total)


def test_train_step_ema_follows_the_hand_computation(monkeypatch):
  """init_state's EMA is a copy of the initial weights; each step applies LAMB, then
  ema = d ema + (1 - d) w_new (no decay warm-up); a skipped non-finite step changes
  neither."""
  monkeypatch.setattr(train_step, "loss_and_metrics", _quadratic_loss)
  cfg = _config()
  cfg.train.nonfinite = "skip"
  monkeypatch.setattr(train_state, "dummy_inputs", lambda config, batch=1: ())
  state = train_state.init_state(cfg, _FakeModel(), jax.random.PRNGKey(0))
  flat = _flat(state.params)
  assert _flat(state.ema_params).keys() == flat.keys()
  for path in flat:
    np.testing.assert_array_equal(_flat(state.ema_params)[path], flat[path])
  step = jax.jit(train_step.make_train_step(None, cfg))
  hand = HandLamb(cfg.optim, cfg.train.num_steps)
  ema, d = dict(flat), cfg.optim.ema_decay
  for k in range(4):
    skip = k == 2
    state, metrics = step(state, {"k": jnp.float32(k), "nan": jnp.bool_(skip)})
    assert int(state.step) == k + 1 and bool(metrics["finite"]) == (not skip)
    if not skip:
      flat = hand.step(flat, _grads(flat, k))
      ema = {p: d * ema[p] + (1 - d) * flat[p] for p in flat}
    for path in flat:
      np.testing.assert_allclose(_flat(state.params)[path], flat[path], rtol=RTOL, atol=ATOL,
                                 err_msg=f"step {k} weights {path}")
      np.testing.assert_allclose(_flat(state.ema_params)[path], ema[path], rtol=RTOL,
                                 atol=ATOL, err_msg=f"step {k} EMA {path}")
