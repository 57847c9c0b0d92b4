"""bench.video_conditioning: the regression diagnostic on the tiny video config (seconds)."""
import numpy as np
import pytest

from bench import video_conditioning

TINY = "tests/rin/tiny_video_config.py"


def test_regress_reports_loss_and_the_baselines():
  res = video_conditioning.regress(TINY, steps=4, batch_size=4, speed=0.0, log_every=2,
                                   model_overrides={"tape_pos_encoding": "sin_cos_plus_learned"})
  assert [s for s, _ in res["loss_curve"]] == [2, 4]
  assert all(np.isfinite(l) and l > 0 for _, l in res["loss_curve"])
  # Static digits: the last conditioning frame IS the continuation (PSNR capped at 100 dB),
  # and an untrained network is far from it.
  assert res["copy_last_psnr"] == 100.0
  assert 0 < res["test_psnr"] < 40 and 0 < res["mean_frame_psnr"] < 100


def test_moving_digits_make_copying_imperfect():
  res = video_conditioning.regress(TINY, steps=1, batch_size=4, speed=1.5, log_every=1)
  assert res["copy_last_psnr"] < 40


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="no field 'interface_width'"):
    video_conditioning.regress(TINY, steps=1, model_overrides={"interface_width": 3})
  with pytest.raises(ValueError, match="--optimizer"):
    video_conditioning.regress(TINY, steps=1, optimizer="sgd")
  with pytest.raises(ValueError, match="name=value"):
    video_conditioning._parse_sets(["interface_dim"])
  assert video_conditioning._parse_sets(["interface_dim=128", "tape_pos_encoding=learned"]) \
      == {"interface_dim": 128, "tape_pos_encoding": "learned"}


def test_zero_noisy_input_is_deterministic_and_named():
  a = video_conditioning.regress(TINY, steps=2, batch_size=4, speed=1.5, log_every=1,
                                 noisy_input="zeros")
  b = video_conditioning.regress(TINY, steps=2, batch_size=4, speed=1.5, log_every=1,
                                 noisy_input="zeros", seed=0)
  assert a["noisy_input"] == "zeros" and a["test_psnr"] == b["test_psnr"]
  with pytest.raises(ValueError, match="--noisy_input"):
    video_conditioning.regress(TINY, steps=1, noisy_input="ones")


def test_conv_control_learns_a_static_copy():
  # Static digits: the continuation is the last conditioning frame, which a conv net with
  # local receptive fields fits in a few dozen steps; an untrained one is far from it.
  res = video_conditioning.conv_control(TINY, steps=60, batch_size=8, speed=0.0,
                                        learning_rate=3e-3, width=16, log_every=20)
  first, last = res["loss_curve"][0][1], res["loss_curve"][-1][1]
  assert last < 0.5 * first, res["loss_curve"]
  assert res["test_psnr"] > res["mean_frame_psnr"] + 3, res
