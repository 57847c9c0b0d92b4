"""Video prediction quality of the moving-digits job, read against two model-free baselines.

    python -m bench.video_quality                     # rin/configs/moving_digits.py, seeds 0,1,2
    python -m bench.video_quality --seeds 0 --out /tmp/vq

Per seed: `python -m rin.train --config <config>` in a fresh workdir (wall time measured around
the whole command), then its final evaluation (rin.video_metrics on config.eval.num_samples
test clips): per-frame PSNR and SSIM of the predictions against the true continuation, beside
copying the last conditioning frame and blank frames (the conditioning frames' background).
Writes <out>/video_quality.{json,md,png} and copies seed 0's last sample GIF to
<out>/samples.gif. Finished runs are read, not retrained (bench.quality's rule).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import numpy as np

from bench.quality import train_run
from bench.report import load_config, write_report

DEFAULT_CONFIG = "rin/configs/moving_digits.py"
PREDICTORS = (("model", ""), ("copy last frame", "copy_last_"), ("blank frames", "blank_"))


def summarise(runs: dict[int, dict]) -> dict:
  """Per predictor: PSNR / SSIM per seed, and the per-frame PSNR averaged over seeds."""
  out = {}
  for label, prefix in PREDICTORS:
    finals = [r["final"] for r in runs.values()]
    row = {"psnr": [f[prefix + "psnr"] for f in finals]}
    if all(prefix + "ssim" in f for f in finals):
      row["ssim"] = [f[prefix + "ssim"] for f in finals]
    row["psnr_per_frame_mean"] = np.mean([f[prefix + "psnr_per_frame"] for f in finals],
                                         axis=0).tolist()
    out[label] = row
  return out


def markdown(report: dict) -> str:
  seeds = report["seeds"]
  lines = [f"# Moving-digits prediction quality (seeds {seeds}, "
           f"{report['num_samples']} test clips each)", "",
           "PSNR (dB, pixels in [0, 1]) and SSIM of the predicted frames against the true "
           "continuation, averaged over predicted frames; one value per seed.", "",
           "| predictor | PSNR | SSIM |", "|---|---|---|"]
  fmt = lambda v, d: " / ".join(f"{x:.{d}f}" for x in v)
  for label, row in report["summary"].items():
    lines.append(f"| {label} | {fmt(row['psnr'], 2)} | {fmt(row.get('ssim', []), 3) or '-'} |")
  lines += ["", "| seed | steps | wall s |", "|---|---|---|"]
  for s, r in report["runs"].items():
    lines.append(f"| {s} | {r['steps']} | {r['wall_seconds']:.0f} |")
  lines += ["", f"Command: `{report['command']}`", ""]
  return "\n".join(lines)


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  for label, row in report["summary"].items():
    y = row["psnr_per_frame_mean"]
    ax.plot(range(1, len(y) + 1), y, "o-", label=label, ms=3)
  ax.set_xlabel("predicted frame")
  ax.set_ylabel("PSNR (dB), mean over seeds")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default="bench/results/video_quality")
  ap.add_argument("--verbose", action="store_true", help="show the training runs' output")
  args = ap.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    ap.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
  if not seeds:
    ap.error("--seeds: give at least one seed")
  os.makedirs(args.out, exist_ok=True)
  runs = {}
  for s in seeds:
    workdir = os.path.join(args.out, "runs", f"seed{s}")
    print(f"seed {s} ...", flush=True)
    runs[s] = train_run(args.config, workdir, {"train.seed": s}, num_steps=None,
                        verbose=args.verbose, eval_key="eval/psnr")
  gifs = sorted(glob.glob(os.path.join(args.out, "runs", f"seed{seeds[0]}", "samples", "*.gif")))
  if gifs:
    shutil.copyfile(gifs[-1], os.path.join(args.out, "samples.gif"))
  report = {"config": args.config, "seeds": seeds,
            "num_samples": int(load_config(args.config).eval.num_samples),
            "command": "python -m bench.video_quality " + " ".join(argv or sys.argv[1:]),
            "runs": runs, "summary": summarise(runs)}
  print(write_report(args.out, "video_quality", report, markdown, plot))


if __name__ == "__main__":
  main()
