"""Image and video files of samples: PNG grids, animated GIF grids, grey -> RGB.

Samples everywhere in rin are float [..., H, W, C] in [-1, 1]; these helpers are the one
place that turns them into pixels.
"""
from __future__ import annotations

import os

import numpy as np


def to_uint8(x) -> np.ndarray:
  """float in [-1, 1] -> uint8 in [0, 255] (clipped)."""
  return np.clip((np.asarray(x) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def grey_to_rgb(x):
  """[..., 1] -> [..., 3] by repeating the channel; other channel counts unchanged. Works on
  numpy and jax arrays alike (the Inception and FVD networks take 3 channels)."""
  return x.repeat(3, axis=-1) if x.shape[-1] == 1 else x


def _grid_shape(n: int) -> tuple[int, int]:
  cols = int(np.ceil(np.sqrt(n)))
  return int(np.ceil(n / cols)), cols


def save_image_grid(images, path: str) -> None:
  """images: [N, H, W, C] in [-1, 1] -> one PNG grid of ceil(sqrt(N)) columns."""
  from PIL import Image
  x = to_uint8(images)
  n, h, w, c = x.shape
  rows, cols = _grid_shape(n)
  grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  scale = max(1, 256 // grid.shape[0])
  img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img.save(path)


def save_video_gif(cond, pred, truth, path: str, *, max_clips: int = 16, scale: int = 2,
                   ms_per_frame: int = 150) -> None:
  """An animated GIF grid: per clip [prediction | ground truth], each starting with the
  conditioning frames; a bar above the frames is lit while frames are predicted."""
  from PIL import Image
  cond, pred, truth = (np.asarray(a)[:max_clips] for a in (cond, pred, truth))
  left = to_uint8(np.concatenate([cond, pred], 1))
  right = to_uint8(np.concatenate([cond, truth], 1))
  n, f, h, w, c = left.shape
  rows, cols = _grid_shape(n)
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
        grid[y0 + bar:y0 + bar + h, x0 + k * (w + 3):x0 + k * (w + 3) + w] = \
            grey_to_rgb(src[i, t])
    img = Image.fromarray(grid)
    frames.append(img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
