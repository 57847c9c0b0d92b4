"""Noise schedules, training targets and the DDIM/DDPM samplers.

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

GAMMA_MIN = 1e-9
TARGETS = ("eps", "x0", "v")
LOSS_TYPES = ("eps", "x0", "v")
SAMPLERS = ("ddim", "ddpm")


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


def sample(denoise_fn, rng, shape, *, num_steps: int, schedule: str = "cosine",
           sampler: str = "ddpm", target: str = "eps", latent_shape=None,
           time_delay: float = 0.0):
  """Generate images, carrying the latents from each step to the next.

  Args:
    denoise_fn: (x_t, gamma [B], prev_latents) -> (prediction, latents).
    shape: [B, H, W, C]; latent_shape: [B, M, D] (zeros at the first step).
    time_delay: evaluate the network at t + delay (the authors' "td"), 0 by default.
  Returns the final x0 prediction in [-1, 1].
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  gamma_fn = get_schedule(schedule)
  rng_init, rng_steps = jax.random.split(rng)
  x = jax.random.normal(rng_init, shape, jnp.float32)
  latents = jnp.zeros(latent_shape, jnp.float32)
  b = shape[0]

  def body(carry, i):
    x_t, latents, _ = carry
    t_now = 1.0 - i / num_steps
    t_next = jnp.maximum(1.0 - (i + 1) / num_steps, 0.0)
    gamma_now = jnp.full((b,), gamma_fn(t_now))
    gamma_next = jnp.full((b,), gamma_fn(t_next))
    gamma_in = jnp.full((b,), gamma_fn(jnp.minimum(t_now + time_delay, 1.0)))
    pred, latents = denoise_fn(x_t, gamma_in, latents)
    x0, eps = prediction_to_x0_eps(target, pred, x_t, gamma_now)
    if sampler == "ddim":
      x_next = ddim_step(x_t, x0, eps, gamma_now, gamma_next)
    else:
      noise = jax.random.normal(jax.random.fold_in(rng_steps, i), shape, jnp.float32)
      x_next = ddpm_step(x_t, x0, eps, gamma_now, gamma_next, noise)
    return (x_next, latents.astype(jnp.float32), x0), None

  (_, _, x0), _ = jax.lax.scan(body, (x, latents, x), jnp.arange(num_steps))
  return x0
