"""Video prediction with VideoRIN: the pieces rin.train and rin.sample dispatch to.

A config is a video config when ``config.model`` has ``num_frames`` (rin/configs/
moving_digits.py, kinetics600.py). Batches keep the image pipeline's layout,
``{"image": float [B, F, H, W, C] in [-1, 1], "label"}``: the first ``cond_frames`` frames of
each clip condition the model (the class labels' argument slot, as in the authors' code) and
the rest are noised and predicted. Samples are written as an animated GIF grid (per clip:
the prediction on the left, the ground truth on the right, both starting with the
conditioning frames; a bar above the frames is lit while the frames are predicted) and an .npz.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rin import video_data


def is_video(config: ConfigDict) -> bool:
  return "num_frames" in config.model


def pred_frames(config: ConfigDict) -> int:
  return config.model.num_frames - config.model.cond_frames


def split_clip(clips, cond_frames: int):
  """[B, F, ...] -> (conditioning frames [B, Fc, ...], frames to predict [B, F - Fc, ...])."""
  return clips[:, :cond_frames], clips[:, cond_frames:]


def dummy_inputs(config: ConfigDict, batch: int = 1):
  m = config.model
  frame = (m.image_size, m.image_size, m.channels)
  return (jnp.zeros((batch, m.num_frames - m.cond_frames) + frame, jnp.float32),
          jnp.ones((batch,), jnp.float32),
          jnp.zeros((batch, m.cond_frames) + frame, jnp.float32))


def check_model_config(config: ConfigDict) -> None:
  """The config-level rules of VideoRIN, checked before any data is built."""
  m = config.model
  for name in ("num_frames", "cond_frames", "tubelet_frames"):
    if name not in m:
      raise ValueError(f"video config: config.model.{name} is missing")
  if not 0 <= m.cond_frames < m.num_frames:
    raise ValueError(f"config.model.cond_frames={m.cond_frames} must be >= 0 and fewer than "
                     f"config.model.num_frames={m.num_frames}")
  if m.image_size % m.patch_size:
    raise ValueError(f"config.model.image_size={m.image_size} is not divisible by "
                     f"config.model.patch_size={m.patch_size}")
  if m.get("num_classes", 0):
    raise ValueError("VideoRIN conditions on frames, not classes: config.model.num_classes "
                     f"must be 0, got {m.num_classes}")


def load_and_check_data(config: ConfigDict, split: str = "train") -> video_data.VideoDataset:
  check_model_config(config)
  from rin.model import VideoRIN
  model = VideoRIN(**config.model.to_dict())      # every model rule, before any data or file
  jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))
  m = config.model
  ds = video_data.load_video_dataset(config, split)
  if ds.num_frames != m.num_frames:
    raise ValueError(f"data set {config.data.name!r} yields clips of {ds.num_frames} frames "
                     f"but config.model.num_frames={m.num_frames}")
  if ds.frame_shape != (m.image_size, m.image_size, m.channels):
    raise ValueError(f"data set {config.data.name!r} yields frames of {ds.frame_shape}, the "
                     f"model expects {(m.image_size, m.image_size, m.channels)}")
  if split == "train" and config.train.batch_size > len(ds):
    raise ValueError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                     f"{len(ds)} training clips of {config.data.name!r}")
  return ds


def as_model_inputs(clips_u8) -> np.ndarray:
  return np.asarray(clips_u8, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def test_clips(config: ConfigDict, n: int):
  """The first n clips of the test split (float [-1, 1]) and their digit positions or None."""
  try:
    ds = load_and_check_data(config, "test")
  except FileNotFoundError:
    if config.data.name != "video_folder":
      raise
    ds = load_and_check_data(config, "train")   # a folder without a test split
  n = min(int(n), len(ds))
  pos = None if ds.positions is None else ds.positions[:n]
  return as_model_inputs(ds.images[:n]), pos


def predict(sample_fn, params, clips, *, seed: int, batch_size: int, cond_frames: int):
  """Predictions [N, F - Fc, H, W, C] for the continuation of each clip's first frames."""
  rng = jax.random.PRNGKey(seed)
  out = []
  for i, s in enumerate(range(0, len(clips), batch_size)):
    cond = jnp.asarray(clips[s:s + batch_size, :cond_frames])
    out.append(np.asarray(jax.device_get(sample_fn(params, jax.random.fold_in(rng, 2 + i), cond))))
  return np.concatenate(out)


class VideoEvaluator:
  """Prediction metrics on the test clips (rin.video_metrics.video_metrics)."""

  def __init__(self, config: ConfigDict):
    from rin import video_metrics
    ev = config.get("eval", ConfigDict())
    self.config = config
    self.clips, self.positions = test_clips(config, ev.get("num_samples", 256))
    self.crop_fd = None
    from rin import distributed
    if self.positions is not None and ev.get("digits", True) and distributed.is_primary():
      self.crop_fd = video_metrics.DigitCropFD(config.data.get("digit_size", 8))
    path = ev.get("fvd_network_path", "")
    self.fvd = video_metrics.FVDEvaluator(path) if path else None

  def __call__(self, sample_fn, params, *, seed: int, batch_size: int) -> tuple[dict, Any]:
    from rin import video_metrics
    fc = self.config.model.cond_frames
    pred = predict(sample_fn, params, self.clips, seed=seed, batch_size=batch_size,
                   cond_frames=fc)
    from rin import distributed
    if not distributed.is_primary():
      return {}, pred
    cond, truth = split_clip(self.clips, fc)
    pos = None if self.positions is None else self.positions[:, fc:]
    res = video_metrics.video_metrics(pred, truth, cond, positions=pos, crop_fd=self.crop_fd,
                                      fvd=self.fvd)
    return res, pred


def save_video_gif(cond, pred, truth, path: str, *, max_clips: int = 16, scale: int = 2,
                   ms_per_frame: int = 150) -> None:
  """An animated GIF grid: per clip [prediction | ground truth], each starting with the
  conditioning frames; a bar above the frames is lit while frames are predicted."""
  from PIL import Image
  cond, pred, truth = (np.asarray(a)[:max_clips] for a in (cond, pred, truth))
  to_u8 = lambda a: np.clip((a + 1.0) * 127.5, 0, 255).astype(np.uint8)
  left = to_u8(np.concatenate([cond, pred], 1))
  right = to_u8(np.concatenate([cond, truth], 1))
  n, f, h, w, c = left.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  bar = 3
  cell_h, cell_w = h + bar + 2, 2 * w + 3
  frames = []
  for t in range(f):
    grid = np.full((rows * cell_h + 1, cols * (cell_w + 2) + 1, 3), 40, np.uint8)
    for i in range(n):
      r, q = divmod(i, cols)
      y0, x0 = 1 + r * cell_h, 1 + q * (cell_w + 2)
      if t >= cond.shape[1]:
        grid[y0:y0 + bar - 1, x0:x0 + w] = (230, 60, 60)          # predicting
      grid[y0:y0 + bar - 1, x0 + w + 3:x0 + 2 * w + 3] = (60, 160, 230) if t >= cond.shape[1] \
          else (40, 40, 40)
      for k, src in enumerate((left, right)):
        px = src[i, t]
        px = np.repeat(px, 3, -1) if c == 1 else px
        grid[y0 + bar:y0 + bar + h, x0 + k * (w + 3):x0 + k * (w + 3) + w] = px
    img = Image.fromarray(grid)
    frames.append(img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def write_training_samples(config: ConfigDict, sample_fn, params, rng, workdir: str, step: int,
                           writer=None) -> str | None:
  """During training: predict the first test clips (at most 16) and write samples/step_N.gif."""
  from rin import distributed
  n = min(16, int(config.train.num_sample_images))
  clips, _ = test_clips(config, n)
  fc = config.model.cond_frames
  pred = distributed.to_host(sample_fn(params, rng, jnp.asarray(clips[:, :fc])))
  if not distributed.is_primary():
    return None
  cond, truth = split_clip(clips, fc)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.gif")
  save_video_gif(cond, np.asarray(pred), truth, path)
  return path


def sample_and_write(config: ConfigDict, params, model, *, step: int, workdir: str, out: str,
                     num_samples: int, seed: int = 0, num_steps=None, sampler=None,
                     batch_size: int = 256, evaluate: bool = False) -> dict | None:
  """rin.sample for video configs: predict the continuation of the first `num_samples` test
  clips, write <out>.gif and <out>.npz (cond, predictions, truth in [-1, 1]); with
  `evaluate`, the prediction metrics to <out>_metrics.json and <workdir>/metrics.jsonl."""
  import json

  from rin import logging_utils, video_metrics
  from rin import train as train_lib
  sample_fn = train_lib.make_sample_fn(model, config, num_steps=num_steps, sampler=sampler)
  clips, positions = test_clips(config, num_samples)
  fc = config.model.cond_frames
  pred = predict(sample_fn, params, clips, seed=seed, batch_size=batch_size, cond_frames=fc)
  cond, truth = split_clip(clips, fc)
  save_video_gif(cond, pred, truth, out + ".gif")
  np.savez(out + ".npz", cond=cond, predictions=pred, truth=truth)
  print(f"wrote {len(pred)} predicted clips to {out}.gif and {out}.npz")
  if not evaluate:
    return None
  ev = config.get("eval", ConfigDict())
  crop_fd = None
  if positions is not None and ev.get("digits", True):
    crop_fd = video_metrics.DigitCropFD(config.data.get("digit_size", 8))
  path = ev.get("fvd_network_path", "")
  res = video_metrics.video_metrics(
      pred, truth, cond, positions=None if positions is None else positions[:, fc:],
      crop_fd=crop_fd, fvd=video_metrics.FVDEvaluator(path) if path else None)
  res.update(num_samples=len(pred), sampler=sampler or config.diffusion.sampler,
             sample_steps=num_steps or config.diffusion.sample_steps, checkpoint_step=step,
             seed=seed)
  with open(out + "_metrics.json", "w") as f:
    json.dump(res, f, indent=2)
  writer = logging_utils.MetricWriter(workdir)
  writer.write(step, {k: v for k, v in res.items() if k != "sampler"}, prefix="sample/")
  writer.close()
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                    if not k.endswith("per_frame")}))
  return res
