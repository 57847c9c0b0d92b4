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
Logs as rin.train (--verbosity=0 adds the libraries' INFO logs).

The sampling and evaluation themselves are library code (rin.sampling, rin.evaluation);
this module holds the flags, the process setup and the files it writes.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rin import diffusion
from rin import evaluation
from rin import images
from rin import logging_utils
from rin import sampling
from rin import video as video_lib
from rin import xla_cpu
from rin.train_state import create_model, load_ema_params

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
_PROTOCOL = flags.DEFINE_enum("protocol", "", list(sampling.EVAL_PROTOCOLS),
                              "'authors': the paper's FID protocol (DDPM, cosine, 1000 steps "
                              "or --steps); overrides the sampler flags.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_LABEL = flags.DEFINE_integer("label", None, "Class label for all samples (default: uniform).")
_BY_CLASS = flags.DEFINE_bool("by_class", False, "Labels class by class (with --num_samples "
                              "= classes^2 each grid row is one class).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per device call.")
_IMPL = flags.DEFINE_string("implementation", None, "Kernel implementation.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run kernels in their interpreter.")
_EVAL = flags.DEFINE_bool("eval", False, "Score the samples (digits metric / FID / IS).")


def _record(workdir: str, out: str, step: int, res: dict) -> None:
  """--eval: the metrics to <out>_metrics.json, to <workdir>/metrics.jsonl as "sample/..."
  records (numbers only), and one JSON line on stdout (per-frame lists left out)."""
  with open(out + "_metrics.json", "w") as f:
    json.dump(res, f, indent=2)
  writer = logging_utils.MetricWriter(workdir)
  writer.write(step, {k: v for k, v in res.items() if not isinstance(v, str)}, prefix="sample/")
  writer.close()
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                    if not k.endswith("per_frame")}))


def sample_video(config, params, model, *, step: int, workdir: str, out: str,
                 num_samples: int, seed: int = 0, num_steps=None, sampler=None,
                 batch_size: int = 256, evaluate: bool = False) -> dict | None:
  """Video configs: predict the continuation of the first `num_samples` test clips, write
  <out>.gif and <out>.npz (cond, predictions, truth in [-1, 1]); with `evaluate`, the
  prediction metrics (rin.evaluation.VideoEvaluator)."""
  sample_fn = sampling.make_sample_fn(model, config, num_steps=num_steps, sampler=sampler)
  ev = evaluation.VideoEvaluator(config, num_samples)
  pred = ev.predict(sample_fn, params, seed=seed, batch_size=batch_size)
  cond, truth = video_lib.split_clip(ev.clips, config.model.cond_frames)
  images.save_video_gif(cond, pred, truth, out + ".gif")
  np.savez(out + ".npz", cond=cond, predictions=pred, truth=truth)
  print(f"wrote {len(pred)} predicted clips to {out}.gif and {out}.npz")
  if not evaluate:
    return None
  res = ev.score(pred)
  res.update(num_samples=len(pred), sampler=sampler or config.diffusion.sampler,
             sample_steps=num_steps or config.diffusion.sample_steps, checkpoint_step=step,
             seed=seed)
  _record(workdir, out, step, res)
  return res


def main(argv):
  del argv
  config = _CONFIG.value
  # Before the first computation starts the backend: oneDNN dots (bf16: every dot) and
  # malloc settings that keep XLA's per-step temporaries mapped (rin/xla_cpu.py).
  xla_cpu.configure(config.train.dtype)
  logging_utils.quiet_library_logs()
  model = create_model(config, implementation=_IMPL.value, interpret=_INTERPRET.value)
  params, step = load_ema_params(config, _WORKDIR.value, model)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", f"final_step{step}")
  if video_lib.is_video(config):     # predictions of the test clips' continuations
    if _LABEL.value is not None:
      raise ValueError("--label: video configs condition on frames, not class labels")
    if _GUIDANCE.value:
      raise ValueError("--guidance: video configs condition on frames, not class labels")
    sample_video(config, params, model, step=step, workdir=_WORKDIR.value, out=out,
                 num_samples=_NUM.value, seed=_SEED.value, num_steps=_STEPS.value,
                 sampler=_SAMPLER.value, batch_size=_BATCH.value, evaluate=_EVAL.value)
    return
  options = dict(sampler=_SAMPLER.value, schedule=_SCHEDULE.value, time_grid=_TIME_GRID.value,
                 time_delay=_TIME_DELAY.value, guidance=_GUIDANCE.value,
                 guidance_latents=_GUIDANCE_LATENTS.value, num_steps=_STEPS.value)
  if _GUIDANCE_INTERVAL.value is not None:
    if len(_GUIDANCE_INTERVAL.value) != 2:
      raise app.UsageError(f"--guidance_interval takes t_lo,t_hi, got {_GUIDANCE_INTERVAL.value}")
    options["guidance_interval"] = tuple(float(v) for v in _GUIDANCE_INTERVAL.value)
  options.update(sampling.protocol_options(_PROTOCOL.value, _STEPS.value))
  options = sampling.sample_options(config, **options)
  samples, labels = sampling.generate(config, params, model, num_samples=_NUM.value,
                                      seed=_SEED.value, label=_LABEL.value,
                                      by_class=_BY_CLASS.value, batch_size=_BATCH.value,
                                      **options)
  images.save_image_grid(samples, out + ".png")
  np.savez(out + ".npz", images=samples, labels=labels)
  print(f"wrote {len(samples)} samples to {out}.png and {out}.npz")
  if _EVAL.value:
    res = evaluation.evaluate_samples(config, samples, labels)
    res.update(num_samples=len(samples), sampler=options["sampler"],
               sample_steps=options["num_steps"], schedule=options["schedule"],
               guidance=options["guidance"], protocol=_PROTOCOL.value, checkpoint_step=step)
    _record(_WORKDIR.value, out, step, res)


if __name__ == "__main__":
  app.run(main)
