"""Read-attention maps over the sampling trajectory, as in the paper's figure:

    python -m rin.visualize --config rin/configs/digits.py --workdir runs/digits \
        [--num_samples 4] [--steps 50] [--at_steps 0,10,25,49] [--heads mean|all] \
        [--latent -1] [--out DIR]

For each sample, one PNG (<out>/sample_<j>_read_attention.png): a row per RIN block, a
column per chosen sampling step (per head with --heads all), each panel the read
attention over the interface tokens (patches) overlaid on the final sample: how much the
latents read each patch, averaged over the latents (or one latent with --latent; -1 is the
class token of a class-conditional model, -2 the time token). The probabilities come from
the reference math on the same weights (flax `sow` into the "attention" collection), so
the sampling kernels are unchanged; the samples themselves are those of rin.sample.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rin import diffusion
from rin import logging_utils
from rin import sampling
from rin import xla_cpu
from rin.train_state import create_model, load_ema_params

def default_at_steps(num_steps: int) -> list[int]:
  return sorted({0, num_steps // 4, num_steps // 2, num_steps - 1})


def check_at_steps(at_steps, num_steps: int) -> list[int]:
  out = sorted({int(s) for s in at_steps})
  if not out or out[0] < 0 or out[-1] >= num_steps:
    raise ValueError(f"at_steps must lie in [0, {num_steps}), got {list(at_steps)}")
  return out


def sample_with_read_attention(config, model, params, *, num_samples: int, seed: int = 0,
                               label=None, num_steps=None, sampler=None, at_steps=None):
  """Samples as rin.sampling.generate does (one batch) and the read probabilities of every
  block at the chosen steps. Returns (images [B,H,W,C], labels [B],
  {step: [num_blocks, B, heads, M, N]}).
  """
  opts = sampling.sample_options(config, num_steps=num_steps, sampler=sampler)
  n = opts["num_steps"]
  at = check_at_steps(at_steps if at_steps is not None else default_at_steps(n), n)
  m = config.model
  rng = jax.random.PRNGKey(seed)
  labels = sampling.labels_for(jax.random.fold_in(rng, 1), config, num_samples, label)
  captured: dict[int, np.ndarray] = {}
  calls = [0]
  wanted = set(at)

  def keep(probs):
    i = calls[0]
    calls[0] += 1
    if i in wanted:
      captured[i] = np.stack([np.asarray(p) for p in probs])

  def denoise(x_t, g, z, lab=None):
    (pred, z), state = model.apply({"params": params}, x_t, g, lab, z, train=False,
                                   mutable=["attention"])
    reads = [state["attention"][f"block_{b}"]["read"]["read"][0]
             for b in range(m.num_blocks)]
    # Ordered: one call per sampling step, in step order, so the count is the step index.
    jax.debug.callback(keep, reads, ordered=True)
    return pred, z

  @jax.jit
  def run(rng, labels):
    return diffusion.sample(
        denoise, rng, (num_samples, m.image_size, m.image_size, m.channels),
        target=config.diffusion.target, latent_shape=(num_samples, m.num_latents, m.latent_dim),
        labels=labels if m.num_classes > 0 else None, **opts)

  images = np.asarray(run(jax.random.fold_in(rng, 2), labels))
  jax.effects_barrier()
  if sorted(captured) != at:
    raise RuntimeError(f"captured steps {sorted(captured)}, expected {at}")
  return images, np.asarray(labels), captured


def patch_maps(probs, grid: int, *, heads: str = "mean", latent: int | None = None):
  """[B, H, M, N] read probabilities -> maps [B, H', grid, grid] (H' = 1 for "mean"):
  the mean over latents (or one latent) of how much each interface patch is read."""
  p = np.asarray(probs, np.float64)
  p = p.mean(2) if latent is None else p[:, :, latent]
  if heads == "mean":
    p = p.mean(1, keepdims=True)
  return p.reshape(p.shape[0], p.shape[1], grid, grid)


def write_pngs(images, labels, captured, out: str, *, patch_size: int, heads: str = "mean",
               latent: int | None = None) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out, exist_ok=True)
  steps = sorted(captured)
  num_blocks = captured[steps[0]].shape[0]
  b, h, w, c = images.shape
  grid = h // patch_size
  pics = (np.clip(images, -1, 1) + 1) / 2
  paths = []
  for j in range(b):
    maps = {s: [patch_maps(captured[s][k], grid, heads=heads, latent=latent)[j]
                for k in range(num_blocks)] for s in steps}
    nh = maps[steps[0]][0].shape[0]
    cols = len(steps) * nh
    fig, axes = plt.subplots(num_blocks, cols, figsize=(1.9 * cols, 1.9 * num_blocks),
                             squeeze=False)
    img = pics[j, ..., 0] if c == 1 else pics[j]
    for k in range(num_blocks):
      for si, s in enumerate(steps):
        for hh in range(nh):
          ax = axes[k, si * nh + hh]
          ax.imshow(img, cmap="gray" if c == 1 else None, extent=(0, w, h, 0))
          ax.imshow(maps[s][k][hh], cmap="inferno", alpha=0.55, extent=(0, w, h, 0),
                    interpolation="nearest")
          ax.set_xticks([])
          ax.set_yticks([])
          head = "" if heads == "mean" else f" h{hh}"
          if k == 0:
            ax.set_title(f"step {s}{head}", fontsize=7)
          if si == 0 and hh == 0:
            ax.set_ylabel(f"block {k}", fontsize=7)
    who = "mean over latents" if latent is None else f"latent {latent}"
    fig.suptitle(f"read attention ({who}), sample {j}, label {int(labels[j])}", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f"sample_{j}_read_attention.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def _define_flags():
  """Defined when run as a program only, so importing rin.visualize next to rin.sample
  (whose flags share these names) defines no flag twice."""
  global _CONFIG, _WORKDIR, _OUT, _NUM, _STEPS, _SAMPLER, _AT, _HEADS, _LATENT, _SEED, _LABEL
  _CONFIG = config_flags.DEFINE_config_file("config", "rin/configs/digits.py", "Config file.")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Training workdir with checkpoints.")
  _OUT = flags.DEFINE_string("out", None, "Output folder (default <workdir>/attention).")
  _NUM = flags.DEFINE_integer("num_samples", 4, "How many samples to draw maps for.")
  _STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default config).")
  _SAMPLER = flags.DEFINE_enum("sampler", None, list(diffusion.SAMPLERS), "Sampler.")
  _AT = flags.DEFINE_list("at_steps", None, "Sampling steps to show (default 4 spread out).")
  _HEADS = flags.DEFINE_enum("heads", "mean", ["mean", "all"], "Average heads or show each.")
  _LATENT = flags.DEFINE_integer("latent", None, "One latent's map (default: mean of all).")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _LABEL = flags.DEFINE_integer("label", None, "Class label (default: uniform).")


def main(argv):
  del argv
  config = _CONFIG.value
  xla_cpu.configure(config.train.dtype)
  logging_utils.quiet_library_logs()
  model = create_model(config)
  params, step = load_ema_params(config, _WORKDIR.value, model, write_config=False)
  images, labels, captured = sample_with_read_attention(
      config, model, params, num_samples=_NUM.value, seed=_SEED.value, label=_LABEL.value,
      num_steps=_STEPS.value, sampler=_SAMPLER.value, at_steps=_AT.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "attention")
  paths = write_pngs(images, labels, captured, out, patch_size=config.model.patch_size,
                     heads=_HEADS.value, latent=_LATENT.value)
  logging.info("checkpoint step %d", step)
  print(f"wrote {len(paths)} read-attention PNGs to {out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
