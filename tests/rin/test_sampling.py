"""Samplers beyond the paper: DPM-Solver++(2M), time grids, the authors' td, guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import diffusion

SHAPE = (3, 4, 4, 1)
LATENTS = (3, 5, 6)
_W = jax.random.normal(jax.random.PRNGKey(3), (16, 16)) * 0.3


def _toy(x, g, z, labels=None):
  """A nonlinear denoiser that reads and updates its latents (and labels when given)."""
  lab = 0.0 if labels is None else jnp.where(labels >= 0, labels + 1.0, 0.0)[:, None]
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ _W + z.mean((1, 2))[:, None] + g[:, None] + 0.1 * lab)
  return h.reshape(x.shape), z * 0.5 + h.mean(-1)[:, None, None]


def _original_sample(denoise_fn, rng, shape, *, num_steps, schedule, sampler, latent_shape):
  """The DDIM/DDPM sampler as rin.diffusion.sample computed it before DPM++, guidance and
  the authors' td were added (time_delay 0): the defaults must stay bit-identical to it."""
  gamma_fn = diffusion.get_schedule(schedule)
  rng_init, rng_steps = jax.random.split(rng)
  x = jax.random.normal(rng_init, shape, jnp.float32)
  b = shape[0]

  def body(carry, i):
    x_t, latents, _ = carry
    t_now = 1.0 - i / num_steps
    t_next = jnp.maximum(1.0 - (i + 1) / num_steps, 0.0)
    gamma_now = jnp.full((b,), gamma_fn(t_now))
    gamma_next = jnp.full((b,), gamma_fn(t_next))
    gamma_in = jnp.full((b,), gamma_fn(jnp.minimum(t_now + 0.0, 1.0)))
    pred, latents = denoise_fn(x_t, gamma_in, latents)
    x0, eps = diffusion.prediction_to_x0_eps("eps", pred, x_t, gamma_now)
    if sampler == "ddim":
      x_next = diffusion.ddim_step(x_t, x0, eps, gamma_now, gamma_next)
    else:
      noise = jax.random.normal(jax.random.fold_in(rng_steps, i), shape, jnp.float32)
      x_next = diffusion.ddpm_step(x_t, x0, eps, gamma_now, gamma_next, noise)
    return (x_next, latents.astype(jnp.float32), x0), None

  (_, _, x0), _ = jax.lax.scan(body, (x, jnp.zeros(latent_shape, jnp.float32), x),
                               jnp.arange(num_steps))
  return x0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("schedule", ["cosine", "sigmoid@-3,3,0.9"])
def test_defaults_are_bit_identical_to_the_original_sampler(sampler, schedule):
  kw = dict(num_steps=7, schedule=schedule, sampler=sampler, latent_shape=LATENTS)
  want = jax.jit(lambda r: _original_sample(_toy, r, SHAPE, **kw))(jax.random.PRNGKey(0))
  got = jax.jit(lambda r: diffusion.sample(_toy, r, SHAPE, **kw))(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(got, want)


def _run(seed=0, **kw):
  kw = dict(dict(num_steps=6, sampler="dpmpp_2m", latent_shape=LATENTS), **kw)
  return jax.jit(lambda r: diffusion.sample(_toy, r, SHAPE, **kw))(jax.random.PRNGKey(seed))


LABELS = jnp.array([0, 3, 7])


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_guidance_zero_is_the_unguided_sampler_exactly(sampler):
  plain = _run(sampler=sampler, labels=LABELS)
  np.testing.assert_array_equal(_run(sampler=sampler, labels=LABELS, guidance=0.0), plain)
  # The batched cond+uncond path with guidance switched off at every step (t never in
  # [0, 0] on the uniform grid) gives the unguided samples too.
  off = _run(sampler=sampler, labels=LABELS, guidance=2.0, guidance_interval=(0.0, 0.0))
  np.testing.assert_allclose(off, plain, rtol=0, atol=1e-6)
  guided = _run(sampler=sampler, labels=LABELS, guidance=2.0)
  assert float(jnp.abs(guided - plain).max()) > 1e-3


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_guidance_is_the_authors_formula_in_one_batched_call(w):
  calls, seen = [], []

  def denoise(x, g, z, labels):
    calls.append(x.shape[0])
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), labels, ordered=True)
    pred = jnp.where(labels >= 0, 0.3 + 0.01 * labels, -0.2)[:, None, None, None]
    return jnp.broadcast_to(pred, x.shape), z

  out = diffusion.sample(denoise, jax.random.PRNGKey(0), SHAPE, num_steps=1, target="x0",
                         latent_shape=LATENTS, labels=LABELS, guidance=w, clip_x0=False)
  jax.effects_barrier()
  assert calls == [2 * SHAPE[0]] and len(seen) == 1          # one call, 2B examples
  np.testing.assert_array_equal(seen[0],
                                [0, 3, 7, diffusion.NULL_LABEL, diffusion.NULL_LABEL,
                                 diffusion.NULL_LABEL])
  cond = 0.3 + 0.01 * np.asarray(LABELS, np.float32)
  want = (1 + w) * cond - w * (-0.2)
  np.testing.assert_allclose(out[:, 0, 0, 0], want, rtol=1e-6)


@pytest.mark.parametrize("mode,want", [("shared", 2.0), ("separate", 2.0 * 3 - 2 * 20.0)])
def test_guidance_latents_shared_as_the_authors_or_separate(mode, want):
  """Latents grow by 1 (cond) or 10 (uncond) per call; the prediction is their mean."""
  def denoise(x, g, z, labels):
    pred = jnp.broadcast_to(z.mean((1, 2))[:, None, None, None], x.shape)
    return pred, z + jnp.where(labels >= 0, 1.0, 10.0)[:, None, None]

  out = diffusion.sample(denoise, jax.random.PRNGKey(0), SHAPE, num_steps=3, target="x0",
                         latent_shape=LATENTS, labels=LABELS, guidance=2.0, clip_x0=False,
                         guidance_latents=mode)
  # Last step (i = 2): cond latents 2; uncond latents 2 (shared) or 20 (separate).
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_invert_schedule():
  for spec in ("cosine", "sigmoid@-3,3,0.9", "linear"):
    fn = diffusion.get_schedule(spec)
    for t in (0.05, 0.3, 0.77):
      got = diffusion._invert_schedule(fn, fn(jnp.float32(t)))
      assert abs(float(got) - t) < 1e-4, (spec, t, float(got))


def _identity_ddim_factor(gamma_fn, n, td):
  """Identity x0 denoiser + DDIM: x_{i+1} = f_i x_i with f_i from gamma_now, gamma_next."""
  f = 1.0
  for i in range(n - 1):      # the last step's update is discarded (x0 is returned)
    g = float(gamma_fn(jnp.float32(1 - i / n)))
    gn = float(gamma_fn(jnp.float32(max(1 - (i + 1 + td) / n, 0.0))))
    f *= np.sqrt(gn) + np.sqrt(1 - gn) * (1 - np.sqrt(g)) / np.sqrt(1 - g)
  return f


@pytest.mark.parametrize("td", [0.0, 0.5, 1.0])
def test_time_delay_shifts_the_next_time_as_the_authors(td):
  """The network and the x0/eps estimate see gamma(1 - i/N); x moves to
  gamma(1 - (i + 1 + td)/N) (the authors' diffusion_utils.py)."""
  n, seen = 5, []
  gamma_fn = diffusion.get_schedule("cosine")

  def denoise(x, g, z):
    jax.debug.callback(lambda v: seen.append(float(v[0])), g, ordered=True)
    return x, z

  out = diffusion.sample(denoise, jax.random.PRNGKey(0), SHAPE, num_steps=n, sampler="ddim",
                         target="x0", latent_shape=LATENTS, time_delay=td, clip_x0=False)
  jax.effects_barrier()
  want_g = [float(gamma_fn(jnp.float32(1 - i / n))) for i in range(n)]
  np.testing.assert_allclose(seen, want_g, rtol=1e-6)
  x_init = jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], SHAPE)
  np.testing.assert_allclose(out, x_init * _identity_ddim_factor(gamma_fn, n, td), rtol=2e-5)


S2 = 0.25   # data variance of the Gaussian toy


def _gaussian_denoiser(x, g, z):
  """The exact eps of Gaussian data N(0, S2 I): x0_hat = sqrt(g) S2 / (g S2 + 1 - g) x."""
  gb = g[:, None, None, None]
  x0 = jnp.sqrt(gb) * S2 / (gb * S2 + 1 - gb) * x
  return (x - jnp.sqrt(gb) * x0) / jnp.sqrt(1 - gb), z


def _gaussian_error(sampler, n):
  """Max error of the returned x0 against the exact probability-flow ODE solution, which
  for Gaussian data scales x: x_t = sqrt(v_t / v_T) x_T, v = g S2 + 1 - g."""
  shape = (64, 4, 4, 1)
  out = diffusion.sample(_gaussian_denoiser, jax.random.PRNGKey(0), shape, num_steps=n,
                         sampler=sampler, latent_shape=(64, 1, 1), clip_x0=False,
                         time_grid="logsnr")
  gf = diffusion.get_schedule("cosine")
  g_lo = float(gf(jnp.float32(1.0)))
  g_hi = min(float(gf(jnp.float32(0.0))), diffusion.GAMMA_MAX_F32)
  lam = lambda g: 0.5 * np.log(g / (1 - g))
  g_last = 1 / (1 + np.exp(-2 * (lam(g_lo) + (lam(g_hi) - lam(g_lo)) * (n - 1) / n)))
  v_T, v_last = g_lo * S2 + 1 - g_lo, g_last * S2 + 1 - g_last
  x_T = jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], shape)
  want = np.sqrt(g_last) * S2 / v_last * np.sqrt(v_last / v_T) * np.asarray(x_T)
  return float(np.abs(np.asarray(out) - want).max())


def test_dpmpp_2m_is_second_order_on_the_gaussian_closed_form():
  dpm = [_gaussian_error("dpmpp_2m", n) for n in (40, 80, 160)]
  ddim = [_gaussian_error("ddim", n) for n in (40, 80, 160)]
  dpm_order = np.log2(np.array(dpm[:-1]) / np.array(dpm[1:]))
  ddim_order = np.log2(np.array(ddim[:-1]) / np.array(ddim[1:]))
  assert np.all(dpm_order > 1.9), dpm
  assert np.all((ddim_order > 0.9) & (ddim_order < 1.1)), ddim
  assert dpm[1] < ddim[1] / 10


def test_dpmpp_2m_step_closed_form():
  """One step by hand: D = x0 + h/(2 h_last) (x0 - x0_prev); first step = DDIM."""
  k = jax.random.split(jax.random.PRNGKey(4), 3)
  x, x0, x0p = (jax.random.normal(kk, (2, 3)) for kk in k)
  gp, g, gn = jnp.array([0.1, 0.2]), jnp.array([0.3, 0.5]), jnp.array([0.6, 0.9])
  lam = lambda v: 0.5 * np.log(np.asarray(v) / (1 - np.asarray(v)))
  h, hl = lam(gn) - lam(g), lam(g) - lam(gp)
  d = np.asarray(x0) + (h / (2 * hl))[:, None] * (np.asarray(x0) - np.asarray(x0p))
  want = (np.sqrt((1 - gn) / (1 - g))[:, None] * np.asarray(x)
          - (np.sqrt(gn) * np.expm1(-h))[:, None] * d)
  got = diffusion.dpmpp_2m_step(x, x0, x0p, g, gn, gp, jnp.bool_(False))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  eps = (x - jnp.sqrt(g)[:, None] * x0) / jnp.sqrt(1 - g)[:, None]
  first = diffusion.dpmpp_2m_step(x, x0, x0p, g, gn, gp, jnp.bool_(True))
  np.testing.assert_allclose(first, diffusion.ddim_step(x, x0, eps, g, gn), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("sampler,grid", [("ddpm", "uniform"), ("ddim", "logsnr"),
                                          ("dpmpp_2m", "uniform"), ("dpmpp_2m", "logsnr")])
def test_samplers_are_deterministic_under_a_seed(sampler, grid):
  a = _run(0, sampler=sampler, time_grid=grid, labels=LABELS, guidance=1.0)
  np.testing.assert_array_equal(a, _run(0, sampler=sampler, time_grid=grid, labels=LABELS,
                                        guidance=1.0))
  assert np.all(np.isfinite(np.asarray(a)))
  assert float(jnp.abs(a - _run(1, sampler=sampler, time_grid=grid, labels=LABELS,
                                guidance=1.0)).max()) > 1e-3


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_steps=0), ValueError, "num_steps must be >= 1"),
    (dict(num_steps=2.5), TypeError, "num_steps must be an int"),
    (dict(num_steps=True), TypeError, "num_steps must be an int"),
    (dict(sampler="euler"), ValueError, "unknown sampler 'euler'"),
    (dict(time_grid="cosine"), ValueError, "unknown time_grid"),
    (dict(time_delay=float("nan")), ValueError, "time_delay"),
    (dict(time_delay=-1.0), ValueError, "time_delay"),
    (dict(guidance=1.0), ValueError, "guidance != 0 needs labels"),
    (dict(guidance=float("inf"), labels=LABELS), ValueError, "guidance must be finite"),
    (dict(guidance=1.0, labels=LABELS, guidance_interval=(0.6, 0.2)), ValueError,
     "guidance_interval"),
    (dict(guidance=1.0, labels=LABELS, guidance_latents="both"), ValueError,
     "guidance_latents"),
    (dict(labels=jnp.zeros((2,), jnp.int32)), ValueError, "labels must have shape"),
])
def test_bad_sampling_arguments_are_clear_errors(kw, err, match):
  kw = dict(dict(num_steps=3, latent_shape=LATENTS), **kw)
  with pytest.raises(err, match=match):
    diffusion.sample(_toy, jax.random.PRNGKey(0), SHAPE, **kw)


def test_guidance_interval_on_the_logsnr_grid_uses_the_schedule_time():
  """A log-SNR grid maps steps to t through the schedule; an interval over all of [0, 1]
  guides every step, one below the last step's t (~0.004 here: log-SNR 5.05 at N = 6) none."""
  kw = dict(sampler="ddim", time_grid="logsnr", labels=LABELS, guidance=2.0)
  np.testing.assert_allclose(_run(guidance_interval=(0.0, 1.0), **kw), _run(**kw), atol=1e-6)
  np.testing.assert_allclose(_run(guidance_interval=(0.0, 0.001), **kw),
                             _run(sampler="ddim", time_grid="logsnr", labels=LABELS),
                             atol=1e-6)


def test_labels_by_class_fill_grid_rows_in_class_order():
  from ml_collections import ConfigDict
  from rin import sampling
  cfg = ConfigDict({"model": {"num_classes": 3}})
  got = np.asarray(sampling.labels_for(None, cfg, 9, by_class=True))
  np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  assert len(sampling.labels_for(None, cfg, 7, by_class=True)) == 7
  with pytest.raises(ValueError, match="exclude"):
    sampling.labels_for(None, cfg, 9, label=1, by_class=True)
  with pytest.raises(ValueError, match="num_classes=0"):
    sampling.labels_for(None, ConfigDict({"model": {"num_classes": 0}}), 4, by_class=True)
