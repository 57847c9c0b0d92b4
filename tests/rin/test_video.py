"""VideoRIN, the video data, metrics and the train/sample CLI on video configs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rin
from rin import model as model_lib
from rin import images, video, video_data, video_metrics
from tests.rin.tiny_video_config import get_config as tiny_video_config


def _tiny_model(**kw):
  m = dict(tiny_video_config().model)
  m.update(kw)
  return rin.VideoRIN(**m)


def _inputs(model, b=2, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  frame = (model.image_size, model.image_size, model.channels)
  x = jax.random.normal(k[0], (b, model.num_frames - model.cond_frames) + frame)
  c = jax.random.uniform(k[1], (b, model.cond_frames) + frame, minval=-1, maxval=1)
  return x, jnp.linspace(0.2, 0.8, b), c


# --------------------------------------------------------------------------------------
# Stem and readout
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,pt", [(6, 2), (11, 2), (5, 2), (9, 4), (3, 1)])
def test_tubelets_round_trip(frames, pt):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, frames, 8, 12, 3))
  t = model_lib.video_to_tubelets(x, pt, 4)
  assert t.shape == (2, -(-frames // pt), 2, 3, pt * 4 * 4 * 3)
  back = model_lib.tubelets_to_video(t, pt, 4, 3, frames)
  np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("frames", [4, 5, 11])
def test_tubelet_stem_is_the_authors_same_conv3d(frames):
  """TubeletStem = Conv3D((2, 4, 4), strides (2, 4, 4), padding "SAME"), with TF's SAME."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, frames, 8, 8, 3))
  stem = model_lib.TubeletStem(5, 2, 4)
  params = stem.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda a: a + 0.1, params)
  k, b = params["params"]["kernel"], params["params"]["bias"]
  pad = -frames % 2                       # TF SAME: floor(pad/2) before, the rest after
  want = jax.lax.conv_general_dilated(
      x, k, window_strides=(2, 4, 4), padding=((pad // 2, pad - pad // 2), (0, 0), (0, 0)),
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + b
  np.testing.assert_allclose(stem.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_stem_readout_round_trip_through_the_model():
  """With an identity stem and an identity readout (LNs and positions neutralised), the
  model's interface layout returns the noisy frames as they came in: stem and readout
  index the same tubelets in the same order, padding frames dropped."""
  model = _tiny_model(num_blocks=1, latent_layers_per_block=1, num_frames=8, cond_frames=3,
                      interface_dim=2 * 4 * 4 * 1)
  x, g, c = _inputs(model)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x, g, c))["params"]
  k = model.interface_dim
  params["stem"]["kernel"] = np.eye(k, dtype=np.float32).reshape(2, 4, 4, 1, k)
  params["readout"]["kernel"] = np.eye(k, dtype=np.float32)
  params["pos_interface"] = np.zeros_like(params["pos_interface"])

  # The interface right after the stem, fed to the readout directly (no blocks).
  import flax.linen as nn

  class RoundTrip(rin.VideoRIN):
    @nn.compact
    def __call__(self, x, c):
      return self._readout(self._interface(x, c))

  fields = {f: getattr(model, f) for f in ("image_size", "channels", "patch_size",
                                           "num_frames", "cond_frames", "tubelet_frames",
                                           "interface_dim")}
  # Both LNs (stem, readout) normalise each token: compare with twice-normalised tubelets.
  out = RoundTrip(**fields).apply({"params": params}, x, c)
  t = model_lib.video_to_tubelets(x, 2, 4)
  mu, sd = t.mean(-1, keepdims=True), t.std(-1, keepdims=True)
  ln_t = (t - mu) / jnp.sqrt(sd ** 2 + 1e-6)
  ln_t = (ln_t - ln_t.mean(-1, keepdims=True)) / jnp.sqrt(ln_t.var(-1, keepdims=True) + 1e-6)
  want = model_lib.tubelets_to_video(ln_t, 2, 4, 1, x.shape[1])
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------

def test_forward_shapes_and_the_interface_length():
  model = _tiny_model(num_frames=16, cond_frames=5, image_size=8)
  x, g, c = _inputs(model)
  params = model.init(jax.random.PRNGKey(0), x, g, c)
  # ceil(11/2) + ceil(5/2) = 9 time steps of 2x2 tubelets (8x8 frames, 4x4 patches).
  assert params["params"]["pos_interface"].shape == (9 * 4, model.interface_dim)
  assert params["params"]["stem"]["kernel"].shape == (2, 4, 4, 1, model.interface_dim)
  out, z = model.apply(params, x, g, c)
  assert out.shape == x.shape and z.shape == (2, model.num_latents, model.latent_dim)
  assert "class_dense" not in params["params"]


def test_conditioning_frames_change_the_prediction():
  model = _tiny_model()
  x, g, c = _inputs(model)
  params = model.init(jax.random.PRNGKey(0), x, g, c)
  a, _ = model.apply(params, x, g, c)
  b, _ = model.apply(params, x, g, jnp.roll(c, 1, axis=0))    # another clip's frames
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  # ... and only through the conditioning: the same frames give the same prediction.
  a2, _ = model.apply(params, x, g, c + 0.0)
  np.testing.assert_array_equal(a, a2)
  # Each conditioning frame matters (the last one too, which sits in a padded tubelet).
  for f in range(model.cond_frames):
    c2 = c.at[:, f].set(-c[:, f])
    b2, _ = model.apply(params, x, g, c2)
    assert float(jnp.max(jnp.abs(a - b2))) > 1e-4, f


def test_sin_cos_codes_are_the_authors_formula():
  # get_2d_position_codes at dim 8: per side [sin y, sin y/100, cos y, cos y/100] (exponent
  # 2*(i//2)/4 of 10000), rows first, columns second; coordinates scaled to [0, max].
  out = model_lib.sin_cos_2d(3, 4, 8, normalization_max=6.0)
  assert out.shape == (3, 4, 8)
  for r in range(3):
    for c in range(4):
      y, x = r / 2 * 6.0, c / 3 * 6.0
      want = [np.sin(y), np.sin(y / 100), np.cos(y), np.cos(y / 100),
              np.sin(x), np.sin(x / 100), np.cos(x), np.cos(x / 100)]
      np.testing.assert_allclose(out[r, c], want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="even width"):
    model_lib.sin_cos_2d(2, 2, 7)


def test_sin_cos_plus_learned_tape_positions():
  base = _tiny_model(tape_pos_encoding="learned")
  model = _tiny_model(tape_pos_encoding="sin_cos_plus_learned")
  x, g, c = _inputs(model)
  p_base = model.init(jax.random.PRNGKey(0), x, g, c)
  params = model.init(jax.random.PRNGKey(0), x, g, c)
  # Same parameter tree (the learned table is the residual), initialised to zero.
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, base.init(
      jax.random.PRNGKey(0), x, g, c))
  np.testing.assert_array_equal(params["params"]["pos_interface"], 0.0)
  # The fixed part: one 2-D code per place, tiled over the tape's time steps.
  g_side = model.image_size // model.patch_size
  steps = model.num_patches // (g_side * g_side)
  fixed = model_lib.video_tape_positions("sin_cos_plus_learned", steps, g_side,
                                         model.interface_dim)
  assert fixed.shape == (model.num_patches, model.interface_dim)
  np.testing.assert_array_equal(fixed[:g_side * g_side], fixed[-g_side * g_side:])
  assert np.abs(fixed[0] - fixed[1]).max() > 0.1            # places differ
  # ... and it enters the tokens: the model differs from the learned table with the same
  # (zero) residual only by the fixed codes.
  p_zero = jax.tree.map(np.asarray, p_base)
  p_zero["params"]["pos_interface"] = np.zeros_like(p_zero["params"]["pos_interface"])
  a, _ = model.apply(params, x, g, c)
  b, _ = base.apply(p_zero, x, g, c)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  p_fixed = jax.tree.map(np.asarray, p_zero)
  p_fixed["params"]["pos_interface"] = fixed
  b2, _ = base.apply(p_fixed, x, g, c)
  np.testing.assert_allclose(a, b2, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="tape_pos_encoding"):
    _tiny_model(tape_pos_encoding="sin_cos").init(jax.random.PRNGKey(0), x, g, c)


def test_self_conditioning_latents_matter_after_training_starts():
  model = _tiny_model()
  x, g, c = _inputs(model)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x, g, c))
  prev = jax.random.normal(jax.random.PRNGKey(3), (2, model.num_latents, model.latent_dim))
  a, _ = model.apply(params, x, g, c, None)
  b, _ = model.apply(params, x, g, c, prev)
  np.testing.assert_allclose(a, b, atol=1e-6)      # LN0 starts at zero: no effect at init
  params["params"]["self_cond_ln0"]["scale"] = np.ones_like(params["params"]["self_cond_ln0"]["scale"])
  b, _ = model.apply(params, x, g, c, prev)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_video_parameter_tree_is_the_same_for_every_implementation():
  model_xla = _tiny_model(implementation="xla")
  x, g, c = _inputs(model_xla, b=1)
  trees = []
  for impl, interp in (("xla", False), ("pallas_tpu", True), (None, False)):
    m = _tiny_model(implementation=impl, interpret=interp)
    params = m.init(jax.random.PRNGKey(0), x, g, c)
    trees.append(params)
  for t in trees[1:]:
    assert jax.tree.structure(t) == jax.tree.structure(trees[0])
    jax.tree.map(np.testing.assert_array_equal, t, trees[0])     # same names, shapes, init
  # And the same outputs: the fused read/write kernels carry the interface.
  out_x, _ = _tiny_model(implementation="xla").apply(trees[0], x, g, c)
  out_p, _ = _tiny_model(implementation="pallas_tpu", interpret=True).apply(trees[0], x, g, c)
  np.testing.assert_allclose(out_p, out_x, rtol=2e-4, atol=2e-4)


def test_image_model_is_unchanged_by_the_video_family():
  """RIN and VideoRIN share code; RIN's tree for the digits config has no video names."""
  from rin.configs import digits
  cfg = digits.get_config()
  m = rin.RIN(**cfg.model)
  x = jnp.zeros((1, 8, 8, 1))
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, jnp.ones((1,)),
                                         jnp.zeros((1,), jnp.int32)))
  assert shapes["params"]["stem"]["kernel"].shape == (2, 2, 1, 64)
  assert shapes["params"]["pos_interface"].shape == (16, 64)


@pytest.mark.parametrize("kw,x_frames,cond_frames,match", [
    (dict(), 4, 3, r"noisy frames must be \[batch, num_frames - cond_frames"),
    (dict(), 3, 2, r"cond \(the conditioning frames\) must have shape"),
    (dict(num_frames=3, cond_frames=3), 1, 3, r"cond_frames=3 must be fewer than num_frames=3"),
    (dict(num_frames=3, cond_frames=5), 1, 5, r"cond_frames=5 must be fewer than num_frames=3"),
    (dict(num_frames=7, tubelet_padding="none"), 4, 3,
     r"num_frames - cond_frames=4 .*|cond_frames=3 is not a multiple of tubelet_frames=2"),
    (dict(num_frames=7, cond_frames=2, tubelet_padding="none"), 5, 2,
     r"num_frames - cond_frames=5 is not a multiple of tubelet_frames=2"),
    (dict(tubelet_frames=0), 3, 3, r"tubelet_frames must be an integer >= 1"),
    (dict(num_classes=10), 3, 3, r"VideoRIN conditions on frames, not classes"),
    (dict(image_size=10), 3, 3, r"image_size=10 is not divisible by patch_size=4"),
])
def test_bad_video_inputs_are_clear_errors(kw, x_frames, cond_frames, match):
  model = _tiny_model(**kw)
  s = model.image_size
  x = jnp.zeros((1, x_frames, s, s, 1))
  c = jnp.zeros((1, cond_frames, s, s, 1))
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.PRNGKey(0), x, jnp.ones((1,)), c)


# --------------------------------------------------------------------------------------
# Kernels at the video shapes (Pallas interpreter against the float64 oracle)
# --------------------------------------------------------------------------------------

# (batch, m, d, n, t, heads, width, mlp_ratio)
MOVING_DIGITS_BLOCK = (1, 32, 96, 144, 64, 4, 64, 2)       # rin/configs/moving_digits.py
KINETICS_N_SMALL_WIDTH = (1, 16, 64, 2304, 32, 2, 32, 2)   # Kinetics' 2304 tokens, narrow
KINETICS_BLOCK = (1, 256, 1024, 2304, 512, 16, 512, 4)     # rin/configs/kinetics600.py


@pytest.fixture
def float64_oracle():
  """As tests/kernels/conftest.py: float64 for the reference, kernels still fp32."""
  with jax.enable_x64(True):
    yield


@pytest.mark.usefixtures("float64_oracle")
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("shape", [MOVING_DIGITS_BLOCK, KINETICS_N_SMALL_WIDTH])
def test_pallas_blocks_at_video_shapes_match_reference(direction, shape):
  from tests.kernels.test_pallas_tpu import check_block
  check_block(direction, shape, jnp.float32)


@pytest.mark.slow
@pytest.mark.usefixtures("float64_oracle")
@pytest.mark.parametrize("direction", ["read", "write"])
def test_pallas_blocks_at_kinetics_shape_match_reference(direction):
  from tests.kernels.test_pallas_tpu import check_block
  check_block(direction, KINETICS_BLOCK, jnp.float32)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def test_moving_digits_are_deterministic_bounce_and_split_by_digit_source():
  a = video_data.make_moving_digits("train", num_videos=20, num_frames=12, image_size=16)
  b = video_data.make_moving_digits("train", num_videos=20, num_frames=12, image_size=16)
  t = video_data.make_moving_digits("test", num_videos=20, num_frames=12, image_size=16)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (20, 12, 16, 16, 1) and a.images.dtype == np.uint8
  assert not np.array_equal(a.images, t.images)
  pos = a.positions
  assert pos.min() >= 0 and pos.max() <= 16 - 8                 # inside the walls
  step = np.diff(pos.astype(float), axis=1)
  assert np.any(np.sign(step[:, 1:]) * np.sign(step[:, :-1]) < 0)   # some clip bounces
  assert np.abs(step).max() <= 2                                 # speed <= 1.5 px/frame, rounded
  # The pixels are where the positions say (the digit's box holds all the ink).
  for n in range(3):
    for f in range(12):
      r, c = pos[n, f, 0]
      box = a.images[n, f, r:r + 8, c:c + 8].astype(int).sum()
      assert box == a.images[n, f].astype(int).sum() > 0
  # Train clips are made of train-split digits only.
  from rin import data
  train_digits = data.load_dataset("digits", image_size=8, split="train").images
  r, c = pos[0, 0, 0]
  glyph = a.images[0, 0, r:r + 8, c:c + 8]
  assert any(np.array_equal(glyph, d) for d in train_digits)


def test_moving_digits_two_digits_and_bad_arguments():
  ds = video_data.make_moving_digits("test", num_videos=4, num_frames=3, image_size=16,
                                     num_digits=2)
  assert ds.positions.shape == (4, 3, 2, 2)
  with pytest.raises(ValueError, match="split must be one of"):
    video_data.make_moving_digits("val", num_videos=2)
  with pytest.raises(ValueError, match="digit_size=20 exceeds image_size=16"):
    video_data.make_moving_digits(num_videos=2, image_size=16, digit_size=20)


def _write_gif(path, frames):
  from PIL import Image
  imgs = [Image.fromarray(f) for f in frames]
  imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=50, loop=0)


def test_video_folder_reads_gifs_and_frame_folders(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  frames = [np.full((20, 24, 3), 10 * i, np.uint8) for i in range(9)]
  _write_gif(tmp_path / "a.gif", frames)
  d = tmp_path / "clip_b"
  d.mkdir()
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
  (tmp_path / "notes.txt").write_text("not a video")
  ds = video_data.load_video_folder(str(tmp_path), num_frames=4, image_size=8, channels=3)
  # a.gif: 9 frames -> 2 clips of 4; clip_b: 1 clip.
  assert ds.images.shape == (3, 4, 8, 8, 3)
  np.testing.assert_allclose(ds.images[0, :, 0, 0, 0], [0, 10, 20, 30], atol=2)
  np.testing.assert_allclose(ds.images[1, :, 0, 0, 0], [40, 50, 60, 70], atol=2)
  grey = video_data.load_video_folder(str(tmp_path), num_frames=4, image_size=8, channels=1)
  assert grey.images.shape == (3, 4, 8, 8, 1)


def test_video_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data path .*does not exist"):
    video_data.load_video_folder(str(tmp_path / "missing"), num_frames=4, image_size=8)
  with pytest.raises(ValueError, match="config.data.path .* is required"):
    video_data.load_video_folder("", num_frames=4, image_size=8)
  _write_gif(tmp_path / "short.gif", [np.full((8, 8, 3), v, np.uint8) for v in (0, 200)])
  with pytest.raises(ValueError, match="has 2 frames, fewer than num_frames=4"):
    video_data.load_video_folder(str(tmp_path), num_frames=4, image_size=8)
  (tmp_path / "short.gif").unlink()
  with pytest.raises(ValueError, match="no videos"):
    video_data.load_video_folder(str(tmp_path), num_frames=4, image_size=8)


def test_train_checks_the_video_config_before_touching_the_workdir(tmp_path):
  from rin import loop
  cfg = tiny_video_config()
  cfg.model.cond_frames = cfg.model.num_frames
  with pytest.raises(ValueError, match="cond_frames=6 must be >= 0 and fewer than"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  cfg = tiny_video_config()
  cfg.data.name, cfg.data.path = "video_folder", str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  assert not os.path.exists(tmp_path / "w")


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

def test_psnr_and_mse_known_values():
  truth = np.zeros((2, 3, 4, 4, 1)) - 1.0            # black in [-1, 1] = 0 in [0, 1]
  pred = truth.copy()
  pred[:, 1] += 0.2                                  # +0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
  mse, psnr = video_metrics.per_frame_mse_psnr(pred, truth)
  np.testing.assert_allclose(mse, [0, 0.01, 0], atol=1e-12)
  np.testing.assert_allclose(psnr[1], 20.0, atol=1e-9)
  assert psnr[0] == psnr[2] == 100.0                 # the 1e-10 MSE floor


def test_ssim_matches_a_direct_windowed_computation():
  rng = np.random.default_rng(0)
  t = rng.uniform(-1, 1, (1, 1, 14, 13, 1))
  p = np.clip(t + rng.normal(0, 0.3, t.shape), -1, 1)
  got = video_metrics.ssim(p, t)[0]
  # The definition: a Gaussian-weighted window at each valid position.
  w1 = video_metrics._gaussian_window()
  w = np.outer(w1, w1)
  a, b = (p[0, 0, ..., 0] + 1) / 2, (t[0, 0, ..., 0] + 1) / 2
  vals = []
  for i in range(14 - 10):
    for j in range(13 - 10):
      x, y = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
      mx, my = (w * x).sum(), (w * y).sum()
      vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
      cxy = (w * x * y).sum() - mx * my
      vals.append((2 * mx * my + 1e-4) * (2 * cxy + 9e-4) /
                  ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4)))
  np.testing.assert_allclose(got, np.mean(vals), rtol=1e-10)
  assert video_metrics.ssim(t, t)[0] == pytest.approx(1.0)
  assert got < 0.95                 # noise lowers it


def test_video_metrics_report_the_copy_last_baseline():
  ds = video_data.make_moving_digits("test", num_videos=12, num_frames=8, image_size=16)
  clips = video.as_model_inputs(ds.images)
  cond, truth = video.split_clip(clips, 3)
  crop_fd = video_metrics.DigitCropFD(8)
  res = video_metrics.video_metrics(truth, truth, cond, positions=ds.positions[:, 3:],
                                    crop_fd=crop_fd)
  assert res["psnr"] == 100.0 and res["ssim"] == pytest.approx(1.0)
  assert res["copy_last_psnr"] < 30 and res["copy_last_ssim"] < 0.95
  blank = video_metrics.blank_frames(cond, truth.shape[1])
  assert res["blank_psnr"] == pytest.approx(video_metrics.per_frame_mse_psnr(blank, truth)[1].mean())
  assert res["blank_psnr"] < 30
  np.testing.assert_array_equal(video_metrics.blank_frames(cond, 2)[:, 1], cond.min(1))
  assert res["digits_fd"] == pytest.approx(res["truth_digits_fd"])
  assert res["copy_last_digits_fd"] > res["truth_digits_fd"]    # the digit moved away
  assert len(res["psnr_per_frame"]) == 5


def test_fvd_from_features_is_the_frechet_distance():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 6))
  b = rng.normal(size=(200, 6)) + 1.0
  from rin.metrics import feature_statistics, frechet_distance
  assert video_metrics.fvd_from_features(a, b) == pytest.approx(
      frechet_distance(*feature_statistics(a), *feature_statistics(b)))
  assert video_metrics.fvd_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
  # Mean shift of 1 in each of 6 dims contributes ~6.
  assert 5.0 < video_metrics.fvd_from_features(a, b) < 7.5
  with pytest.raises(ValueError, match="same D"):
    video_metrics.fvd_from_features(a, b[:, :5])


def test_fvd_evaluator_runs_a_serialised_feature_network(tmp_path):
  """A small random 3-D conv net exported with jax.export stands in for I3D."""
  k = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 3, 4)) * 0.3

  def net(v):                                        # [B, 4, 12, 12, 3] -> [B, 4]
    h = jax.lax.conv_general_dilated(v, k, (1, 2, 2), "SAME",
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return jnp.tanh(h).mean(axis=(1, 2, 3))

  b = jax.export.symbolic_shape("b")[0]
  exp = jax.export.export(jax.jit(net))(jax.ShapeDtypeStruct((b, 4, 12, 12, 3), jnp.float32))
  path = tmp_path / "net.jax_export"
  path.write_bytes(exp.serialize())
  ev = video_metrics.FVDEvaluator(str(path), batch_size=5)
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (12, 4, 6, 6, 1))        # grey, smaller frames: resized + RGB
  fake = np.clip(real + 0.5, -1, 1)
  feats = ev.features(real)
  want = np.asarray(net(jax.image.resize(jnp.repeat(jnp.asarray(real, jnp.float32), 3, -1),
                                         (12, 4, 12, 12, 3), "bilinear")))
  np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
  assert ev(real, real) == pytest.approx(0.0, abs=1e-6)
  assert ev(fake, real) > 1e-4
  with pytest.raises(ValueError, match=r"videos must be \[B, 4"):
    ev.features(real[:, :3])
  with pytest.raises(FileNotFoundError, match="is not a file"):
    video_metrics.FVDEvaluator(str(tmp_path / "none"))
  (tmp_path / "junk").write_bytes(b"junk")
  with pytest.raises(ValueError, match="not a serialised jax.export"):
    video_metrics.FVDEvaluator(str(tmp_path / "junk"))


def test_gif_grid_has_one_frame_per_clip_frame(tmp_path):
  from PIL import Image
  clips = np.random.default_rng(0).uniform(-1, 1, (3, 5, 8, 8, 1))
  path = str(tmp_path / "g.gif")
  images.save_video_gif(clips[:, :2], clips[:, 2:], clips[:, 2:], path)
  with Image.open(path) as img:
    assert img.n_frames == 5


# --------------------------------------------------------------------------------------
# The CLI end to end (tiny config): train, resume, sample
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_resume_and_sample_cli_on_a_tiny_video_config(tmp_path):
  from tests.rin import subproc
  wd = str(tmp_path / "w")
  cfg = "tests/rin/tiny_video_config.py"

  def run(module, *args):
    log = str(tmp_path / f"{module}.log")
    p = subproc.start(["-m", module, "--config", cfg, "--workdir", wd, *args], log,
                      env=subproc.env(cache_dir=tmp_path / "cache"))
    assert subproc.wait_all([p], timeout=900) == [0], subproc.tail(log)

  run("rin.train", "--stop_at_step=2", "--progress=false")
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
  run("rin.train", "--progress=false")          # resumes at step 2
  lines = open(os.path.join(wd, "metrics.jsonl")).read()
  assert '"eval/psnr"' in lines and '"eval/copy_last_psnr"' in lines
  assert os.path.exists(os.path.join(wd, "samples", "step_0000004.gif"))
  run("rin.sample", "--num_samples=4", "--eval")
  out = os.path.join(wd, "samples", "final_step4")
  z = np.load(out + ".npz")
  assert z["predictions"].shape == (4, 3, 8, 8, 1) and z["truth"].shape == (4, 3, 8, 8, 1)
  assert z["cond"].shape == (4, 3, 8, 8, 1)
  assert os.path.exists(out + ".gif") and os.path.exists(out + "_metrics.json")
