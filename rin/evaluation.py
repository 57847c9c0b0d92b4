"""Evaluation of EMA samples: metric plugins chosen by the config, and the evaluators the
training loop and rin.sample call.

Image configs: each metric in METRICS says which configs it applies to and how to build
its scorer, ``score(samples [N,H,W,C] in [-1, 1], labels [N] | None) -> {name: value}``;
`Evaluator` runs every metric the config selects. A new metric is one `register_metric`.
Video configs score predicted continuations of test clips (`VideoEvaluator`,
rin.video_metrics). `make_evaluator` gives the training loop either kind behind one call,
``(sample_fn, params, *, seed, batch_size) -> (results, samples)``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from rin import distributed
from rin import sampling
from rin import video as video_lib
from rin.train_state import load_and_check_data

Scorer = Callable[[np.ndarray, Any], dict]
# name -> (selects(config) -> bool, build(config, dataset) -> Scorer)
METRICS: dict[str, tuple[Callable[[ConfigDict], bool], Callable[..., Scorer]]] = {}


def register_metric(name: str, selects: Callable[[ConfigDict], bool]):
  """Decorator: `build(config, dataset) -> Scorer` becomes metric `name` for the configs
  `selects` accepts."""
  def add(build):
    METRICS[name] = (selects, build)
    return build
  return add


def selected_metrics(config: ConfigDict) -> list[str]:
  """Names of the image metrics `config` selects (the same on every process)."""
  return [name for name, (selects, _) in METRICS.items() if selects(config)]


def has_eval_metric(config: ConfigDict) -> bool:
  """Whether the config has anything to evaluate (same answer on every process)."""
  if video_lib.is_video(config):
    return True     # prediction vs the true continuation needs no download
  return bool(selected_metrics(config))


def fid_reference_images(dataset, n: int, *, seed: int) -> np.ndarray:
  """A seeded random subset of min(n, len) training images as floats in [-1, 1].

  Random, not the first n: image folders list class by class, so a prefix would
  cover only the first classes and bias FID.
  """
  n = min(len(dataset), int(n))
  pick = np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False))
  return dataset.images[pick].astype(np.float32) / 127.5 - 1.0


@register_metric("digits", lambda c: (c.data.name == "digits" and c.model.channels == 1
                                      and c.eval.digits))
def _digits_metric(config: ConfigDict, dataset) -> Scorer:
  """The no-download digits metric (rin.metrics.DigitsEvaluator): Frechet distance of a
  digits classifier's features, label accuracy of class-conditional samples."""
  from rin import metrics
  return metrics.DigitsEvaluator(config.model.image_size)


@register_metric("fid", lambda c: bool(c.eval.inception_path))
def _fid_metric(config: ConfigDict, dataset) -> Scorer:
  """FID / Inception Score with the user's Inception weights (config.eval.inception_path)
  against config.eval.fid_reference (mu, sigma) or a random subset of the training images.
  Grey images are fine: the Inception network repeats a single channel itself."""
  from rin import metrics
  ev = config.eval
  ref = ev.fid_reference
  if not ref:
    if dataset is None:
      raise ValueError("config.eval.inception_path is set: give config.eval.fid_reference "
                       "(an .npz with mu and sigma) or training data for reference stats")
    ref = fid_reference_images(dataset, ev.fid_reference_images, seed=config.train.seed)
  fid = metrics.FIDEvaluator(ref, weights_path=ev.inception_path)
  return lambda samples, labels: fid(samples)


class Evaluator:
  """Scores image samples with every metric the config selects (METRICS)."""

  def __init__(self, config: ConfigDict, dataset=None):
    self.scorers = {name: METRICS[name][1](config, dataset) for name in selected_metrics(config)}
    if not self.scorers:
      logging.warning("no evaluation metric for data set %r without config.eval.inception_path",
                      config.data.name)

  def __bool__(self):
    return bool(self.scorers)

  def __call__(self, samples, labels=None) -> dict:
    """Scores samples [N,H,W,C] in [-1, 1] (labels: the classes they were drawn for)."""
    out = {}
    for score in self.scorers.values():
      out.update(score(samples, labels))
    return out


def evaluate(config: ConfigDict, evaluator, sample_fn, params, *, seed: int,
             num_samples: int, batch_size: int):
  """Draws `num_samples` EMA samples (all processes) and scores them (primary only):
  (results, samples)."""
  rng = jax.random.PRNGKey(seed)
  labels = sampling.draw_labels(jax.random.fold_in(rng, 1), config, num_samples)
  images = sampling.sample_in_batches(sample_fn, params, rng, labels, batch_size)
  if not distributed.is_primary():
    return {}, images
  res = evaluator(images, np.asarray(labels) if config.model.num_classes > 0 else None)
  return res, images


def evaluate_samples(config: ConfigDict, images, labels=None, dataset=None) -> dict:
  """Metrics of samples [N,H,W,C] in [-1,1] (rin.sample --eval); loads the training data
  only when FID needs reference images."""
  if not has_eval_metric(config):
    raise ValueError(f"--eval: no metric for data set {config.data.name!r}; set "
                     "config.eval.inception_path to an Inception weights file for FID/IS")
  if dataset is None and config.eval.inception_path and not config.eval.fid_reference:
    dataset = load_and_check_data(config)
  ev = Evaluator(config, dataset)
  return ev(images, labels if config.model.num_classes > 0 else None)


class ImageEvaluator:
  """Training-time evaluation of an image config: config.eval.num_samples samples drawn on
  every process, scored on the primary (the only one that builds the metrics)."""

  def __init__(self, config: ConfigDict, dataset=None):
    self.config = config
    self.evaluator = Evaluator(config, dataset) if distributed.is_primary() else None

  def __call__(self, sample_fn, params, *, seed: int, batch_size: int):
    return evaluate(self.config, self.evaluator, sample_fn, params, seed=seed,
                    num_samples=self.config.eval.num_samples, batch_size=batch_size)


class VideoEvaluator:
  """Prediction metrics on the first test clips (rin.video_metrics.video_metrics): per-frame
  MSE/PSNR/SSIM, the digit-crop Frechet distance (moving digits), FVD with
  config.eval.fvd_network_path, and the copy-last-frame baseline."""

  def __init__(self, config: ConfigDict, num_clips: int | None = None):
    self.config = config
    n = config.eval.num_samples if num_clips is None else num_clips
    self.clips, self.positions = video_lib.test_clips(config, n)
    self._crop_fd = self._fvd = None
    self._built = False

  def predict(self, sample_fn, params, *, seed: int, batch_size: int) -> np.ndarray:
    """Predictions [N, F - Fc, H, W, C] of each clip's continuation (every process)."""
    cond, _ = video_lib.split_clip(self.clips, self.config.model.cond_frames)
    return sampling.sample_in_batches(sample_fn, params, jax.random.PRNGKey(seed), cond,
                                      batch_size)

  def score(self, pred) -> dict:
    """The metrics of `pred` against the true continuations. The metric networks are built
    at the first call (they train or load for seconds), so predicting alone costs nothing."""
    from rin import video_metrics
    ev, fc = self.config.eval, self.config.model.cond_frames
    if not self._built:
      if self.positions is not None and ev.digits:
        self._crop_fd = video_metrics.DigitCropFD(self.config.data.digit_size)
      if ev.fvd_network_path:
        self._fvd = video_metrics.FVDEvaluator(ev.fvd_network_path)
      self._built = True
    cond, truth = video_lib.split_clip(self.clips, fc)
    pos = None if self.positions is None else self.positions[:, fc:]
    return video_metrics.video_metrics(pred, truth, cond, positions=pos, crop_fd=self._crop_fd,
                                       fvd=self._fvd)

  def __call__(self, sample_fn, params, *, seed: int, batch_size: int):
    pred = self.predict(sample_fn, params, seed=seed, batch_size=batch_size)
    if not distributed.is_primary():
      return {}, pred
    return self.score(pred), pred


def make_evaluator(config: ConfigDict, dataset=None):
  """The training loop's evaluator of `config`: VideoEvaluator or ImageEvaluator."""
  if video_lib.is_video(config):
    return VideoEvaluator(config)
  return ImageEvaluator(config, dataset)
