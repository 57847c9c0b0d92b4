"""Video prediction quality of the moving-digits job, read against two model-free baselines.

    python -m bench.video_quality                     # rin/configs/moving_digits.py, seeds 0,1,2
    python -m bench.video_quality --seeds 0 --out /tmp/vq
    python -m bench.video_quality --ablate model.conv_kernel_size=0 --ablate_seeds 0

Per seed: `python -m rin.train --config <config>` in a fresh workdir (wall time measured around
the whole command), then its final evaluation (rin.video_metrics on config.eval.num_samples
test clips): per-frame PSNR and SSIM of the predictions against the true continuation, beside
copying the last conditioning frame and blank frames (the conditioning frames' background).
Writes <out>/video_quality.{json,md,png} and copies seed 0's last sample GIF to
<out>/samples.gif. Finished runs are read, not retrained (bench.quality's rule).
`--set KEY=VALUE` (repeatable) overrides the config in every run (e.g. train.num_steps on a
GPU); `--ablate KEY=VALUE` (repeatable) also trains the config with that one override (on
`--ablate_seeds`, default the same seeds) and adds its row to the table and plot.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import shutil
import sys

import numpy as np

from bench.quality import train_run
from bench.report import load_config, write_report

DEFAULT_CONFIG = "rin/configs/moving_digits.py"
PREDICTORS = (("model", ""), ("copy last frame", "copy_last_"), ("blank frames", "blank_"))


def summarise(runs: dict[int, dict], predictors=PREDICTORS) -> dict:
  """Per predictor: PSNR / SSIM per seed, and the per-frame PSNR averaged over seeds."""
  out = {}
  for label, prefix in predictors:
    finals = [r["final"] for r in runs.values()]
    row = {"psnr": [f[prefix + "psnr"] for f in finals]}
    if all(prefix + "ssim" in f for f in finals):
      row["ssim"] = [f[prefix + "ssim"] for f in finals]
    row["psnr_per_frame_mean"] = np.mean([f[prefix + "psnr_per_frame"] for f in finals],
                                         axis=0).tolist()
    out[label] = row
  return out


def _parse_ablation(text: str) -> tuple[str, object]:
  if "=" not in text:
    raise ValueError(f"--set/--ablate {text!r}: expected KEY=VALUE (a config key, e.g. "
                     f"model.conv_kernel_size=0)")
  k, v = text.split("=", 1)
  try:
    return k, ast.literal_eval(v)
  except (ValueError, SyntaxError):
    return k, v


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
  for label, ab in report.get("ablations", {}).items():
    row = ab["summary"]["model"]
    lines.append(f"| {label} (seeds {ab['seeds']}) | {fmt(row['psnr'], 2)} | "
                 f"{fmt(row.get('ssim', []), 3) or '-'} |")
  lines += ["", "| run | seed | steps | wall s |", "|---|---|---|---|"]
  for s, r in report["runs"].items():
    lines.append(f"| model | {s} | {r['steps']} | {r['wall_seconds']:.0f} |")
  for label, ab in report.get("ablations", {}).items():
    for s, r in ab["runs"].items():
      lines.append(f"| {label} | {s} | {r['steps']} | {r['wall_seconds']:.0f} |")
  lines += ["", f"Command: `{report['command']}`", ""]
  return "\n".join(lines)


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  rows = list(report["summary"].items()) + [
      (label, ab["summary"]["model"]) for label, ab in report.get("ablations", {}).items()]
  for label, row in rows:
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
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for every run, e.g. train.num_steps=10000")
  ap.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                  help="also train with this config override, e.g. model.conv_kernel_size=0")
  ap.add_argument("--ablate_seeds", default=None, help="seeds of the ablations (default --seeds)")
  args = ap.parse_args(argv)

  def seed_list(text, flag):
    try:
      out = [int(s) for s in text.split(",") if s]
    except ValueError:
      ap.error(f"{flag} must be a comma list of integers, got {text!r}")
    if not out:
      ap.error(f"{flag}: give at least one seed")
    return out
  seeds = seed_list(args.seeds, "--seeds")
  ablate_seeds = seed_list(args.ablate_seeds, "--ablate_seeds") if args.ablate_seeds else seeds
  try:
    ablations = [_parse_ablation(a) for a in args.ablate]
    common = dict(_parse_ablation(a) for a in args.set)
  except ValueError as e:
    ap.error(str(e))
  os.makedirs(args.out, exist_ok=True)
  runs = {}
  for s in seeds:
    workdir = os.path.join(args.out, "runs", f"seed{s}")
    print(f"seed {s} ...", flush=True)
    runs[s] = train_run(args.config, workdir, {**common, "train.seed": s}, num_steps=None,
                        verbose=args.verbose, eval_key="eval/psnr")
  gifs = sorted(glob.glob(os.path.join(args.out, "runs", f"seed{seeds[0]}", "samples", "*.gif")))
  if gifs:
    shutil.copyfile(gifs[-1], os.path.join(args.out, "samples.gif"))
  ablation_reports = {}
  for key, value in ablations:
    label = f"model, {key.split('.')[-1]}={value}"
    ab_runs = {}
    for s in ablate_seeds:
      workdir = os.path.join(args.out, "runs", f"{key}={value}", f"seed{s}")
      print(f"{label}: seed {s} ...", flush=True)
      ab_runs[s] = train_run(args.config, workdir, {**common, "train.seed": s, key: value},
                             num_steps=None, verbose=args.verbose, eval_key="eval/psnr")
    ablation_reports[label] = {"override": {key: value}, "seeds": ablate_seeds,
                               "runs": ab_runs, "summary": summarise(ab_runs, PREDICTORS[:1])}
  report = {"config": args.config, "seeds": seeds, "overrides": common,
            "ablations": ablation_reports,
            "num_samples": int(load_config(args.config).eval.num_samples),
            "command": "python -m bench.video_quality " + " ".join(argv or sys.argv[1:]),
            "runs": runs, "summary": summarise(runs)}
  print(write_report(args.out, "video_quality", report, markdown, plot))


if __name__ == "__main__":
  main()
