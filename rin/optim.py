"""LAMB as published: biases and LayerNorm parameters (every 1-D parameter) are excluded
from both weight decay and the trust ratio; linear warm-up, then a cosine decay
traversed over a fraction of the remaining steps (the authors' "cosine@r")."""
from __future__ import annotations

import jax
import optax


def decay_mask(params):
  """True for matrices/kernels/embeddings, False for biases and LayerNorm scale/bias."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine to 0 over `decay_fraction` of the
  remaining steps (held at 0 afterwards)."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(1, int(round(optim.decay_fraction * max(total_steps - warmup, 1))))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup,
      decay_steps=warmup + decay_steps, end_value=0.0)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts += [
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
      optax.masked(optax.scale_by_trust_ratio(), decay_mask),
      optax.scale_by_learning_rate(learning_rate_schedule(optim, total_steps)),
  ]
  return optax.chain(*parts)
