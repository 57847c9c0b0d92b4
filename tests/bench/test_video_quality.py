"""bench.video_quality's summary and report from synthetic run records (no training)."""
import pytest

from bench import video_quality


def _final(shift):
  rec = {}
  for prefix, base in (("", 20.0), ("copy_last_", 12.0), ("blank_", 14.0)):
    rec[prefix + "psnr_per_frame"] = [base + shift, base + shift - 2.0]
    rec[prefix + "psnr"] = base + shift - 1.0
    rec[prefix + "ssim"] = base / 100
  return rec


def test_summary_keeps_each_predictor_and_averages_frames(tmp_path):
  runs = {0: {"final": _final(0.0), "steps": 10, "wall_seconds": 5.0},
          1: {"final": _final(2.0), "steps": 10, "wall_seconds": 6.0}}
  summ = video_quality.summarise(runs)
  assert summ["model"]["psnr"] == [19.0, 21.0]
  assert summ["copy last frame"]["psnr"] == [11.0, 13.0]
  assert summ["blank frames"]["psnr_per_frame_mean"] == pytest.approx([15.0, 13.0])
  report = {"seeds": [0, 1], "num_samples": 4, "command": "x", "runs": runs, "summary": summ}
  md = video_quality.markdown(report)
  assert "| model | 19.00 / 21.00 | 0.200 / 0.200 |" in md
  video_quality.plot(report, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 1000


def test_bad_seeds_are_refused():
  with pytest.raises(SystemExit):
    video_quality.main(["--seeds", "a,b"])


def test_ablation_rows_join_the_table_and_plot(tmp_path):
  runs = {0: {"final": _final(0.0), "steps": 10, "wall_seconds": 5.0}}
  ab_runs = {0: {"final": _final(-5.0), "steps": 10, "wall_seconds": 4.0}}
  report = {"seeds": [0], "num_samples": 4, "command": "x", "runs": runs,
            "summary": video_quality.summarise(runs),
            "ablations": {"model, conv_kernel_size=0": {
                "seeds": [0], "runs": ab_runs,
                "summary": video_quality.summarise(ab_runs, video_quality.PREDICTORS[:1])}}}
  md = video_quality.markdown(report)
  assert "| model, conv_kernel_size=0 (seeds [0]) | 14.00 | 0.200 |" in md
  assert "| model, conv_kernel_size=0 | 0 | 10 | 4 |" in md
  video_quality.plot(report, str(tmp_path / "p.png"))


def test_bad_ablations_are_refused():
  with pytest.raises(SystemExit):
    video_quality.main(["--seeds", "0", "--ablate", "model.conv_kernel_size"])
