"""DPM-Solver++(2M) (which the authors' code lacks) against its published formula: Lu et al.
2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2 (multistep second order, data prediction), in the paper's notation:

  lambda = log(alpha / sigma), alpha = sqrt(gamma), sigma = sqrt(1 - gamma),
  h_i = lambda_i - lambda_{i-1},  r_i = h_{i-1} / h_i,
  D_i = (1 + 1/(2 r_i)) x0(x_{i-1}) - 1/(2 r_i) x0(x_{i-2}),
  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
  the first step with D_1 = x0(x_0) (DPM-Solver++(1), i.e. DDIM).

Here written from the paper, in float64 numpy, independently of rin.diffusion's expression
(h / (2 h_last), expm1); the Gaussian closed-form convergence test is in test_sampling.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import diffusion


def _paper_step(x, d_now, d_prev, g_prev, g_now, g_next, first):
  """Algorithm 2's update from g_now to g_next, float64 (g_prev: the step before)."""
  a_n, s_n = np.sqrt(g_next), np.sqrt(1 - g_next)
  lam = lambda g: np.log(np.sqrt(g) / np.sqrt(1 - g))
  h = lam(g_next) - lam(g_now)
  if first:
    d = d_now
  else:
    r = (lam(g_now) - lam(g_prev)) / h
    d = (1 + 1 / (2 * r)) * d_now - 1 / (2 * r) * d_prev
  return s_n / np.sqrt(1 - g_now) * x - a_n * (np.exp(-h) - 1) * d


def test_one_step_is_the_papers_formula_in_float64():
  rs = np.random.default_rng(0)
  x, x0, x0p = (rs.normal(size=(3, 4)) for _ in range(3))
  gp = np.array([0.02, 0.1, 0.3])
  g = np.array([0.05, 0.4, 0.5])
  gn = np.array([0.3, 0.7, 0.99])
  with jax.enable_x64(True):
    for first in (False, True):
      got = diffusion.dpmpp_2m_step(jnp.asarray(x), jnp.asarray(x0), jnp.asarray(x0p),
                                    jnp.asarray(g), jnp.asarray(gn), jnp.asarray(gp),
                                    jnp.bool_(first))
      assert got.dtype == jnp.float64
      want = _paper_step(x, x0, x0p, gp[:, None], g[:, None], gn[:, None], first)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


W = np.random.default_rng(1).normal(size=(16, 16)) * 0.4


def _toy_np(x, g, z):
  """A nonlinear x0 denoiser reading and updating its latents (float64 numpy)."""
  b = x.shape[0]
  h = np.tanh(x.reshape(b, -1) @ W + z.mean((1, 2))[:, None] + g[:, None])
  return 0.8 * h.reshape(x.shape), 0.5 * z + h.mean(-1)[:, None, None]


def _toy_jax(x, g, z):
  b = x.shape[0]
  h = jnp.tanh(x.reshape(b, -1) @ jnp.asarray(W, jnp.float32) + z.mean((1, 2))[:, None]
               + g[:, None])
  return 0.8 * h.reshape(x.shape), 0.5 * z + h.mean(-1)[:, None, None]


@pytest.mark.parametrize("grid,schedule,n", [("uniform", "cosine", 6),
                                             ("logsnr", "cosine", 6),
                                             ("uniform", "sigmoid@-3,3,0.9", 4)])
def test_sample_walks_algorithm_2(grid, schedule, n):
  """diffusion.sample(sampler="dpmpp_2m") against Algorithm 2 run by hand in float64 on the
  same toy (carried latents included), from the same x_T over the gammas the sampler
  visits: every intermediate x and the returned x0."""
  shape, lat = (2, 4, 4, 1), (2, 3, 5)
  rng = jax.random.PRNGKey(3)
  seen = []

  def denoise(x, g, z):
    jax.debug.callback(lambda *a: seen.append([np.asarray(v, np.float64) for v in a]),
                       x, g, z, ordered=True)
    return _toy_jax(x, g, z)

  out = diffusion.sample(denoise, rng, shape, num_steps=n, sampler="dpmpp_2m", target="x0",
                         schedule=schedule, latent_shape=lat, time_grid=grid, clip_x0=False)
  jax.effects_barrier()
  assert len(seen) == n
  gammas = [s[1][0] for s in seen]
  x = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)
  z = np.zeros(lat)
  d_prev = None
  for i in range(n):
    np.testing.assert_allclose(seen[i][0], x, rtol=0, atol=2e-5, err_msg=f"x at step {i}")
    d_now, z = _toy_np(x, np.full(shape[0], gammas[i]), z)
    if i + 1 < n:
      x = _paper_step(x, d_now, d_prev, gammas[i - 1] if i else None, gammas[i],
                      gammas[i + 1], first=(i == 0))
    d_prev = d_now
  np.testing.assert_allclose(np.asarray(out), d_now, rtol=0, atol=2e-5)


def test_exact_for_point_data_at_any_step_count():
  """Data = the single point c: the exact x0 is c at every time and the probability-flow
  ODE's solution is x_t = alpha_t c + (sigma_t / sigma_T)(x_T - alpha_T c); a solver built
  on the data prediction integrates it exactly, with one step or many."""
  c = 0.3
  shape = (2, 4, 4, 1)
  for n in (1, 2, 7):
    seen = []

    def denoise(x, g, z):
      jax.debug.callback(lambda *a: seen.append([np.asarray(v, np.float64) for v in a]),
                         x, g, ordered=True)
      return jnp.full_like(x, c), z

    out = diffusion.sample(denoise, jax.random.PRNGKey(5), shape, num_steps=n,
                           sampler="dpmpp_2m", target="x0", latent_shape=(2, 1, 1),
                           time_grid="logsnr", clip_x0=False)
    jax.effects_barrier()
    np.testing.assert_allclose(np.asarray(out), c, rtol=1e-6)
    x_T, g_T = seen[0][0], seen[0][1][0]
    for x, g in seen[1:]:
      g = g[0]
      want = np.sqrt(g) * c + np.sqrt((1 - g) / (1 - g_T)) * (x_T - np.sqrt(g_T) * c)
      np.testing.assert_allclose(x, want, rtol=0, atol=2e-5)
