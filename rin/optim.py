"""LAMB as published: biases and LayerNorm parameters (every 1-D parameter) are excluded
from both weight decay and the trust ratio; linear warm-up, then the authors' "cosine@r"
learning-rate decay."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("cosine@r", "cosine_to_zero")


def decay_mask(params, exclude=()):
  """True for matrices/kernels/embeddings, False for biases and LayerNorm scale/bias and for
  parameters whose path ("block_0/conv/pointwise_kernel") contains one of `exclude`.

  `exclude` is the authors' LAMB exclude list (their exclude_from_weight_decay, which their
  LAMB also takes as exclude_from_layer_adaptation). Why it matters: the trust ratio scales
  each update by the parameter's own norm, so a kernel that starts at ~0 (the conv block's
  1x1 conv, VarianceScaling 1e-10) grows only geometrically, by ~lr per step: it stays
  ~1e-4 for thousands of steps and the block it gates stays off."""
  exclude = tuple(exclude)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not any(
          e in "/".join(str(getattr(k, "key", k)) for k in path) for e in exclude), params)


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """The learning rate at each step (optimizer update count, 0 first), from `optim`:

  - learning_rate, warmup_steps: linear warm-up lr = base * step / w for step < w.
  - decay_fraction r and lr_schedule:
    "cosine@r" (default; the authors' models/model_utils.py WarmUpAndDecay): after warm-up,
      Keras' CosineDecay(base, decay_steps=(T - w) / r, alpha=end_lr_factor) at step - w. The
      cosine is laid over (T - w) / r steps and training stops at fraction r of it, so the
      last LR is base * (1 + cos(pi r)) / 2 (r = 0.8: 0.0955 base), not 0.
    "cosine_to_zero": the cosine reaches end_lr_factor * base after r * (T - w) steps and
      stays there (this project's schedule before it matched the authors').
  - end_lr_factor (default 0): the cosine's floor as a fraction of base (Keras' alpha).
  """
  kind = optim.lr_schedule
  if kind not in LR_SCHEDULES:
    raise ValueError(f"config.optim.lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
  r = float(optim.decay_fraction)
  if not 0.0 < r <= 1.0:
    raise ValueError(f"config.optim.decay_fraction must lie in (0, 1], got {r}")
  base = float(optim.learning_rate)
  alpha = float(optim.end_lr_factor)
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  remaining = max(total_steps - warmup, 1)
  decay_steps = remaining / r if kind == "cosine@r" else max(1.0, round(r * remaining))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = base * step / warmup if warmup else jnp.full_like(step, base)
    frac = jnp.clip(step - warmup, 0.0, decay_steps) / decay_steps
    decayed = base * ((1.0 - alpha) * 0.5 * (1.0 + jnp.cos(math.pi * frac)) + alpha)
    return jnp.where(step < warmup, ramp, decayed)

  return schedule


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  exclude = tuple(optim.get("lamb_exclude", ()))
  mask = lambda params: decay_mask(params, exclude)
  parts += [
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=mask),
      optax.masked(optax.scale_by_trust_ratio(), mask),
      optax.scale_by_learning_rate(learning_rate_schedule(optim, total_steps)),
  ]
  return optax.chain(*parts)
