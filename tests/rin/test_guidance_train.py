"""Classifier-free guidance in training (config.diffusion.cond_dropout) and in the sampling
API of rin.sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import diffusion
from rin import sampling, train_state, train_step
from rin.configs import base
from tests.rin.tiny import tiny_config


def _original_loss(params, model, config, batch, rng):
  """The loss as rin.train_step.loss_and_metrics computed it before cond_dropout existed."""
  d = config.diffusion
  apply = train_step.make_apply(model, None, dropout_rng=train_step.dropout_rng_impl(config),
                               chunks=train_step.batch_chunks(config, None))
  x0, labels = batch["image"], batch["label"]
  b = x0.shape[0]
  r_t, r_eps, r_keep, r_drop1, r_drop2 = jax.random.split(rng, 5)
  gamma = diffusion.get_schedule(d.train_schedule)(jax.random.uniform(r_t, (b,)))
  eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
  x_t = diffusion.add_noise(x0, eps, gamma)
  _, z = apply(params, x_t, gamma, labels, None, r_drop1)
  keep = jax.random.bernoulli(r_keep, d.self_cond_rate, (b, 1, 1))
  prev = jnp.where(keep, jax.lax.stop_gradient(z), 0.0).astype(z.dtype)
  pred, _ = apply(params, x_t, gamma, labels, prev, r_drop2)
  target = diffusion.training_target(d.target, x0, eps, gamma)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  cfg.model.update(dropout=0.2)        # dropout on: the dropout keys must not move either
  model = train_state.create_model(cfg)
  params = train_state.init_state(cfg, model, jax.random.PRNGKey(0)).params
  # A class token that matters: the class_dense kernel starts random already (xavier).
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1), minval=-1),
           "label": jnp.arange(16, dtype=jnp.int32) % 10}
  return cfg, model, params, batch


def _loss_and_grad(fn, params, batch):
  return jax.jit(jax.value_and_grad(lambda p: fn(p, batch, jax.random.PRNGKey(5))))(params)


def test_cond_dropout_zero_leaves_the_loss_bit_identical(setup):
  cfg, model, params, batch = setup
  want = _loss_and_grad(lambda p, b, r: _original_loss(p, model, cfg, b, r), params, batch)
  # A config saved before the option existed (completed with base's 0), then an explicit 0.
  saved = cfg.to_dict()
  del saved["diffusion"]["cond_dropout"]
  cfg.diffusion.cond_dropout = 0.0
  for c in (base.complete(saved), cfg):
    got = _loss_and_grad(lambda p, b, r: train_step.loss_and_metrics(p, model, c, b, r),
                         params, batch)
    assert float(got[0]) == float(want[0])
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


def test_cond_dropout_drops_labels_per_example(setup):
  cfg, model, params, batch = setup
  loss = lambda b: float(jax.jit(lambda p: train_step.loss_and_metrics(
      p, model, cfg, b, jax.random.PRNGKey(5)))(params))
  cfg.diffusion.cond_dropout = 0.0
  cond = loss(batch)
  uncond = loss(dict(batch, label=jnp.full_like(batch["label"], diffusion.NULL_LABEL)))
  cfg.diffusion.cond_dropout = 1.0 - 1e-7                # every label dropped
  assert loss(batch) == uncond
  cfg.diffusion.cond_dropout = 0.5                       # some labels dropped: neither
  half = loss(batch)
  assert half != cond and half != uncond
  cfg.diffusion.cond_dropout = 0.0
  assert cond != uncond


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_bad_cond_dropout_is_a_clear_error(setup, value):
  cfg, model, _, _ = setup
  # A fresh key takes any type (ConfigDict itself refuses a str for the base's float field).
  del cfg.diffusion["cond_dropout"]
  cfg.diffusion.cond_dropout = value
  try:
    with pytest.raises(ValueError, match="cond_dropout must be a number in"):
      train_step.make_train_step(model, cfg)
  finally:
    del cfg.diffusion["cond_dropout"]
    cfg.diffusion.cond_dropout = 0.0


def test_cond_dropout_needs_a_conditional_model():
  cfg = tiny_config()
  cfg.model.num_classes = 0
  cfg.diffusion.cond_dropout = 0.1
  with pytest.raises(ValueError, match="needs a class-conditional model"):
    train_step.check_cond_dropout(cfg)


def test_null_label_is_a_zero_one_hot(setup):
  """Label NULL_LABEL feeds the class Dense a zero one-hot (the authors' labels * 0): its
  kernel has no effect, only its bias, while a real label reads its kernel row."""
  cfg, model, params, _ = setup
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
  g = jnp.array([0.3, 0.7])
  other = jax.tree.map(lambda a: a, params)
  other["class_dense"] = dict(params["class_dense"],
                              kernel=params["class_dense"]["kernel"] * 3.0 + 1.0)
  run = lambda p, lab: model.apply({"params": p}, x, g, jnp.full((2,), lab, jnp.int32))[0]
  np.testing.assert_array_equal(run(params, diffusion.NULL_LABEL),
                                run(other, diffusion.NULL_LABEL))
  assert float(jnp.abs(run(params, 4) - run(other, 4)).max()) > 1e-4


def test_sample_fn_guidance_and_options(setup):
  cfg, model, params, _ = setup
  kw = dict(num_samples=3, num_steps=3, seed=1, sampler="dpmpp_2m")
  plain, _ = sampling.generate(cfg, params, model, **kw)
  zero, _ = sampling.generate(cfg, params, model, guidance=0.0, **kw)
  np.testing.assert_array_equal(zero, plain)
  guided, _ = sampling.generate(cfg, params, model, guidance=2.0, time_grid="logsnr",
                                  guidance_interval=(0.2, 0.9), **kw)
  assert guided.shape == plain.shape and np.all(np.abs(guided) <= 1)
  assert not np.allclose(guided, plain)
  with pytest.raises(TypeError, match="unknown sampling option"):
    sampling.make_sample_fn(model, cfg, guidence=1.0)
  uncond = tiny_config()
  uncond.model.num_classes = 0
  with pytest.raises(ValueError, match="guidance=1.0 needs a class-conditional model"):
    sampling.sample_options(uncond, guidance=1.0)


def test_authors_protocol():
  opts = sampling.protocol_options("authors")
  assert (opts["sampler"], opts["schedule"], opts["num_steps"], opts["guidance"]) == \
      ("ddpm", "cosine", 1000, 0.0)
  assert sampling.protocol_options("authors", 400)["num_steps"] == 400
  assert sampling.protocol_options("", 20) == {"num_steps": 20}
  cfg = tiny_config()
  cfg.eval.protocol = "authors"
  cfg.eval.protocol_steps = 400
  assert sampling.eval_sample_options(cfg, 20)["num_steps"] == 400
  with pytest.raises(ValueError, match="unknown evaluation protocol"):
    sampling.protocol_options("paper")
