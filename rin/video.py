"""Video prediction with VideoRIN: what the train state, sampling, evaluation and the loop
need to know about video configs.

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

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rin import distributed
from rin import images
from rin import video_data
from rin.model import VideoRIN


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
  if m.num_classes:
    raise ValueError("VideoRIN conditions on frames, not classes: config.model.num_classes "
                     f"must be 0, got {m.num_classes}")


def load_and_check_data(config: ConfigDict, split: str = "train") -> video_data.VideoDataset:
  check_model_config(config)
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


def write_training_samples(config: ConfigDict, sample_fn, params, rng, workdir: str, step: int,
                           writer=None) -> str | None:
  """During training: predict the first test clips (at most 16) and write samples/step_N.gif."""
  n = min(16, int(config.train.num_sample_images))
  clips, _ = test_clips(config, n)
  fc = config.model.cond_frames
  pred = distributed.to_host(sample_fn(params, rng, jnp.asarray(clips[:, :fc])))
  if not distributed.is_primary():
    return None
  cond, truth = split_clip(clips, fc)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.gif")
  images.save_video_gif(cond, np.asarray(pred), truth, path)
  return path
