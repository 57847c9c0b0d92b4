"""The JAX FID Inception (rin.metrics.InceptionV3) against pytorch-fid's own InceptionV3,
both loading the same random weights from one PyTorch .pth state_dict (the format of
pytorch-fid's published pt_inception-2015-12-05-*.pth)."""
import numpy as np
import pytest

from rin import metrics

torch = pytest.importorskip("torch")
pf_inception = pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
  """A random state_dict in pytorch-fid's key layout (num_batches_tracked included, as
  its strict load_state_dict needs), saved as .pth."""
  rng = np.random.default_rng(0)
  sd = {}
  for k, s in metrics.inception_weight_shapes().items():
    if k.endswith("conv.weight"):
      v = rng.normal(0, np.sqrt(2.0 / np.prod(s[1:])), s)
    elif k.endswith(("running_var", "bn.weight")):
      v = rng.uniform(0.5, 1.5, s)
    else:
      v = rng.normal(0, 0.05, s)
    sd[k] = torch.tensor(v, dtype=torch.float32)
    if k.endswith("bn.weight"):
      sd[k.replace("bn.weight", "bn.num_batches_tracked")] = torch.tensor(0)
  path = tmp_path_factory.mktemp("pth") / "pt_inception-random.pth"
  torch.save(sd, path)
  return path


def _pytorch_fid_net(monkeypatch, path, resize: bool):
  # pytorch-fid fetches its published weights by URL; hand it our file instead.
  monkeypatch.setattr(pf_inception, "load_state_dict_from_url",
                      lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True))
  net = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                 resize_input=resize, normalize_input=True,
                                 use_fid_inception=True)
  return net.eval()


def _torch_features(net, images):
  """images float [B, H, W, 3] in [-1, 1]; pytorch-fid takes NCHW in [0, 1]."""
  x = torch.tensor(np.ascontiguousarray(((images + 1) / 2).transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return net(x)[0][:, :, 0, 0].numpy().astype(np.float64)


def test_pth_loads_directly_and_features_match_pytorch_fid(monkeypatch, pth):
  """75 x 75 inputs (the smallest Inception-v3 takes; no resize) keep it fast."""
  images = np.random.default_rng(1).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
  ours = metrics.InceptionV3(str(pth), input_size=75)(images)["pool"].astype(np.float64)
  theirs = _torch_features(_pytorch_fid_net(monkeypatch, pth, resize=False), images)
  assert ours.shape == theirs.shape == (3, 2048)
  scale = np.abs(theirs).max()
  assert scale > 1e-3
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * scale)


def test_bad_pth_is_a_clear_error(tmp_path):
  bad = tmp_path / "junk.pth"
  bad.write_bytes(b"not a torch file")
  with pytest.raises(ValueError, match="junk.pth.*not a readable PyTorch state_dict"):
    metrics.load_inception_weights(str(bad))
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(ValueError, match="not a state_dict"):
    metrics.load_inception_weights(str(tmp_path / "list.pth"))
  torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "part.pth")
  with pytest.raises(ValueError, match="lacks"):
    metrics.load_inception_weights(str(tmp_path / "part.pth"))


@pytest.mark.slow
def test_fid_matches_pytorch_fid_at_299(monkeypatch, pth):
  """Both resize 16 x 16 images to 299 (bilinear, half-pixel centres) and the FIDs of the
  same two image sets agree (two [2048, 2048] sqrtm: slow on 2 cores)."""
  from pytorch_fid import fid_score
  from pytorch_fid.fid_score import calculate_frechet_distance
  # pytorch-fid 0.3.0 calls sqrtm(..., disp=False), which scipy >= 1.16 removed; give it the
  # old (sqrtm, error estimate) pair so their formula runs unchanged.
  sqrtm = fid_score.linalg.sqrtm
  monkeypatch.setattr(fid_score.linalg, "sqrtm",
                      lambda a, disp=True: (sqrtm(a), 0.0) if not disp else sqrtm(a))
  rng = np.random.default_rng(2)
  a = rng.uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  net = metrics.InceptionV3(str(pth))
  ours = [net(x)["pool"].astype(np.float64) for x in (a, b)]
  tnet = _pytorch_fid_net(monkeypatch, pth, resize=True)
  theirs = [_torch_features(tnet, x) for x in (a, b)]
  for o, t in zip(ours, theirs):
    np.testing.assert_allclose(o, t, rtol=0, atol=2e-5 * np.abs(t).max())
  fid_ours = metrics.frechet_distance(*metrics.feature_statistics(ours[0]),
                                      *metrics.feature_statistics(ours[1]))
  stats = [(t.mean(0), np.cov(t, rowvar=False)) for t in theirs]
  fid_theirs = calculate_frechet_distance(*stats[0], *stats[1])
  assert fid_ours == pytest.approx(fid_theirs, rel=1e-3)
