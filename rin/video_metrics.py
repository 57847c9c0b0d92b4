"""Video-prediction metrics with no download, and FVD from a user-supplied feature network.

All functions take videos as float arrays [B, F, H, W, C] in [-1, 1] (clipped).

* ``per_frame_mse_psnr``: MSE and PSNR (peak 1, pixels mapped to [0, 1]) per predicted frame,
  PSNR computed per clip and frame, then averaged over clips.
* ``ssim``: the structural similarity of Wang et al. (2004) with their constants: an 11x11
  Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, the mean of the SSIM map
  over the "valid" region (no padding), channels averaged. Per frame.
* ``DigitCropFD``: moving digits only. The true continuation's digit positions are known, so
  the digit boxes are cut out of the predicted frames at those positions and scored by
  rin.metrics.DigitsEvaluator (the no-download digits classifier, at the digit size): the
  Frechet distance of their features to the real training digits', per frame. A prediction
  whose digit drifted away or blurred scores high; the true continuation gives the floor.
* ``FVDEvaluator``: the Frechet distance between feature statistics of real and generated
  videos, as FVD (Unterthiner et al., 2018) is defined, with the feature network given as a
  file (like FID's Inception weights; nothing is downloaded). The file is a serialised
  ``jax.export.Exported`` (``exported.serialize()`` bytes, conventionally ``*.jax_export``) of
  a function ``videos float32 [B, F, S, S, 3] in [-1, 1] -> features float32 [B, D]``, for
  FVD proper an I3D trained on Kinetics-400 with the 400 logits as features (F = 16,
  S = 224). Batch size may be fixed or symbolic in the export; clips are resized
  (bilinear) to S, grey is repeated to RGB, and F must match.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from rin.images import grey_to_rgb
from rin.metrics import feature_statistics, frechet_distance


def _check_videos(name: str, v, shape=None) -> np.ndarray:
  v = np.asarray(v, np.float64)
  if v.ndim != 5:
    raise ValueError(f"{name} must be videos [B, F, H, W, C], got shape {v.shape}")
  if shape is not None and v.shape != shape:
    raise ValueError(f"{name} has shape {v.shape}, expected {shape}")
  if not np.all(np.isfinite(v)):
    raise ValueError(f"{name} contains NaN or Inf")
  return (np.clip(v, -1.0, 1.0) + 1.0) / 2.0


def per_frame_mse_psnr(pred, truth) -> tuple[np.ndarray, np.ndarray]:
  """(MSE [F], PSNR dB [F]) of predictions vs the truth, both [B, F, H, W, C] in [-1, 1]."""
  t = _check_videos("truth", truth)
  p = _check_videos("pred", pred, t.shape)
  mse = np.mean((p - t) ** 2, axis=(2, 3, 4))                    # [B, F]
  psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))
  return mse.mean(0), psnr.mean(0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of the two axes before the last of x [..., H, W, C]."""
  k = len(w)
  h, wd = x.shape[-3], x.shape[-2]
  y = sum(w[i] * x[..., i:h - k + 1 + i, :, :] for i in range(k))
  return sum(w[i] * y[..., :, i:wd - k + 1 + i, :] for i in range(k))


def ssim(pred, truth, *, window: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Mean SSIM per frame [F] (module doc); frames must be at least `window` pixels."""
  t = _check_videos("truth", truth)
  p = _check_videos("pred", pred, t.shape)
  if min(t.shape[2:4]) < window:
    raise ValueError(f"ssim: frames of {t.shape[2:4]} are smaller than the {window}x{window} "
                     "window")
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  w = _gaussian_window(window, sigma)
  mu_p, mu_t = _filter_valid(p, w), _filter_valid(t, w)
  s_pp = _filter_valid(p * p, w) - mu_p ** 2
  s_tt = _filter_valid(t * t, w) - mu_t ** 2
  s_pt = _filter_valid(p * t, w) - mu_p * mu_t
  m = ((2 * mu_p * mu_t + c1) * (2 * s_pt + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (s_pp + s_tt + c2))
  return m.mean(axis=(0, 2, 3, 4))


def _conditioning(what: str, cond) -> np.ndarray:
  c = np.asarray(cond)
  if c.ndim != 5 or c.shape[1] < 1:
    raise ValueError(f"{what}: cond must be [B, Fc >= 1, H, W, C], got {c.shape}")
  return c


def copy_last_frame(cond, num_frames: int) -> np.ndarray:
  """The baseline prediction: the last conditioning frame repeated `num_frames` times."""
  c = _conditioning("copy_last_frame", cond)
  return np.repeat(c[:, -1:], num_frames, axis=1)


def blank_frames(cond, num_frames: int) -> np.ndarray:
  """The second baseline: every predicted frame is the conditioning frames' darkest value
  per pixel (the background where no digit passed). Copy-last wins over the first frames
  (the digit has barely moved), blank frames win once the digit has moved off its old
  place (copy-last then pays for it twice: where it was and where it is); a model that
  predicts motion beats both."""
  c = _conditioning("blank_frames", cond)
  return np.repeat(c.min(axis=1, keepdims=True), num_frames, axis=1)


class DigitCropFD:
  """Per-frame digits Frechet distance of predicted moving-digits frames (module doc)."""

  def __init__(self, digit_size: int):
    from rin.metrics import DigitsEvaluator
    self.digit_size = int(digit_size)
    self.evaluator = DigitsEvaluator(self.digit_size)

  def crops(self, videos, positions) -> np.ndarray:
    """The d x d boxes at `positions` [B, F, K, 2] of videos [B, F, H, W, C] -> [F, B*K, d, d, C]."""
    v = np.asarray(videos, np.float64)
    pos = np.asarray(positions)
    b, f = v.shape[:2]
    if pos.ndim != 4 or pos.shape[:2] != (b, f) or pos.shape[3] != 2:
      raise ValueError(f"positions must be [B={b}, F={f}, K, 2], got {pos.shape}")
    d = self.digit_size
    out = np.empty((f, b * pos.shape[2], d, d, v.shape[-1]))
    for j in range(f):
      for i in range(b):
        for k in range(pos.shape[2]):
          r, c = pos[i, j, k]
          out[j, i * pos.shape[2] + k] = v[i, j, r:r + d, c:c + d]
    return out

  def __call__(self, videos, positions) -> np.ndarray:
    """Frechet distance [F] of the crops' features to the real training digits'."""
    crops = self.crops(videos, positions)
    fd = []
    for frame in crops:
      feats, _ = self.evaluator.features(frame)
      fd.append(frechet_distance(*feature_statistics(feats), self.evaluator.mu,
                                 self.evaluator.sigma))
    return np.asarray(fd)


def video_metrics(pred, truth, cond, *, positions=None, crop_fd: DigitCropFD | None = None,
                  fvd: "FVDEvaluator | None" = None) -> dict[str, Any]:
  """Metrics of predictions vs the true continuation, two baselines beside (copy the last
  conditioning frame; blank frames, `blank_frames`).

  pred, truth: [B, F - Fc, H, W, C]; cond: [B, Fc, H, W, C]; all in [-1, 1].
  positions: the true continuation's digit positions [B, F - Fc, K, 2] (for crop_fd).
  Scalars are means over predicted frames; *_per_frame lists hold each frame's value.
  """
  t = np.asarray(truth)
  baselines = {"copy_last_": copy_last_frame(cond, t.shape[1]),
               "blank_": blank_frames(cond, t.shape[1])}
  out: dict[str, Any] = {}
  for name, p in (("", pred), *baselines.items()):
    mse, psnr = per_frame_mse_psnr(p, t)
    out[name + "mse"] = float(mse.mean())
    out[name + "psnr"] = float(psnr.mean())
    out[name + "psnr_per_frame"] = [round(float(x), 3) for x in psnr]
    if min(t.shape[2:4]) >= 11:
      s = ssim(p, t)
      out[name + "ssim"] = float(s.mean())
      out[name + "ssim_per_frame"] = [round(float(x), 4) for x in s]
    if crop_fd is not None and positions is not None:
      fd = crop_fd(p, positions)
      out[name + "digits_fd"] = float(fd.mean())
      out[name + "digits_fd_per_frame"] = [round(float(x), 2) for x in fd]
  if crop_fd is not None and positions is not None:
    out["truth_digits_fd"] = float(crop_fd(t, positions).mean())
  if fvd is not None:
    c = np.asarray(cond)
    full_p = np.concatenate([c, np.asarray(pred)], 1)
    full_t = np.concatenate([c, t], 1)
    out["fvd"] = fvd(full_p, full_t)
  return out


# --------------------------------------------------------------------------------------
# FVD
# --------------------------------------------------------------------------------------

def fvd_from_features(features_a, features_b) -> float:
  """FVD = Frechet distance of the Gaussian fits of two feature sets [N, D]."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"features must be [N, D] with the same D, got {a.shape} and {b.shape}")
  if min(len(a), len(b)) < 2:
    raise ValueError("FVD needs at least 2 videos per set")
  return frechet_distance(*feature_statistics(a), *feature_statistics(b))


class FVDEvaluator:
  """FVD with the feature network from `network_path` (a serialised jax.export; module doc)."""

  def __init__(self, network_path: str, *, batch_size: int = 16):
    import jax
    if not network_path or not os.path.isfile(network_path):
      raise FileNotFoundError(f"FVDEvaluator: network_path={network_path!r} is not a file "
                              "(a serialised jax.export of the I3D feature network)")
    with open(network_path, "rb") as f:
      blob = f.read()
    try:
      self.exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001 -- any failure means "not such a file"
      raise ValueError(f"FVDEvaluator: {network_path!r} is not a serialised jax.export "
                       f"({type(e).__name__}: {e})") from e
    if len(self.exported.in_avals) != 1 or len(self.exported.in_avals[0].shape) != 5:
      raise ValueError(f"FVDEvaluator: the exported function must take one [B, F, S, S, 3] "
                       f"array, it takes {self.exported.in_avals}")
    shape = self.exported.in_avals[0].shape
    self.num_frames, self.size = int(shape[1]), int(shape[2])
    self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
    self.batch_size = self.fixed_batch or batch_size

  def features(self, videos) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    v = np.asarray(videos, np.float32)
    if v.ndim != 5 or v.shape[1] != self.num_frames:
      raise ValueError(f"FVDEvaluator: videos must be [B, {self.num_frames}, H, W, C] (the "
                       f"network's frame count), got {v.shape}")
    v = grey_to_rgb(v)
    out = []
    for s in range(0, len(v), self.batch_size):
      x = jnp.asarray(np.clip(v[s:s + self.batch_size], -1, 1))
      n = x.shape[0]
      if x.shape[2:4] != (self.size, self.size):
        x = jax.image.resize(x, (n, x.shape[1], self.size, self.size, 3), "bilinear")
      if self.fixed_batch and n < self.fixed_batch:
        x = jnp.concatenate([x, jnp.zeros((self.fixed_batch - n,) + x.shape[1:], x.dtype)])
      out.append(np.asarray(self.exported.call(x))[:n])
    return np.concatenate(out)

  def __call__(self, generated, real) -> float:
    return fvd_from_features(self.features(generated), self.features(real))
