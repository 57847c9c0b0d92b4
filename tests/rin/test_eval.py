"""Evaluation during training and in rin.sample; TensorBoard event files."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from rin import data as data_lib
from rin import evaluation, images, loop, sampling, train_state
from tests.rin.tiny import tiny_config


def test_training_logs_the_digits_metric_and_tensorboard(tmp_path):
  cfg = tiny_config(num_steps=4, eval_every=2, sample_every=4, tensorboard=True)
  cfg.model.update(num_blocks=1)
  cfg.eval.update(num_samples=20, sample_steps=2, batch_size=10, at_start=True)
  loop.train(cfg, str(tmp_path), progress=False)
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  ev = {r["step"]: r for r in recs if "eval/digits_fd" in r}
  assert sorted(ev) == [0, 2, 4]                       # step 0 gives the baseline
  for r in ev.values():
    assert r["eval/digits_fd"] > 0 and sum(r["eval/digits_class_hist"]) == 20
    assert 0 <= r["eval/digits_label_accuracy"] <= 1
  events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  raw = b"".join(open(f, "rb").read() for f in events)
  assert b"eval/digits_fd" in raw and b"loss" in raw and b"PNG" in raw   # scalars + grid


def test_tensorboard_events_hold_scalars_and_images(tmp_path):
  from rin.logging_utils import MetricWriter
  w = MetricWriter(str(tmp_path))
  w.write(3, {"loss": 0.5, "digits_class_hist": [1, 2, 0]}, prefix="eval/")
  images.save_image_grid(np.zeros((4, 8, 8, 1)), str(tmp_path / "g.png"))
  w.image("samples", str(tmp_path / "g.png"), 3)
  w.close()
  raw = b"".join(open(f, "rb").read() for f in
                 glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
  assert b"eval/loss" in raw and b"samples" in raw and b"PNG" in raw
  rec = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert rec == {"step": 3, "eval/loss": 0.5, "eval/digits_class_hist": [1, 2, 0]}


def test_digits_metric_prefers_real_digits_to_noise():
  cfg = tiny_config()
  ev = evaluation.Evaluator(cfg)
  real = data_lib.load_dataset("digits", image_size=8, split="test")
  x = real.images.astype(np.float32) / 127.5 - 1
  good = ev(x, real.labels)
  bad = ev(np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32), real.labels)
  assert good["digits_fd"] < 0.2 * bad["digits_fd"]
  assert good["digits_label_accuracy"] > 0.8 > bad["digits_label_accuracy"]


def test_sample_eval_scores_generated_images(tmp_path):
  cfg = tiny_config()
  model = train_state.create_model(cfg)
  state = train_state.init_state(cfg, model, jax.random.PRNGKey(0))
  images, labels = sampling.generate(cfg, state.ema_params, model, num_samples=12,
                                       num_steps=2)
  res = evaluation.evaluate_samples(cfg, images, labels)
  assert np.isfinite(res["digits_fd"]) and sum(res["digits_class_hist"]) == 12


def test_sample_eval_without_a_metric_is_a_clear_error():
  cfg = tiny_config()
  cfg.data.update(name="cifar10")
  cfg.model.channels = 3
  with pytest.raises(ValueError, match="inception_path"):
    evaluation.evaluate_samples(cfg, np.zeros((4, 8, 8, 3)), None)


def test_fid_reference_is_a_seeded_random_subset_over_all_classes():
  # A class-sorted set (as an image folder lists): a prefix of 30 would hold class 0 only.
  labels = np.repeat(np.arange(10), 30).astype(np.int32)
  images = np.broadcast_to(labels[:, None, None, None].astype(np.uint8) * 20,
                           (300, 4, 4, 1)).copy()
  ds = data_lib.ImageDataset(images, labels, num_classes=10)
  ref = evaluation.fid_reference_images(ds, 30, seed=0)
  assert ref.shape == (30, 4, 4, 1) and ref.min() >= -1.0 and ref.max() <= 1.0
  classes = np.unique(np.round((ref[:, 0, 0, 0] + 1.0) * 127.5 / 20).astype(int))
  assert len(classes) >= 5, classes
  np.testing.assert_array_equal(ref, evaluation.fid_reference_images(ds, 30, seed=0))
  assert not np.array_equal(ref, evaluation.fid_reference_images(ds, 30, seed=1))
  assert evaluation.fid_reference_images(ds, 10_000, seed=0).shape[0] == 300
