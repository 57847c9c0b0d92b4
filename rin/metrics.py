"""Evaluation metrics: Frechet distance, FID, Inception Score, and a no-download digits metric.

* ``frechet_distance`` -- the FID formula on Gaussian statistics, computed as
  the reference FID code (TTUR / pytorch-fid) does: ``scipy.linalg.sqrtm`` of
  ``sigma1 @ sigma2``, an ``eps`` ridge when that is not finite, and the
  imaginary part dropped when it is numerically zero.
* ``InceptionV3`` -- the FID Inception-v3 network (pytorch-fid's
  ``FIDInceptionV3``, itself a port of the TF FID graph) written in
  ``jax.numpy``. Its weights come from a file the user supplies (nothing can
  be downloaded here); see ``InceptionV3`` for the format and a two-line
  conversion from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or that .pth directly with torch).
  It returns the 2048-d pool3 features (FID) and the 1008 class logits (IS).
* ``FIDEvaluator`` -- FID (and IS when logits are available) of samples
  against reference statistics, with the Inception network or any
  user-supplied ``feature_fn``.
* ``inception_score`` -- IS from class logits, with the usual splits.
* ``DigitsEvaluator`` -- needs no download: a small MLP classifier trained on
  the real sklearn digits; reports the Frechet distance of samples to real
  digits in its hidden-feature space ("digits FD"), the class histogram of
  samples with its entropy and KL to uniform, the mean confidence, a
  classifier-based Inception Score and, for class-conditional samples, the
  accuracy w.r.t. the requested labels.

Why one module over 400 lines: most of it is the Inception-v3 port (its layer table and
forward), which only FID uses; FID, IS and the digits metric share the Frechet distance
and statistics at the top, so they stay together.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.linalg

from rin.images import grey_to_rgb

# --------------------------------------------------------------------------------------
# Frechet distance and statistics
# --------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [F] and covariance [F, F] (unbiased, float64) of features [N, F]."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f"feature_statistics: features must be [N, F], got shape {f.shape}")
  if f.shape[0] < 2:
    raise ValueError(f"feature_statistics: need at least 2 feature vectors, got {f.shape[0]}")
  if not np.all(np.isfinite(f)):
    raise ValueError("feature_statistics: features contain NaN or Inf")
  return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, as the
  standard FID code computes it (float64, ``eps * I`` added to both
  covariances if the square root is not finite, imaginary parts dropped when
  the diagonal's are below 1e-3, a ValueError otherwise).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError("frechet_distance: expected mu1, mu2 of shape [F] and sigma1, sigma2 of "
                     f"shape [F, F]; got {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
                     f"{sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"frechet_distance: {name} contains NaN or Inf")
  diff = mu1 - mu2
  with warnings.catch_warnings():  # singular products are handled below, as in TTUR
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.all(np.isfinite(covmean)):
      warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariance "
                    "diagonals", RuntimeWarning, stacklevel=2)
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError(f"frechet_distance: imaginary component {m} in sqrtm(sigma1 sigma2)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def save_statistics(path: str, mu, sigma) -> None:
  """Writes reference statistics as ``.npz`` with arrays ``mu`` and ``sigma``.

  The same format as the precomputed statistics of TTUR and pytorch-fid
  (``fid_stats_cifar10_train.npz``), which ``load_statistics`` also reads.
  """
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``mu`` [F] and ``sigma`` [F, F] from an ``.npz`` file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_statistics: reference statistics file {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:  # noqa: BLE001 -- zip/format errors: malformed file
    raise ValueError(f"load_statistics: {path!r} is not a readable .npz file: {e}") from e
  if "mu" not in arrays or "sigma" not in arrays:
    raise ValueError(f"load_statistics: {path!r} must hold arrays 'mu' and 'sigma', "
                     f"it holds {sorted(arrays)}")
  mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"load_statistics: {path!r}: expected mu [F] and sigma [F, F], got "
                     f"{mu.shape} and {sigma.shape}")
  return mu, sigma


# --------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score from class logits [N, K]: (mean, std) over ``num_splits`` splits.

  For each split, ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the
  split's mean prediction (the original IS definition; Salimans et al. 2016
  use 10 splits of 50k samples). Pass log-probabilities or probabilities'
  logs just as well: only softmax(logits) is used.
  """
  lg = np.asarray(logits, np.float64)
  if lg.ndim != 2 or lg.shape[1] < 1:
    raise ValueError(f"inception_score: logits must be [N, K], got shape {lg.shape}")
  if not isinstance(num_splits, (int, np.integer)) or not 1 <= num_splits <= lg.shape[0]:
    raise ValueError(f"inception_score: num_splits must be in [1, N={lg.shape[0]}], "
                     f"got {num_splits!r}")
  if np.isnan(lg).any() or np.isposinf(lg).any():
    raise ValueError("inception_score: logits contain NaN or +Inf")
  logp = _log_softmax(lg)
  scores = []
  for part in np.array_split(logp, num_splits):
    p = np.exp(part)
    log_py = np.log(p.mean(0) + 1e-300)
    kl = np.sum(p * (part - log_py[None]), axis=1, where=p > 0)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------
# FID Inception-v3 in jax.numpy, weights from a user-supplied file
# --------------------------------------------------------------------------------------

_BN_EPS = 1e-3
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1008


def _inception_conv_specs() -> dict[str, tuple[int, int, int, int]]:
  """name -> (in_channels, out_channels, kernel_h, kernel_w) for every conv+BN layer."""
  s: dict[str, tuple[int, int, int, int]] = {}

  def add(name, cin, cout, kh, kw=None):
    s[name] = (cin, cout, kh, kh if kw is None else kw)

  add("Conv2d_1a_3x3", 3, 32, 3)
  add("Conv2d_2a_3x3", 32, 32, 3)
  add("Conv2d_2b_3x3", 32, 64, 3)
  add("Conv2d_3b_1x1", 64, 80, 1)
  add("Conv2d_4a_3x3", 80, 192, 3)
  for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    add(f"{name}.branch1x1", cin, 64, 1)
    add(f"{name}.branch5x5_1", cin, 48, 1)
    add(f"{name}.branch5x5_2", 48, 64, 5)
    add(f"{name}.branch3x3dbl_1", cin, 64, 1)
    add(f"{name}.branch3x3dbl_2", 64, 96, 3)
    add(f"{name}.branch3x3dbl_3", 96, 96, 3)
    add(f"{name}.branch_pool", cin, pool, 1)
  add("Mixed_6a.branch3x3", 288, 384, 3)
  add("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
  add("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
  add("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    add(f"{name}.branch1x1", 768, 192, 1)
    add(f"{name}.branch7x7_1", 768, c7, 1)
    add(f"{name}.branch7x7_2", c7, c7, 1, 7)
    add(f"{name}.branch7x7_3", c7, 192, 7, 1)
    add(f"{name}.branch7x7dbl_1", 768, c7, 1)
    add(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
    add(f"{name}.branch7x7dbl_3", c7, c7, 1, 7)
    add(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
    add(f"{name}.branch7x7dbl_5", c7, 192, 1, 7)
    add(f"{name}.branch_pool", 768, 192, 1)
  add("Mixed_7a.branch3x3_1", 768, 192, 1)
  add("Mixed_7a.branch3x3_2", 192, 320, 3)
  add("Mixed_7a.branch7x7x3_1", 768, 192, 1)
  add("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
  add("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
  add("Mixed_7a.branch7x7x3_4", 192, 192, 3)
  for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    add(f"{name}.branch1x1", cin, 320, 1)
    add(f"{name}.branch3x3_1", cin, 384, 1)
    add(f"{name}.branch3x3_2a", 384, 384, 1, 3)
    add(f"{name}.branch3x3_2b", 384, 384, 3, 1)
    add(f"{name}.branch3x3dbl_1", cin, 448, 1)
    add(f"{name}.branch3x3dbl_2", 448, 384, 3)
    add(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3)
    add(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
    add(f"{name}.branch_pool", cin, 192, 1)
  return s


def inception_weight_shapes() -> dict[str, tuple[int, ...]]:
  """Every array the Inception weights file must hold, with its (PyTorch-layout) shape."""
  out: dict[str, tuple[int, ...]] = {}
  for name, (cin, cout, kh, kw) in _inception_conv_specs().items():
    out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for p in ("weight", "bias", "running_mean", "running_var"):
      out[f"{name}.bn.{p}"] = (cout,)
  out["fc.weight"] = (INCEPTION_NUM_CLASSES, INCEPTION_FEATURE_DIM)
  out["fc.bias"] = (INCEPTION_NUM_CLASSES,)
  return out


def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state_dict file (pytorch-fid's ``pt_inception-2015-12-05-*.pth``) as numpy
  arrays; needs torch, and reads tensors only (``weights_only=True``: no pickled code)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Inception weights file {path!r} is a PyTorch .pth: reading it needs "
                      "torch (pip install torch), or convert it to .npz elsewhere (see "
                      "rin.metrics.InceptionV3)") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- unpickling/format errors: malformed file
    raise ValueError(f"Inception weights file {path!r} is not a readable PyTorch "
                     f"state_dict: {e}") from e
  if not isinstance(sd, dict):
    raise ValueError(f"Inception weights file {path!r} holds a {type(sd).__name__}, not a "
                     "state_dict (a dict of tensors)")
  return {k: v.detach().cpu().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_inception_weights(path: str) -> dict[str, np.ndarray]:
  """Reads and checks the Inception weights: a ``.npz`` (see ``InceptionV3``) or
  pytorch-fid's published ``pt_inception-2015-12-05-6726825d.pth`` itself (``.pth`` /
  ``.pt``, converted on load; needs torch)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights file {path!r} does not exist. No weights can be downloaded here: "
        "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth (read with torch) or its "
        ".npz conversion (see rin.metrics.InceptionV3)")
  if path.endswith((".pth", ".pt")):
    arrays = _load_torch_state_dict(path)
  else:
    try:
      with np.load(path, allow_pickle=False) as f:
        arrays = {k: np.asarray(f[k]) for k in f.files}
    except Exception as e:  # noqa: BLE001 -- zip/format errors: malformed file
      raise ValueError(f"Inception weights file {path!r} is not a readable .npz: {e}") from e
  shapes = inception_weight_shapes()
  missing = sorted(set(shapes) - set(arrays))
  if missing:
    raise ValueError(f"Inception weights file {path!r} lacks {len(missing)} of the "
                     f"{len(shapes)} expected arrays, e.g. {missing[:5]}")
  bad = [f"{k}: {arrays[k].shape} (expected {s})" for k, s in shapes.items()
         if arrays[k].shape != s]
  if bad:
    raise ValueError(f"Inception weights file {path!r} has arrays of the wrong shape: "
                     + "; ".join(bad[:5]))
  nonfinite = [k for k in shapes if not np.all(np.isfinite(arrays[k]))]
  if nonfinite:
    raise ValueError(f"Inception weights file {path!r}: NaN/Inf in {nonfinite[:5]}")
  return {k: arrays[k].astype(np.float32) for k in shapes}


class InceptionV3:
  """The FID Inception-v3 feature network in ``jax.numpy`` (inference only).

  Architecture: pytorch-fid's ``FIDInceptionV3`` (torchvision Inception-v3
  with the TF-FID graph's differences: average pools that exclude padding in
  Mixed_5*/6*/7b, a max pool in Mixed_7c's pool branch, 1008 classes).
  Input: images float [B, H, W, C] in [-1, 1] (C = 1 is repeated to RGB),
  bilinearly resized (no antialiasing, half-pixel centres: PyTorch's
  ``interpolate(..., 'bilinear', align_corners=False)``) to 299 x 299.
  Output: ``{"pool": [B, 2048] pool3 features, "logits": [B, 1008]}``.

  Weights file: an ``.npz`` whose array names and shapes are pytorch-fid's
  ``state_dict`` ones, in PyTorch layouts: for every conv layer ``<name>``
  (see ``inception_weight_shapes()``) ``<name>.conv.weight`` [O, I, kh, kw]
  and ``<name>.bn.{weight,bias,running_mean,running_var}`` [O]; plus
  ``fc.weight`` [1008, 2048] and ``fc.bias`` [1008]. Extra arrays (e.g.
  ``num_batches_tracked``) are ignored. pytorch-fid's published FID weights file
  ``pt_inception-2015-12-05-6726825d.pth`` (the TF-FID network; download it where you
  can, nothing is downloaded here) is read directly when torch is installed: pass its
  path. Without torch, convert it once elsewhere::

      import numpy as np, torch
      sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
      np.savez("inception_fid.npz", **{k: v.numpy() for k, v in sd.items()})

  BatchNorm (eps 1e-3) is folded into the convolutions at load time; all
  convolutions run at ``Precision.HIGHEST``.
  """

  def __init__(self, weights_path: str, *, input_size: int = INCEPTION_INPUT_SIZE):
    import jax
    raw = load_inception_weights(weights_path)
    if input_size < 75:
      raise ValueError(f"InceptionV3: input_size must be >= 75, got {input_size}")
    self.input_size = int(input_size)
    params = {}
    for name in _inception_conv_specs():
      w = raw[f"{name}.conv.weight"]
      scale = raw[f"{name}.bn.weight"] / np.sqrt(raw[f"{name}.bn.running_var"] + _BN_EPS)
      bias = raw[f"{name}.bn.bias"] - raw[f"{name}.bn.running_mean"] * scale
      params[name] = (np.ascontiguousarray((w * scale[:, None, None, None]).transpose(2, 3, 1, 0)),
                      bias.astype(np.float32))
    params["fc"] = (np.ascontiguousarray(raw["fc.weight"].T), raw["fc.bias"])
    self.params = jax.tree.map(jax.numpy.asarray, params)
    self._apply = jax.jit(_inception_forward, static_argnums=(2,))

  def __call__(self, images, batch_size: int = 50) -> dict[str, np.ndarray]:
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"InceptionV3: images must be [B, H, W, 1 or 3], got {x.shape}")
    pools, logits = [], []
    for i in range(0, x.shape[0], batch_size):
      chunk = x[i:i + batch_size]
      n = chunk.shape[0]
      if n < batch_size and x.shape[0] > batch_size:  # keep one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      p, l = self._apply(self.params, chunk, self.input_size)
      pools.append(np.asarray(p)[:n])
      logits.append(np.asarray(l)[:n])
    return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}


def _inception_forward(params, images, size):
  import jax
  import jax.numpy as jnp
  from jax import lax
  x = grey_to_rgb(images.astype(jnp.float32))
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)

  def conv(name, h, stride=1, pad=None):
    w, b = params[name]
    kh, kw = w.shape[:2]
    if pad is None:  # "same" for stride 1, valid otherwise
      pad = (kh // 2, kw // 2) if stride == 1 else (0, 0)
    y = lax.conv_general_dilated(h, w, (stride, stride), ((pad[0], pad[0]), (pad[1], pad[1])),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return jax.nn.relu(y + b)

  def max_pool(h, stride, pad):
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                             ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def avg_pool_exclude_pad(h):  # 3x3, stride 1, padding 1, count_include_pad=False
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = lax.reduce_window(h, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1,) + h.shape[1:3] + (1,), h.dtype)
    cnt = lax.reduce_window(ones, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return s / cnt

  cat = lambda *xs: jnp.concatenate(xs, axis=-1)
  x = conv("Conv2d_1a_3x3", x, stride=2)
  x = conv("Conv2d_2a_3x3", x, pad=(0, 0))
  x = conv("Conv2d_2b_3x3", x)
  x = max_pool(x, 2, 0)
  x = conv("Conv2d_3b_1x1", x)
  x = conv("Conv2d_4a_3x3", x, pad=(0, 0))
  x = max_pool(x, 2, 0)
  for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = cat(conv(f"{m}.branch1x1", x),
            conv(f"{m}.branch5x5_2", conv(f"{m}.branch5x5_1", x)),
            conv(f"{m}.branch3x3dbl_3",
                 conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))),
            conv(f"{m}.branch_pool", avg_pool_exclude_pad(x)))
  m = "Mixed_6a"
  x = cat(conv(f"{m}.branch3x3", x, stride=2),
          conv(f"{m}.branch3x3dbl_3",
               conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x)), stride=2),
          max_pool(x, 2, 0))
  for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    b7 = conv(f"{m}.branch7x7_3", conv(f"{m}.branch7x7_2", conv(f"{m}.branch7x7_1", x)))
    bd = conv(f"{m}.branch7x7dbl_1", x)
    for j in (2, 3, 4, 5):
      bd = conv(f"{m}.branch7x7dbl_{j}", bd)
    x = cat(conv(f"{m}.branch1x1", x), b7, bd, conv(f"{m}.branch_pool", avg_pool_exclude_pad(x)))
  m = "Mixed_7a"
  b3 = conv(f"{m}.branch3x3_2", conv(f"{m}.branch3x3_1", x), stride=2)
  b7 = x
  for j in (1, 2, 3):
    b7 = conv(f"{m}.branch7x7x3_{j}", b7)
  b7 = conv(f"{m}.branch7x7x3_4", b7, stride=2)
  x = cat(b3, b7, max_pool(x, 2, 0))
  for m, pool in (("Mixed_7b", avg_pool_exclude_pad), ("Mixed_7c", lambda h: max_pool(h, 1, 1))):
    b3 = conv(f"{m}.branch3x3_1", x)
    b3 = cat(conv(f"{m}.branch3x3_2a", b3), conv(f"{m}.branch3x3_2b", b3))
    bd = conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))
    bd = cat(conv(f"{m}.branch3x3dbl_3a", bd), conv(f"{m}.branch3x3dbl_3b", bd))
    x = cat(conv(f"{m}.branch1x1", x), b3, bd, conv(f"{m}.branch_pool", pool(x)))
  pool3 = x.mean(axis=(1, 2))
  w, b = params["fc"]
  logits = jnp.dot(pool3, w, precision=lax.Precision.HIGHEST) + b
  return pool3, logits


class FIDEvaluator:
  """FID (and Inception Score) of samples against reference statistics.

  Args:
    reference: the real data's statistics: a path to an ``.npz`` with ``mu``
      and ``sigma`` (``save_statistics`` / TTUR / pytorch-fid format), a
      ``(mu, sigma)`` pair, or real images float [N, H, W, C] in [-1, 1].
    weights_path: the Inception weights file (see ``InceptionV3``).
    feature_fn: instead of the Inception network, any callable mapping images
      float32 [B, H, W, C] in [-1, 1] to features [B, F], or to a pair
      ``(features [B, F], logits [B, K])`` to also get an Inception Score.
      Exactly one of ``weights_path`` and ``feature_fn`` must be given.
    batch_size: Inception batch size.
    is_splits: Inception Score splits (10 is the convention).
    input_size: Inception input resolution; keep the standard 299 for
      comparable numbers (smaller only for quick tests).

  Note: a [2048, 2048] ``sqrtm`` takes seconds to a minute on a CPU, and FID
  needs many more samples than features (10k-50k by convention) to be
  meaningful; the estimate is biased upwards for small sample counts.
  """

  def __init__(self, reference, *, weights_path: str | None = None,
               feature_fn: Callable[[np.ndarray], Any] | None = None, batch_size: int = 50,
               is_splits: int = 10, input_size: int = INCEPTION_INPUT_SIZE):
    if (weights_path is None) == (feature_fn is None):
      raise ValueError("FIDEvaluator: give exactly one of weights_path= (Inception weights "
                       "file) and feature_fn= (your own feature network)")
    if weights_path is not None:
      net = InceptionV3(weights_path, input_size=input_size)
      self._features = lambda x: (lambda o: (o["pool"], o["logits"]))(net(x, batch_size))
    else:
      self._features = lambda x: _as_features_logits(feature_fn(x))
    self.is_splits = is_splits
    if isinstance(reference, (str, os.PathLike)):
      self.mu, self.sigma = load_statistics(reference)
    elif isinstance(reference, (tuple, list)) and len(reference) == 2:
      self.mu, self.sigma = (np.asarray(r, np.float64) for r in reference)
    else:
      self.mu, self.sigma = feature_statistics(self._features(_check_images(reference))[0])

  def features(self, images) -> tuple[np.ndarray, np.ndarray | None]:
    """(features [B, F], logits [B, K] or None) of images float [B, H, W, C] in [-1, 1]."""
    return self._features(_check_images(images))

  def statistics(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of images; save with ``save_statistics``."""
    return feature_statistics(self.features(images)[0])

  def __call__(self, samples) -> dict[str, float]:
    feats, logits = self._features(_check_images(samples))
    out = {"fid": frechet_distance(*feature_statistics(feats), self.mu, self.sigma)}
    if logits is not None:
      splits = min(self.is_splits, len(logits))
      out["inception_score"], out["inception_score_std"] = inception_score(logits, splits)
    return out


def _as_features_logits(out) -> tuple[np.ndarray, np.ndarray | None]:
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError("feature_fn must return features [B, F] or (features, logits)")
    return np.asarray(out[0]), np.asarray(out[1])
  return np.asarray(out), None


def _check_images(images) -> np.ndarray:
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"images must be float [B, H, W, C] in [-1, 1], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or Inf")
  return x


# --------------------------------------------------------------------------------------
# The no-download digits metric
# --------------------------------------------------------------------------------------


class DigitsEvaluator:
  """Sample quality on the embedded digits data, with no download.

  At construction an ``sklearn.neural_network.MLPClassifier`` (hidden layers
  ``hidden``, ReLU, fixed ``seed``: deterministic; a few seconds on CPU) is
  trained on the real digits' ``"train"`` split at ``image_size`` (the same
  preprocessing as ``rin.data.load_dataset("digits", ...)``). Its accuracy
  on the ``"test"`` split is ``self.test_accuracy``. The reference
  statistics are its last hidden layer's features on the ``"train"`` split.

  ``evaluator(samples, labels=None)`` with samples float [B, H, W, 1] in
  [-1, 1] (values outside are clipped) returns:

  * ``digits_fd``: Frechet distance between the samples' features and the
    real digits' (lower is better; the 179 held-out real digits score
    ``self.real_fd``). Like FID it is biased upwards for few samples:
    compare values computed from the same number of samples;
  * ``digits_class_hist``: list of 10 counts of the predicted classes (sums to B);
  * ``digits_class_entropy``: entropy (nats) of that histogram, max log(10);
  * ``digits_class_kl_uniform``: KL(histogram || uniform) = log(10) - entropy;
  * ``digits_confidence``: mean of the classifier's max class probability;
  * ``digits_is``: Inception-Score analogue with this classifier (max 10);
  * ``digits_label_accuracy`` (when ``labels`` are given): fraction of
    samples classified as the class they were conditioned on.
  """

  def __init__(self, image_size: int, *, hidden: Sequence[int] = (128, 64), seed: int = 0,
               max_iter: int = 100):
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    from sklearn.neural_network import MLPClassifier

    from rin import data
    self.image_size = int(image_size)
    train = data.load_dataset("digits", image_size=self.image_size, split="train")
    test = data.load_dataset("digits", image_size=self.image_size, split="test")
    self.num_classes = train.num_classes
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), alpha=1e-3, max_iter=max_iter,
                        random_state=seed, early_stopping=False)
    # One BLAS thread: deterministic, and ~10x faster than oversubscribed
    # threads for these tiny matrices on a busy machine.
    with warnings.catch_warnings(), threadpool_limits(1):
      warnings.simplefilter("ignore", ConvergenceWarning)
      clf.fit(self._flatten(train.images), train.labels)
    self._weights = [np.asarray(w, np.float64) for w in clf.coefs_]
    self._biases = [np.asarray(b, np.float64) for b in clf.intercepts_]
    _, test_probs = self._forward(self._flatten(test.images))
    self.test_accuracy = float(np.mean(test_probs.argmax(1) == test.labels))
    train_feats, _ = self._forward(self._flatten(train.images))
    self.mu, self.sigma = feature_statistics(train_feats)
    test_feats, _ = self._forward(self._flatten(test.images))
    self.real_fd = frechet_distance(*feature_statistics(test_feats), self.mu, self.sigma)

  @staticmethod
  def _flatten(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.reshape(images_u8.shape[0], -1).astype(np.float64) / 127.5 - 1.0

  def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = x
    for w, b in zip(self._weights[:-1], self._biases[:-1]):
      h = np.maximum(h @ w + b, 0.0)
    logits = h @ self._weights[-1] + self._biases[-1]
    return h, np.exp(_log_softmax(logits))

  def features(self, samples) -> tuple[np.ndarray, np.ndarray]:
    """(hidden features [B, F], class probabilities [B, 10]) of samples in [-1, 1]."""
    x = np.asarray(samples, np.float64)
    s = self.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 1):
      raise ValueError(f"DigitsEvaluator: samples must be [B, {s}, {s}, 1] in [-1, 1], got "
                       f"shape {x.shape}")
    if not np.all(np.isfinite(x)):
      raise ValueError("DigitsEvaluator: samples contain NaN or Inf")
    return self._forward(np.clip(x, -1.0, 1.0).reshape(x.shape[0], -1))

  def __call__(self, samples, labels=None) -> dict[str, Any]:
    feats, probs = self.features(samples)
    b = feats.shape[0]
    if b < 2:
      raise ValueError(f"DigitsEvaluator: need at least 2 samples, got {b}")
    pred = probs.argmax(1)
    hist = np.bincount(pred, minlength=self.num_classes)
    freq = hist / b
    entropy = float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0]))) + 0.0
    out: dict[str, Any] = {
        "digits_fd": frechet_distance(*feature_statistics(feats), self.mu, self.sigma),
        "digits_class_hist": [int(c) for c in hist],
        "digits_class_entropy": entropy,
        "digits_class_kl_uniform": float(np.log(self.num_classes) - entropy),
        "digits_confidence": float(probs.max(1).mean()),
        "digits_is": inception_score(np.log(probs + 1e-30), num_splits=1)[0],
    }
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (b,):
        raise ValueError(f"DigitsEvaluator: labels must have shape ({b},), got {labels.shape}")
      out["digits_label_accuracy"] = float(np.mean(pred == labels))
    return out


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The float-valued entries of a metrics dict (for JSONL/TensorBoard scalars)."""
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))
          and not isinstance(v, bool)}
