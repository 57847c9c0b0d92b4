"""Sampling: `python -m rin.sample --config rin/configs/digits.py --workdir runs/digits`.

Loads the newest readable checkpoint's EMA weights from the workdir, draws `--num_samples`
images (labels given with --label or drawn uniformly), writes a PNG grid and an .npz.
Samplers: --sampler ddpm|ddim|dpmpp_2m at any --steps, --time_grid uniform|logsnr,
--time_delay (the authors' td), --guidance W (classifier-free, with --guidance_interval);
--protocol authors samples as the paper's FID protocol (DDPM, cosine, 1000 steps).
Video configs (rin/configs/moving_digits.py): predicts the continuation of the first
--num_samples test clips from their conditioning frames, writes an animated GIF grid
(prediction beside ground truth) and an .npz; --eval reports per-frame PSNR/SSIM, the digit
crop Frechet distance and the copy-last-frame baseline (rin.video).
With --eval, scores the samples (the digits metric on digits data; FID/IS when
config.eval.inception_path names Inception weights), prints the numbers, writes them to
<out>_metrics.json and appends them to <workdir>/metrics.jsonl as "sample/..." records.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rin import diffusion
from rin import train as train_lib
from rin import video as video_lib
from rin import xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", "rin/configs/digits.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Training workdir with checkpoints.")
_OUT = flags.DEFINE_string("out", None, "Output prefix (default <workdir>/samples/final).")
_NUM = flags.DEFINE_integer("num_samples", 64, "How many images.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default config.diffusion.sample_steps).")
_SAMPLER = flags.DEFINE_enum("sampler", None, list(diffusion.SAMPLERS),
                              "Sampler (default from config).")
_SCHEDULE = flags.DEFINE_string("schedule", None, "Sampling schedule (default from config).")
_TIME_GRID = flags.DEFINE_enum("time_grid", None, list(diffusion.TIME_GRIDS),
                               "Step grid: uniform in t or in log-SNR (default uniform).")
_TIME_DELAY = flags.DEFINE_float("time_delay", None,
                                 "The authors' td: shift each step's next time by this many "
                                 "steps (default 0).")
_GUIDANCE = flags.DEFINE_float("guidance", None,
                               "Classifier-free guidance weight w: (1+w) cond - w uncond "
                               "(default 0: none).")
_GUIDANCE_INTERVAL = flags.DEFINE_list("guidance_interval", None,
                                       "t_lo,t_hi: guide only steps with t in this range.")
_GUIDANCE_LATENTS = flags.DEFINE_enum("guidance_latents", None, list(diffusion.GUIDANCE_LATENTS),
                                      "Latents the unconditional half reads (default shared, "
                                      "the authors').")
_PROTOCOL = flags.DEFINE_enum("protocol", "", list(train_lib.EVAL_PROTOCOLS),
                              "'authors': the paper's FID protocol (DDPM, cosine, 1000 steps "
                              "or --steps); overrides the sampler flags.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_LABEL = flags.DEFINE_integer("label", None, "Class label for all samples (default: uniform).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per device call.")
_IMPL = flags.DEFINE_string("implementation", None, "Kernel implementation.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run kernels in their interpreter.")
_EVAL = flags.DEFINE_bool("eval", False, "Score the samples (digits metric / FID / IS).")


def load_ema_params(config, workdir: str, model):
  """EMA weights of the latest checkpoint in workdir (clear error when there is none)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir!r} ({ckpt_dir} is missing)")
  train_lib.check_config_matches(workdir, config)
  mngr = train_lib.checkpoint_manager(workdir, config)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}")
  abstract = jax.eval_shape(lambda: train_lib.init_state(config, model, jax.random.PRNGKey(0)))
  state, _, step = train_lib.restore_latest(mngr, abstract, workdir)
  mngr.close()
  logging.info("loaded step %d from %s", step, ckpt_dir)
  return state.ema_params, step


def evaluate_samples(config, images, labels=None, dataset=None) -> dict:
  """Metrics of samples [N,H,W,C] in [-1,1] (see rin.train.Evaluator)."""
  if not train_lib.has_eval_metric(config):
    raise ValueError(f"--eval: no metric for data set {config.data.name!r}; set "
                     "config.eval.inception_path to an Inception weights file for FID/IS")
  if dataset is None and config.get("eval", {}).get("inception_path", "") and \
      not config.eval.get("fid_reference", ""):
    dataset = train_lib.load_and_check_data(config)
  ev = train_lib.Evaluator(config, dataset)
  return ev(images, labels if config.model.num_classes > 0 else None)


def generate(config, params, model, *, num_samples: int, seed: int = 0, label=None,
             num_steps=None, sampler=None, batch_size: int = 256, **options):
  """Returns (images [N,H,W,C] in [-1,1], labels [N]).

  options: further sampling options (rin.train.sample_options: schedule, time_delay,
  time_grid, guidance, guidance_interval, guidance_latents)."""
  sample_fn = train_lib.make_sample_fn(model, config, num_steps=num_steps, sampler=sampler,
                                       **options)
  rng = jax.random.PRNGKey(seed)
  if label is not None:
    if not 0 <= label < max(config.model.num_classes, 1):
      raise ValueError(f"label={label} is outside [0, {config.model.num_classes})")
    labels = jnp.full((num_samples,), label, jnp.int32)
  else:
    labels = train_lib.draw_labels(jax.random.fold_in(rng, 1), config, num_samples)
  out = []
  for i, s in enumerate(range(0, num_samples, batch_size)):
    out.append(np.asarray(sample_fn(params, jax.random.fold_in(rng, 2 + i),
                                    labels[s:s + batch_size])))
  return np.concatenate(out), np.asarray(labels)


def main(argv):
  del argv
  config = _CONFIG.value
  # Before the first computation starts the backend: oneDNN dots (bf16: every dot) and
  # malloc settings that keep XLA's per-step temporaries mapped (rin/xla_cpu.py).
  xla_cpu.configure(config.train.get("dtype"))
  model = train_lib.create_model(config, implementation=_IMPL.value, interpret=_INTERPRET.value)
  params, step = load_ema_params(config, _WORKDIR.value, model)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", f"final_step{step}")
  if video_lib.is_video(config):     # predictions of the test clips' continuations
    if _LABEL.value is not None:
      raise ValueError("--label: video configs condition on frames, not class labels")
    if _GUIDANCE.value:
      raise ValueError("--guidance: video configs condition on frames, not class labels")
    video_lib.sample_and_write(config, params, model, step=step, workdir=_WORKDIR.value,
                               out=out, num_samples=_NUM.value, seed=_SEED.value,
                               num_steps=_STEPS.value, sampler=_SAMPLER.value,
                               batch_size=_BATCH.value, evaluate=_EVAL.value)
    return
  options = dict(sampler=_SAMPLER.value, schedule=_SCHEDULE.value, time_grid=_TIME_GRID.value,
                 time_delay=_TIME_DELAY.value, guidance=_GUIDANCE.value,
                 guidance_latents=_GUIDANCE_LATENTS.value, num_steps=_STEPS.value)
  if _GUIDANCE_INTERVAL.value is not None:
    if len(_GUIDANCE_INTERVAL.value) != 2:
      raise app.UsageError(f"--guidance_interval takes t_lo,t_hi, got {_GUIDANCE_INTERVAL.value}")
    options["guidance_interval"] = tuple(float(v) for v in _GUIDANCE_INTERVAL.value)
  options.update(train_lib.protocol_options(_PROTOCOL.value, _STEPS.value))
  options = train_lib.sample_options(config, **options)
  images, labels = generate(config, params, model, num_samples=_NUM.value, seed=_SEED.value,
                            label=_LABEL.value, batch_size=_BATCH.value, **options)
  train_lib.save_image_grid(images, out + ".png")
  np.savez(out + ".npz", images=images, labels=labels)
  print(f"wrote {len(images)} samples to {out}.png and {out}.npz")
  if _EVAL.value:
    res = evaluate_samples(config, images, labels)
    res.update(num_samples=len(images), sampler=options["sampler"],
               sample_steps=options["num_steps"], schedule=options["schedule"],
               guidance=options["guidance"], protocol=_PROTOCOL.value, checkpoint_step=step)
    with open(out + "_metrics.json", "w") as f:
      json.dump(res, f, indent=2)
    from rin import logging_utils
    writer = logging_utils.MetricWriter(_WORKDIR.value)
    writer.write(step, {k: v for k, v in res.items() if not isinstance(v, str)},
                 prefix="sample/")
    writer.close()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                      for k, v in res.items()}))


if __name__ == "__main__":
  app.run(main)
