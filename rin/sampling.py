"""Sampling from a trained RIN: the sampler options of a config, the jitted sampler, the
evaluation protocols, class labels, and the one loop that samples a set in batches."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rin import diffusion
from rin import distributed
from rin import video as video_lib
from rin.model import RIN


def sample_options(config: ConfigDict, **overrides) -> dict:
  """The sampler keyword arguments of rin.diffusion.sample from config.diffusion, with
  `overrides` (None values ignored) on top: num_steps, sampler, schedule, time_delay,
  time_grid, guidance, guidance_interval, guidance_latents."""
  d = config.diffusion
  opts = dict(num_steps=d.sample_steps, sampler=d.sampler, schedule=d.sample_schedule,
              time_delay=d.time_delay, time_grid=d.time_grid, guidance=d.guidance,
              guidance_interval=d.guidance_interval, guidance_latents=d.guidance_latents)
  unknown = set(overrides) - set(opts)
  if unknown:
    raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; expected {sorted(opts)}")
  opts.update({k: v for k, v in overrides.items() if v is not None})
  if opts["guidance_interval"] is not None:
    opts["guidance_interval"] = tuple(float(v) for v in opts["guidance_interval"])
  if opts["guidance"] != 0 and config.model.num_classes <= 0:
    raise ValueError(f"guidance={opts['guidance']} needs a class-conditional model "
                     "(config.model.num_classes > 0)")
  return opts


def make_sample_fn(model: RIN, config: ConfigDict, *, num_steps: int | None = None,
                   sampler: str | None = None, out_sharding=None, **options):
  """(params, rng, labels [B]) -> images [B,H,W,C] in [-1, 1]; jitted. Video configs:
  (params, rng, conditioning frames [B,Fc,H,W,C]) -> predicted frames [B,F-Fc,H,W,C].

  options: schedule, time_delay, time_grid, guidance, guidance_interval, guidance_latents
  (see sample_options; defaults from config.diffusion).
  out_sharding: e.g. a replicated NamedSharding, so every process can read the images.
  """
  d, m = config.diffusion, config.model
  opts = sample_options(config, num_steps=num_steps, sampler=sampler, **options)

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def sample_fn(params, rng, labels):
    b = labels.shape[0]
    shape = (b, m.image_size, m.image_size, m.channels)
    if video_lib.is_video(config):
      # The conditioning frames ride in the labels slot; guidance needs class labels.
      if opts["guidance"]:
        raise ValueError("guidance needs a class-conditional image model; video configs "
                         "condition on frames")
      shape = shape[:1] + (video_lib.pred_frames(config),) + shape[1:]
      denoise = lambda x_t, g, z, lab=None: model.apply({"params": params}, x_t, g, labels, z,
                                                        train=False)
      return diffusion.sample(denoise, rng, shape, target=d.target,
                              latent_shape=(b, m.num_latents, m.latent_dim), **opts)
    denoise = lambda x_t, g, z, lab=None: model.apply({"params": params}, x_t, g, lab, z,
                                                      train=False)
    return diffusion.sample(
        denoise, rng, shape, target=d.target, latent_shape=(b, m.num_latents, m.latent_dim),
        labels=labels if m.num_classes > 0 else None, **opts)

  return sample_fn


EVAL_PROTOCOLS = ("", "authors")


def protocol_options(protocol: str, steps: int | None = None) -> dict:
  """Sampler overrides of an evaluation protocol: "" (none) or "authors", the paper's FID
  protocol: DDPM, cosine schedule, 1000 steps (or `steps`, e.g. 400), no guidance."""
  if protocol not in EVAL_PROTOCOLS:
    raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of "
                     f"{EVAL_PROTOCOLS}")
  if not protocol:
    return {} if steps is None else {"num_steps": steps}
  return dict(sampler="ddpm", schedule="cosine", num_steps=steps or 1000, time_delay=0.0,
              time_grid="uniform", guidance=0.0)


def eval_sample_options(config: ConfigDict, steps: int | None) -> dict:
  """Sampling options of training-time evaluation: config.eval.protocol ("authors": the
  paper's DDPM/cosine/config.eval.protocol_steps protocol) or config.eval.sample_steps."""
  ev = config.eval
  if ev.protocol:
    return protocol_options(ev.protocol, ev.protocol_steps)
  opts = protocol_options("", steps)
  if ev.sampler:                 # "" = the diffusion sampler
    opts["sampler"] = ev.sampler
  return opts


def draw_labels(rng, config: ConfigDict, n: int):
  """Class labels drawn uniformly (zeros for an unconditional model)."""
  k = config.model.num_classes
  if k <= 0:
    return jnp.zeros((n,), jnp.int32)
  return jax.random.randint(rng, (n,), 0, k, jnp.int32)


def labels_for(rng, config: ConfigDict, n: int, label: int | None = None, *,
               by_class: bool = False):
  """n copies of `label`, (None) labels drawn uniformly with draw_labels, or (by_class)
  the classes in order, ceil(n / classes) each: with n = classes^2 each row of
  rin.images.save_image_grid is one class."""
  if by_class:
    k = config.model.num_classes
    if k <= 0:
      raise ValueError(f"by_class needs a class-conditional config, got model.num_classes={k}")
    if label is not None:
      raise ValueError(f"by_class and label={label} exclude each other")
    return jnp.repeat(jnp.arange(k, dtype=jnp.int32), -(-n // k))[:n]
  if label is None:
    return draw_labels(rng, config, n)
  if not 0 <= label < max(config.model.num_classes, 1):
    raise ValueError(f"label={label} is outside [0, {config.model.num_classes})")
  return jnp.full((n,), label, jnp.int32)


def sample_in_batches(sample_fn, params, rng, conditioning, batch_size: int) -> np.ndarray:
  """sample_fn over `conditioning` (labels [N], or a video's conditioning frames
  [N, Fc, ...]) in slices of batch_size; batch i draws with fold_in(rng, 2 + i) (1 is the
  labels' key). All processes call it; each gets every sample (numpy)."""
  out = []
  for i, s in enumerate(range(0, len(conditioning), batch_size)):
    out.append(distributed.to_host(sample_fn(params, jax.random.fold_in(rng, 2 + i),
                                             jnp.asarray(conditioning[s:s + batch_size]))))
  return np.concatenate(out)


def generate(config: ConfigDict, params, model, *, num_samples: int, seed: int = 0, label=None,
             by_class: bool = False, num_steps=None, sampler=None, batch_size: int = 256,
             **options):
  """Returns (images [N,H,W,C] in [-1,1], labels [N]).

  options: further sampling options (sample_options: schedule, time_delay, time_grid,
  guidance, guidance_interval, guidance_latents)."""
  sample_fn = make_sample_fn(model, config, num_steps=num_steps, sampler=sampler, **options)
  rng = jax.random.PRNGKey(seed)
  labels = labels_for(jax.random.fold_in(rng, 1), config, num_samples, label,
                      by_class=by_class)
  return sample_in_batches(sample_fn, params, rng, labels, batch_size), np.asarray(labels)
