"""Tests for rin/metrics.py: Frechet distance, Inception Score, FID plumbing, digits metric."""
import numpy as np
import pytest
import scipy.linalg

from rin import data, metrics

# ------------------------------------------------------------------------------ Frechet


def _spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
  s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
  expect = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expect, rel=1e-10)
  # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
  assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
  # identical Gaussians: zero
  s = _spd(rng, 5)
  assert abs(metrics.frechet_distance(mu1[:5], s, mu1[:5], s)) < 1e-8


def test_frechet_distance_matches_direct_scipy_and_symmetric_form():
  rng = np.random.default_rng(1)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _spd(rng, d), _spd(rng, d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  # direct scipy computation of the formula
  direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  assert got == pytest.approx(direct, rel=1e-9)
  # an independent route: tr((s1^1/2 s2 s1^1/2)^1/2) through symmetric eigendecompositions
  w, v = scipy.linalg.eigh(s1)
  r1 = (v * np.sqrt(w)) @ v.T
  inner = scipy.linalg.eigvalsh(r1 @ s2 @ r1)
  sym = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
  assert got == pytest.approx(sym, rel=1e-8)
  # and it is symmetric in its arguments
  assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_frechet_distance_from_samples_and_singular_covariances():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
  b = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5] + [1.0, 0.0, 0.0]
  fd = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  assert fd == pytest.approx(1.0, abs=0.1)
  mu, sigma = metrics.feature_statistics(a)
  np.testing.assert_allclose(mu, a.mean(0))
  np.testing.assert_allclose(sigma, np.cov(a, rowvar=False))
  # rank-deficient covariances (fewer samples than features, dead units) stay finite
  s1, s2 = _spd(rng, 10, rank=3), _spd(rng, 10, rank=4)
  fd = metrics.frechet_distance(np.zeros(10), s1, np.zeros(10), s2)
  assert np.isfinite(fd) and fd >= -1e-6


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match="shape"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="NaN"):
    metrics.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"\[N, F\]"):
    metrics.feature_statistics(np.zeros(4))


def test_statistics_file_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=4), _spd(rng, 4)
  metrics.save_statistics(tmp_path / "s.npz", mu, sigma)
  m2, s2 = metrics.load_statistics(tmp_path / "s.npz")
  np.testing.assert_array_equal(m2, mu)
  np.testing.assert_array_equal(s2, sigma)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    metrics.load_statistics(tmp_path / "nope.npz")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    metrics.load_statistics(tmp_path / "bad.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.npz"):
    metrics.load_statistics(tmp_path / "junk.npz")


# ------------------------------------------------------------------------------ IS


def test_inception_score_known_distributions():
  uniform = np.zeros((100, 10))
  assert metrics.inception_score(uniform, num_splits=1)[0] == pytest.approx(1.0)
  for k in (1, 2, 5, 10):
    onehot = np.full((10 * k, 10), -1e4)
    onehot[np.arange(10 * k), np.arange(10 * k) % k] = 0.0  # evenly over k classes
    mean, std = metrics.inception_score(onehot, num_splits=1)
    assert mean == pytest.approx(k, rel=1e-6)
    mean, std = metrics.inception_score(onehot, num_splits=10)  # each split is balanced
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
  # hand-computed two-sample case: p = (0.9, 0.1), (0.1, 0.9); p(y) = (0.5, 0.5)
  p = np.array([[0.9, 0.1], [0.1, 0.9]])
  kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
  assert metrics.inception_score(np.log(p), num_splits=1)[0] == pytest.approx(np.exp(kl))
  # logits are shift invariant
  assert metrics.inception_score(np.log(p) + 7.0, 1)[0] == pytest.approx(np.exp(kl))
  with pytest.raises(ValueError, match="num_splits"):
    metrics.inception_score(p, num_splits=3)
  with pytest.raises(ValueError, match="NaN"):
    metrics.inception_score(np.full((2, 2), np.nan), num_splits=1)


# ------------------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
  """A weights file in the documented format with random (He-scaled) values."""
  rng = np.random.default_rng(0)
  w = {}
  for k, s in metrics.inception_weight_shapes().items():
    if k.endswith("conv.weight"):
      w[k] = rng.normal(0, np.sqrt(2.0 / np.prod(s[1:])), s).astype(np.float32)
    elif k.endswith("running_var") or k.endswith("bn.weight"):
      w[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
    else:
      w[k] = rng.normal(0, 0.05, s).astype(np.float32)
  w["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(7)  # extra arrays are ignored
  path = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  np.savez(path, **w)
  return path, w


def test_inception_weight_spec():
  shapes = metrics.inception_weight_shapes()
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
  assert shapes["fc.weight"] == (1008, 2048)
  assert len([k for k in shapes if k.endswith("conv.weight")]) == 94  # conv layers of Inception-v3
  n_params = sum(np.prod(s) for k, s in shapes.items()
                 if not k.endswith(("running_mean", "running_var")))
  assert n_params == 23_850_960  # = sum(p.numel()) of pytorch-fid's FIDInceptionV3


def test_inception_weight_errors(tmp_path, random_inception_weights):
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    metrics.InceptionV3(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz"):
    metrics.load_inception_weights(tmp_path / "junk.npz")
  _, w = random_inception_weights
  part = dict(w)
  del part["Mixed_5b.branch1x1.conv.weight"]
  np.savez(tmp_path / "part.npz", **part)
  with pytest.raises(ValueError, match="Mixed_5b.branch1x1.conv.weight"):
    metrics.load_inception_weights(tmp_path / "part.npz")
  wrong = dict(w)
  wrong["fc.weight"] = wrong["fc.weight"].T
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(ValueError, match="fc.weight"):
    metrics.load_inception_weights(tmp_path / "wrong.npz")


def test_inception_forward_shapes_batching_and_grey(random_inception_weights):
  path, _ = random_inception_weights
  net = metrics.InceptionV3(path, input_size=75)  # smallest legal input keeps the test fast
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  out = net(x, batch_size=3)
  assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
  assert np.all(out["pool"] >= 0) and np.all(np.isfinite(out["logits"]))  # pool3 is post-ReLU
  assert out["pool"].std() > 0
  padded = net(x, batch_size=2)  # 2 + 1 (padded) batches give the same numbers
  np.testing.assert_allclose(padded["pool"], out["pool"], rtol=1e-4, atol=1e-4)
  grey = rng.uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(net(grey)["pool"], net(np.repeat(grey, 3, -1))["pool"], rtol=1e-6)
  with pytest.raises(ValueError, match="B, H, W"):
    net(x[0])


def test_fid_evaluator_with_inception_file(random_inception_weights):
  path, _ = random_inception_weights
  rng = np.random.default_rng(2)
  real = rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  ev = metrics.FIDEvaluator(real, weights_path=path, batch_size=6, input_size=75)
  pool = metrics.InceptionV3(path, input_size=75)(real, batch_size=6)["pool"]
  np.testing.assert_allclose(ev.mu, pool.mean(0), rtol=1e-6)
  assert ev.sigma.shape == (2048, 2048)
  feats, logits = ev.features(-real)
  assert feats.shape == (6, 2048) and logits.shape == (6, 1008)
  mean, _ = metrics.inception_score(logits, num_splits=2)
  assert 1.0 <= mean <= 1008


@pytest.mark.slow
def test_fid_evaluator_end_to_end_299(random_inception_weights):
  """Full FID + IS at the standard 299 input; [2048, 2048] sqrtm takes a while on CPU."""
  path, _ = random_inception_weights
  rng = np.random.default_rng(2)
  real = rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  ev = metrics.FIDEvaluator(real, weights_path=path, batch_size=6)
  other = ev(-real)  # one FD: each [2048, 2048] sqrtm is slow on a busy 2-core machine
  assert np.isfinite(other["fid"]) and other["fid"] > 0 and 1.0 <= other["inception_score"] <= 1008
  assert set(other) == {"fid", "inception_score", "inception_score_std"}


def test_fid_evaluator_with_feature_fn(tmp_path):
  rng = np.random.default_rng(4)
  real = rng.normal(size=(500, 2, 2, 4)).astype(np.float32) * 0.3
  flat = lambda x: np.asarray(x).reshape(len(x), -1)
  ev = metrics.FIDEvaluator(real, feature_fn=flat)
  assert ev(real)["fid"] == pytest.approx(0.0, abs=1e-6)
  assert "inception_score" not in ev(real)
  # a pure shift by 0.5 in all 16 features: FID = 16 * 0.25 exactly (same covariance)
  assert ev(real + 0.5)["fid"] == pytest.approx(4.0, rel=1e-5)
  # reference statistics from a file, and a feature_fn that also returns logits
  metrics.save_statistics(tmp_path / "ref.npz", ev.mu, ev.sigma)
  ev2 = metrics.FIDEvaluator(str(tmp_path / "ref.npz"),
                             feature_fn=lambda x: (flat(x), np.zeros((len(x), 3))))
  res = ev2(real + 0.5)
  assert res["fid"] == pytest.approx(4.0, rel=1e-5) and res["inception_score"] == pytest.approx(1)
  with pytest.raises(ValueError, match="exactly one"):
    metrics.FIDEvaluator(real)
  with pytest.raises(ValueError, match="NaN"):
    ev(np.full_like(real, np.nan))


# ------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_eval():
  return metrics.DigitsEvaluator(8)


def test_digits_evaluator_real_vs_noise(digits_eval):
  ev = digits_eval
  assert ev.test_accuracy > 0.93
  test = data.load_dataset("digits", image_size=8, split="test")
  real = test.images.astype(np.float32) / 127.5 - 1.0
  r = ev(real, labels=test.labels)
  noise = ev(np.random.default_rng(0).uniform(-1, 1, real.shape))
  assert r["digits_fd"] == pytest.approx(ev.real_fd)
  assert r["digits_fd"] < 10.0
  assert noise["digits_fd"] > 20 * r["digits_fd"]
  assert sum(r["digits_class_hist"]) == len(real) and len(r["digits_class_hist"]) == 10
  assert sum(noise["digits_class_hist"]) == len(real)
  assert r["digits_class_kl_uniform"] < 0.01  # the test split is class balanced
  assert r["digits_class_entropy"] + r["digits_class_kl_uniform"] == pytest.approx(np.log(10))
  assert r["digits_confidence"] > noise["digits_confidence"]
  assert r["digits_is"] > 8.0 > 3.0 > noise["digits_is"]
  assert r["digits_label_accuracy"] == pytest.approx(ev.test_accuracy)
  # shuffled conditioning labels: accuracy drops to chance
  shuffled = np.random.default_rng(1).permutation(test.labels)
  assert ev(real, labels=shuffled)["digits_label_accuracy"] < 0.3
  metrics_scalars = metrics.scalar_metrics(r)
  assert "digits_class_hist" not in metrics_scalars and "digits_fd" in metrics_scalars


def test_digits_evaluator_mode_collapse_and_errors(digits_eval):
  ev = digits_eval
  test = data.load_dataset("digits", image_size=8, split="test")
  one = test.images[test.labels == 3].astype(np.float32) / 127.5 - 1.0
  r = ev(one)
  assert r["digits_class_hist"][3] >= 0.9 * len(one)
  assert r["digits_class_entropy"] < 0.5 and r["digits_class_kl_uniform"] > 1.8
  assert r["digits_fd"] > 5 * ev.real_fd  # a single class is far from the real distribution
  with pytest.raises(ValueError, match=r"\[B, 8, 8, 1\]"):
    ev(np.zeros((4, 16, 16, 1)))
  with pytest.raises(ValueError, match="NaN"):
    ev(np.full((4, 8, 8, 1), np.nan))
  with pytest.raises(ValueError, match="labels"):
    ev(np.zeros((4, 8, 8, 1)), labels=np.zeros(3))


def test_digits_evaluator_deterministic(digits_eval):
  again = metrics.DigitsEvaluator(8)
  assert again.real_fd == digits_eval.real_fd
  np.testing.assert_array_equal(again.mu, digits_eval.mu)
