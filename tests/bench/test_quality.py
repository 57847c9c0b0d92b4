"""bench.quality: the model-free baselines and the report it writes."""
import json
import os

import numpy as np
import pytest

from bench import quality


@pytest.fixture(scope="module")
def evaluator():
  from rin import metrics
  return metrics.DigitsEvaluator(8)


def test_class_gaussians_draw_the_requested_classes_and_beat_one_gaussian(evaluator):
  """The rows every digits run is read against: ten class Gaussians (FD ~2.9, accuracy ~0.98
  with 256 samples) are far better than one Gaussian (FD ~13) and worse than real digits."""
  rows = quality.baselines(evaluator, 256, seeds=[0])
  fd = {k: v["digits_fd_mean"] for k, v in rows.items()}
  assert fd["real_train_digits"] < fd["class_gaussians"] < fd["gaussian"], fd
  assert 2.0 < fd["class_gaussians"] < 4.5 and 8.0 < fd["gaussian"] < 20.0, fd
  assert rows["class_gaussians"]["digits_label_accuracy_mean"] > 0.9
  assert rows["real_train_digits"]["digits_label_accuracy_mean"] > 0.95
  assert "digits_label_accuracy" not in rows["gaussian"]      # unconditional: no labels


def test_gaussian_samples_follow_the_fitted_moments():
  rng = np.random.default_rng(0)
  data = rng.normal(size=(4000, 2, 2, 1)) * 0.2 + np.array([0.1, -0.2, 0.3, 0.0]).reshape(2, 2, 1)
  draws = quality.gaussian_samples(rng, data, 4000)
  assert draws.shape == (4000, 2, 2, 1)
  np.testing.assert_allclose(draws.mean(0), data.mean(0), atol=0.02)
  np.testing.assert_allclose(draws.std(0), data.std(0), rtol=0.05)


def test_report_reads_finished_runs_without_training(tmp_path):
  """A workdir with a finished run's record is read back, not retrained; the markdown and the
  plot are written from it."""
  out = tmp_path / "q"
  rec = {"command": "x", "wall_seconds": 10.0, "steps": 100,
         "evals": [{"step": 50, "digits_fd": 9.0, "digits_label_accuracy": 0.5},
                   {"step": 100, "digits_fd": 2.0, "digits_label_accuracy": 0.97}]}
  rec["final"] = rec["evals"][-1]
  for s in (0, 1):
    d = out / "runs" / "main" / f"seed{s}"
    os.makedirs(d)
    (d / "bench_quality_run.json").write_text(json.dumps(rec))
  quality.main(["--parts", "main", "--seeds", "0,1", "--out", str(out)])
  report = json.loads((out / "quality.json").read_text())
  assert report["runs"]["main"]["digits_fd"] == [2.0, 2.0]
  assert report["main_curve"] == [[50, [9.0, 9.0], [0.5, 0.5]], [100, [2.0, 2.0], [0.97, 0.97]]]
  assert "| main | 100 |" in (out / "quality.md").read_text()
  assert (out / "quality.png").stat().st_size > 1000
  with pytest.raises(SystemExit):
    quality.main(["--parts", "everything", "--out", str(out)])
