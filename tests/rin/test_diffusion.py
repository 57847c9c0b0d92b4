import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import diffusion

T = np.linspace(0.0, 1.0, 101)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_cosine_closed_form():
  g = diffusion.get_schedule("cosine")(jnp.asarray(T))
  want = np.cos(((T + 2e-4) / (1 + 2.5e-4)) * math.pi / 2) ** 2
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_linear_closed_form():
  g = diffusion.get_schedule("linear")(jnp.asarray(T))
  np.testing.assert_allclose(g, np.maximum(1 - T, 1e-9), rtol=1e-6)
  assert float(g[-1]) == pytest.approx(1e-9)


@pytest.mark.parametrize("s,e,tau", [(-3, 3, 0.9), (0, 3, 0.3), (-3, 3, 1.1)])
def test_sigmoid_closed_form(s, e, tau):
  g = diffusion.get_schedule(f"sigmoid@{s},{e},{tau}")(jnp.asarray(T))
  want = (_sig(e / tau) - _sig((T * (e - s) + s) / tau)) / (_sig(e / tau) - _sig(s / tau))
  np.testing.assert_allclose(g, np.clip(want, 1e-9, 1), rtol=1e-5, atol=1e-6)
  assert g[0] == pytest.approx(1.0) and float(g[-1]) <= 1e-6
  assert np.all(np.diff(np.asarray(g)) <= 1e-7)  # monotone decreasing


@pytest.mark.parametrize("s,e,tau", [(0.2, 1, 1), (0.0, 1, 2), (0.2, 1, 3)])
def test_cosine_tau_closed_form(s, e, tau):
  g = diffusion.get_schedule(f"cosine@{s},{e},{tau}")(jnp.asarray(T))
  c = lambda u: np.cos(u * math.pi / 2) ** (2 * tau)
  want = (c(T * (e - s) + s) - c(e)) / (c(s) - c(e))
  np.testing.assert_allclose(g, np.clip(want, 1e-9, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["sigmoid", "cosine@1,2", "quadratic", "sigmoid@a,b,c",
                                  "sigmoid@3,-3,0.9"])
def test_unknown_or_malformed_schedule_is_a_clear_error(spec):
  with pytest.raises(ValueError, match="schedule"):
    diffusion.get_schedule(spec)


@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_targets_invert_exactly(target):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.uniform(k1, (4, 8, 8, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  gamma = jnp.array([0.01, 0.3, 0.7, 0.99])
  x_t = diffusion.add_noise(x0, eps, gamma)
  pred = diffusion.training_target(target, x0, eps, gamma)
  x0_hat, eps_hat = diffusion.prediction_to_x0_eps(target, pred, x_t, gamma)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_unknown_target_and_sampler():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="target"):
    diffusion.training_target("score", x, x, jnp.ones((1,)))
  with pytest.raises(ValueError, match="sampler"):
    diffusion.sample(lambda *a: None, jax.random.PRNGKey(0), (1, 2, 2, 1), num_steps=2,
                     sampler="euler", latent_shape=(1, 2, 2))


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_oracle_denoiser_recovers_data(sampler):
  """With an exact eps predictor for a single known x0, both samplers return x0."""
  x0 = jnp.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)

  def denoise(x_t, gamma, z):
    g = gamma.reshape(-1, 1, 1, 1)
    eps = (x_t - jnp.sqrt(g) * x0) / jnp.sqrt(1 - g)
    return eps, z + 1.0   # latents carried and updated

  out = diffusion.sample(denoise, jax.random.PRNGKey(1), (1, 4, 4, 1), num_steps=10,
                         sampler=sampler, latent_shape=(1, 3, 2))
  np.testing.assert_allclose(out, x0, atol=1e-4)
