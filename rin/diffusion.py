"""Noise schedules, training targets and the samplers (DDIM, DDPM, DPM-Solver++(2M)).

gamma(t) is the signal variance at time t in [0, 1]:  x_t = sqrt(gamma) x0 + sqrt(1-gamma) eps.
Schedules are named by a spec string, as in the authors' configs:
  "cosine"                 gamma = cos^2(((t + 2e-4)/(1 + 2.5e-4)) pi/2)
  "simple_linear"          gamma = max(1 - t, 1e-9)        (the authors' name; "linear" too)
  "sigmoid@s,e,tau"        e.g. "sigmoid@-3,3,0.9"
  "cosine@s,e,tau"         e.g. "cosine@0.2,1,1"
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

GAMMA_MIN = 1e-9
TARGETS = ("eps", "x0", "v")
LOSS_TYPES = ("eps", "x0", "v")
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
TIME_GRIDS = ("uniform", "logsnr")
GUIDANCE_LATENTS = ("shared", "separate")
# The unconditional class token: a label outside [0, num_classes) one-hot encodes to all
# zeros (jax.nn.one_hot), which is the authors' dropped label (labels * 0), so guidance
# needs no extra parameter.
NULL_LABEL = -1
# log-SNR grids stay below this gamma (the largest float32 below 1): sigmoid(2 lambda) rounds
# to 1 in float32 from lambda ~ 8.3 on, and a schedule may reach gamma = 1 ("linear" at t = 0);
# 1 - gamma = 0 would make the step ratios 0/0.
GAMMA_MAX_F32 = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def _parse(spec: str) -> tuple[str, tuple[float, ...]]:
  name, _, args = spec.partition("@")
  try:
    values = tuple(float(a) for a in args.split(",")) if args else ()
  except ValueError:
    raise ValueError(f"schedule {spec!r}: arguments after '@' must be numbers") from None
  return name, values


def get_schedule(spec: str) -> Callable[[jax.Array], jax.Array]:
  """Returns gamma(t) for a schedule spec string (see the module docstring)."""
  name, args = _parse(spec)
  if name == "cosine" and not args:
    return lambda t: jnp.cos(((t + 2e-4) / (1 + 2.5e-4)) * math.pi / 2) ** 2
  if name in ("linear", "simple_linear") and not args:
    return lambda t: jnp.maximum(1.0 - t, GAMMA_MIN)
  if name == "sigmoid" and len(args) == 3:
    s, e, tau = args
    if tau <= 0 or e <= s:
      raise ValueError(f"schedule {spec!r}: need tau > 0 and end > start")
    sig = jax.nn.sigmoid
    v_s, v_e = sig(s / tau), sig(e / tau)
    return lambda t: jnp.clip((v_e - sig((t * (e - s) + s) / tau)) / (v_e - v_s), GAMMA_MIN, 1.0)
  if name == "cosine" and len(args) == 3:
    s, e, tau = args
    if tau <= 0 or e <= s:
      raise ValueError(f"schedule {spec!r}: need tau > 0 and end > start")
    c = lambda u: jnp.cos(u * math.pi / 2) ** (2 * tau)
    v_s, v_e = c(s), c(e)
    return lambda t: jnp.clip((c(t * (e - s) + s) - v_e) / (v_s - v_e), GAMMA_MIN, 1.0)
  raise ValueError(f"unknown schedule {spec!r}; expected 'cosine', 'simple_linear' (or 'linear'), "
                   f"'sigmoid@start,end,tau' or 'cosine@start,end,tau'")


def _bcast(g, x):
  return g.reshape(g.shape + (1,) * (x.ndim - g.ndim))


def add_noise(x0, eps, gamma):
  """x_t = sqrt(gamma) x0 + sqrt(1 - gamma) eps, gamma per example."""
  g = _bcast(gamma, x0)
  return jnp.sqrt(g) * x0 + jnp.sqrt(1.0 - g) * eps


def training_target(target: str, x0, eps, gamma):
  """What the network regresses: eps, x0 or v = sqrt(g) eps - sqrt(1-g) x0."""
  if target == "eps":
    return eps
  if target == "x0":
    return x0
  if target == "v":
    g = _bcast(gamma, x0)
    return jnp.sqrt(g) * eps - jnp.sqrt(1.0 - g) * x0
  raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def loss_pair(loss_type: str, target: str, pred, x0, eps, x_t, gamma):
  """(estimate, truth) that the training loss compares, as the authors' compute_loss.

  The authors' loss_type is independent of the prediction target (their base config trains
  the eps loss): "eps" compares eps with the network's eps estimate (the output itself for
  an eps model, eps of the clipped x0 for an x0 model, sqrt(1-g) x_t + sqrt(g) v for a v
  model, as their get_x0_eps); "x0" compares x0 with the clipped x0 estimate; "v" (this
  project's extension, v models only) compares the output with v.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  if loss_type == target:
    return pred, training_target(target, x0, eps, gamma)
  if loss_type == "v":
    raise ValueError(f"loss_type 'v' needs target 'v', got target {target!r}")
  x0_hat, eps_hat = prediction_to_x0_eps(target, pred, x_t, gamma)
  if loss_type == "x0":
    return x0_hat, x0
  if target == "v":   # eps from v directly, not through the clipped x0 (truncate_noise=False)
    g = _bcast(gamma, x_t)
    eps_hat = jnp.sqrt(1.0 - g) * x_t + jnp.sqrt(g) * pred
  return eps_hat, eps


def prediction_to_x0_eps(target: str, pred, x_t, gamma, *, clip_x0: bool = True):
  """(x0, eps) from a network output; x0 clipped to [-1, 1] and eps made consistent."""
  g = _bcast(gamma, x_t)
  sg, s1g = jnp.sqrt(g), jnp.sqrt(1.0 - g)
  if target == "eps":
    x0 = (x_t - s1g * pred) / sg
  elif target == "x0":
    x0 = pred
  elif target == "v":
    x0 = sg * x_t - s1g * pred
  else:
    raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  eps = (x_t - sg * x0) / jnp.maximum(s1g, 1e-12)
  return x0, eps


def ddim_step(x_t, x0, eps, gamma_now, gamma_next):
  """Deterministic DDIM: re-noise the x0 estimate to the next level."""
  del x_t, gamma_now
  return add_noise(x0, eps, gamma_next)


def ddpm_step(x_t, x0, eps, gamma_now, gamma_next, noise):
  """Ancestral DDPM step with the "large" variance sigma^2 = 1 - alpha_t (published default)."""
  del x0
  alpha = _bcast(gamma_now / gamma_next, x_t)
  g = _bcast(gamma_now, x_t)
  mean = (x_t - (1.0 - alpha) / jnp.sqrt(1.0 - g) * eps) / jnp.sqrt(alpha)
  return mean + jnp.sqrt(1.0 - alpha) * noise


def log_snr(gamma):
  """lambda = log(alpha / sigma) = 0.5 log(gamma / (1 - gamma)), the DPM-Solver time."""
  return 0.5 * (jnp.log(gamma) - jnp.log1p(-gamma))


def dpmpp_2m_step(x_t, x0, x0_prev, gamma_now, gamma_next, gamma_prev, first):
  """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) from gamma_now to gamma_next.

  x_next = (sigma_next / sigma_now) x_t - alpha_next expm1(-h) D, h = lambda_next - lambda_now,
  D = x0 + (h / (2 h_last)) (x0 - x0_prev), h_last = lambda_now - lambda_prev; the first step
  (`first`), a step to gamma = 1 (h = inf) and a step after a zero-length one use D = x0,
  i.e. DDIM.
  """
  lam_now, lam_next, lam_prev = log_snr(gamma_now), log_snr(gamma_next), log_snr(gamma_prev)
  h, h_last = lam_next - lam_now, lam_now - lam_prev
  # First order where the history is missing or degenerate: float32 gammas near 1 are so
  # coarse that neighbouring grid points can coincide (h_last = 0).
  second = ~first & jnp.isfinite(h) & (h_last > 0)
  coef = jnp.where(second, h / (2.0 * jnp.where(second, h_last, 1.0)), 0.0)
  d = x0 + _bcast(coef, x0) * (x0 - x0_prev)
  ratio = _bcast(jnp.sqrt((1.0 - gamma_next) / (1.0 - gamma_now)), x_t)
  return ratio * x_t - _bcast(jnp.sqrt(gamma_next) * jnp.expm1(-h), x_t) * d


def _check_sample_args(num_steps, sampler, time_grid, time_delay, guidance, guidance_interval,
                       guidance_latents, labels, shape):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__} {num_steps!r}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  if time_grid not in TIME_GRIDS:
    raise ValueError(f"unknown time_grid {time_grid!r}; expected one of {TIME_GRIDS}")
  if not (math.isfinite(time_delay) and time_delay > -1.0):
    raise ValueError(f"time_delay must be a finite number of steps > -1, got {time_delay}")
  if not math.isfinite(guidance):
    raise ValueError(f"guidance must be finite, got {guidance}")
  if guidance_latents not in GUIDANCE_LATENTS:
    raise ValueError(f"unknown guidance_latents {guidance_latents!r}; expected one of "
                     f"{GUIDANCE_LATENTS}")
  if guidance_interval is not None:
    lo, hi = guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"guidance_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, "
                       f"got {guidance_interval}")
  if guidance != 0.0 and labels is None:
    raise ValueError("guidance != 0 needs labels (a class-conditional model)")
  if labels is not None and tuple(labels.shape) != tuple(shape[:1]):
    raise ValueError(f"labels must have shape [batch]={tuple(shape[:1])}, got {labels.shape}")


def _invert_schedule(gamma_fn, gamma, iters: int = 40):
  """t with gamma_fn(t) = gamma (schedules decrease in t), by bisection on [0, 1]."""
  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    above = gamma_fn(mid) > gamma          # still too little noise: t lies right of mid
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.float32(0.0), jnp.float32(1.0)))
  return 0.5 * (lo + hi)


def sample(denoise_fn, rng, shape, *, num_steps: int, schedule: str = "cosine",
           sampler: str = "ddpm", target: str = "eps", latent_shape=None,
           time_delay: float = 0.0, time_grid: str = "uniform", labels=None,
           guidance: float = 0.0, guidance_interval=None, guidance_latents: str = "shared",
           clip_x0: bool = True):
  """Generate images, carrying the latents from each step to the next.

  Step i of num_steps evaluates the network at gamma_now = gamma(1 - i/N) and moves x to
  gamma_next = gamma(1 - (i + 1 + time_delay)/N) (clipped at t = 0): the authors' `td`,
  which shifts only the NEXT time; the x0/eps estimate uses gamma_now.

  Args:
    denoise_fn: (x_t, gamma [B], prev_latents) -> (prediction, latents); when `labels` is
      given, (x_t, gamma, prev_latents, labels) -> ... (labels NULL_LABEL = unconditional).
    shape: [B, H, W, C]; latent_shape: [B, M, D] (zeros at the first step).
    sampler: "ddpm" (ancestral, "large" variance), "ddim" (deterministic) or "dpmpp_2m"
      (DPM-Solver++(2M), deterministic, second order in log-SNR).
    time_delay: the authors' td, in steps (0: none).
    time_grid: "uniform" in t (the authors') or "logsnr" (uniform in log-SNR between the
      schedule's values at t = 1 and t = 0, gamma kept <= GAMMA_MAX_F32).
    labels: int [B] class labels, passed to denoise_fn.
    guidance: classifier-free guidance weight w, the authors' formula applied to the raw
      network prediction: (1 + w) pred(label) - w pred(NULL_LABEL). Both halves run as one
      denoise_fn call on the concatenated batch. 0 (default): no unconditional call at all.
    guidance_interval: (t_lo, t_hi): guide only the steps whose t (the schedule's time of
      gamma_now) lies in [t_lo, t_hi]; None: every step.
    guidance_latents: which latents the unconditional half reads: "shared" (the authors'
      code: both halves read the conditional branch's carried latents) or "separate" (each
      half carries its own).
    clip_x0: clip the x0 estimate to [-1, 1] (the published default).
  Returns the final x0 prediction in [-1, 1].
  """
  time_delay, guidance = float(time_delay), float(guidance)
  _check_sample_args(num_steps, sampler, time_grid, time_delay, guidance, guidance_interval,
                     guidance_latents, labels, shape)
  gamma_fn = get_schedule(schedule)
  rng_init, rng_steps = jax.random.split(rng)
  x = jax.random.normal(rng_init, shape, jnp.float32)
  b = shape[0]
  guided = guidance != 0.0
  separate = guided and guidance_latents == "separate"
  latents = jnp.zeros(((2 * b) if separate else b,) + tuple(latent_shape)[1:], jnp.float32)

  if time_grid == "logsnr":
    g_lo = gamma_fn(jnp.float32(1.0))
    g_hi = jnp.minimum(gamma_fn(jnp.float32(0.0)), GAMMA_MAX_F32)
    lam_start, lam_end = log_snr(g_lo), log_snr(g_hi)
    def grid_gamma(pos):          # pos: steps taken, in [0, N]
      frac = jnp.clip(pos / num_steps, 0.0, 1.0)
      lam = lam_start + (lam_end - lam_start) * frac
      return jnp.clip(jax.nn.sigmoid(2.0 * lam), g_lo, g_hi)

  def gammas(i):
    """(gamma_now, gamma_next) of step i; uniform: the original expressions, so results
    at the defaults stay bit-identical to the sampler before time_delay moved."""
    if time_grid == "logsnr":
      return grid_gamma(i.astype(jnp.float32)), grid_gamma(i + 1 + time_delay)
    t_now = 1.0 - i / num_steps
    if time_delay == 0.0:
      t_next = jnp.maximum(1.0 - (i + 1) / num_steps, 0.0)
    else:
      t_next = jnp.maximum(1.0 - (i + 1 + time_delay) / num_steps, 0.0)
    return gamma_fn(t_now), gamma_fn(t_next)

  def in_interval(g_now, i):
    if guidance_interval is None:
      return jnp.float32(1.0)
    t = 1.0 - i / num_steps if time_grid == "uniform" else _invert_schedule(gamma_fn, g_now)
    lo, hi = guidance_interval
    return ((t >= lo) & (t <= hi)).astype(jnp.float32)

  def network(x_t, gamma, z, i):
    if not guided:
      if labels is None:
        return denoise_fn(x_t, gamma, z)
      return denoise_fn(x_t, gamma, z, labels)
    cat = lambda a: jnp.concatenate([a, a])
    z_in = z if separate else cat(z)
    lab = jnp.concatenate([labels, jnp.full_like(labels, NULL_LABEL)])
    pred2, z2 = denoise_fn(cat(x_t), cat(gamma), z_in, lab)
    w = guidance * in_interval(gamma[0], i)
    pred = pred2[:b] * (1.0 + w) - pred2[b:] * w
    return pred, (z2 if separate else z2[:b])

  def body(carry, i):
    x_t, latents, _, x0_prev, g_prev = carry
    g_now, g_next = gammas(i)
    gamma_now = jnp.full((b,), g_now)
    gamma_next = jnp.full((b,), g_next)
    pred, latents = network(x_t, gamma_now, latents, i)
    x0, eps = prediction_to_x0_eps(target, pred, x_t, gamma_now, clip_x0=clip_x0)
    if sampler == "ddim":
      x_next = ddim_step(x_t, x0, eps, gamma_now, gamma_next)
    elif sampler == "dpmpp_2m":
      x_next = dpmpp_2m_step(x_t, x0, x0_prev, gamma_now, gamma_next, jnp.full((b,), g_prev),
                             i == 0)
    else:
      noise = jax.random.normal(jax.random.fold_in(rng_steps, i), shape, jnp.float32)
      x_next = ddpm_step(x_t, x0, eps, gamma_now, gamma_next, noise)
    return (x_next, latents.astype(jnp.float32), x0, x0, g_now), None

  init = (x, latents, x, jnp.zeros_like(x), jnp.float32(0.5))
  (_, _, x0, _, _), _ = jax.lax.scan(body, init, jnp.arange(num_steps))
  return x0
