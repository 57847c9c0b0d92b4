"""Sample quality of the digits job, read against baselines that need no model.

    python -m bench.quality                                 # baselines + main runs, 3 seeds
    python -m bench.quality --parts baselines               # the model-free rows only
    python -m bench.quality --parts ablations --ablation-steps 600
    python -m bench.quality --mode samplers --workdir runs/digits   # quality vs sampling steps

Everything is seeded and download-free (sklearn's digits and rin.metrics.DigitsEvaluator,
whose Frechet distance is biased upwards for few samples: every row here uses the same
number of samples, config.eval.num_samples, 256 for digits). Rows:

- baselines (no model): the real training digits, the 179 held-out digits, one Gaussian
  fitted to the training pixels, and ten class-conditional Gaussians (per-class pixel mean
  and covariance, labels drawn uniformly). A diffusion model that loses to the last row has
  not learned digits.
- main: `python -m rin.train --config <config>` per seed (a fresh workdir each, wall time
  measured around the whole command), its evaluation records over training (FD and label
  accuracy at every config.train.eval_every steps), and the final values.
- ablations (the paper's, at this scale): self-conditioning rate 0 vs the config's, the
  cosine vs the config's training schedule, bf16 vs fp32 compute, fewer blocks, fewer
  latents; each for every seed, optionally at a shorter budget (--ablation-steps).

Runs whose workdir already holds a finished run are read, not retrained, so the command can be
stopped and started again. Writes <out>/quality.json, quality.md and quality.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.report import load_config, write_report

DEFAULT_CONFIG = "rin/configs/digits.py"

# name -> (--config.* overrides, what the paper says).
ABLATIONS = {
    "self_cond_rate_0": ({"diffusion.self_cond_rate": 0.0},
                         "paper: self-conditioning rate 0.9 beats lower rates"),
    "train_schedule_cosine": ({"diffusion.train_schedule": "cosine"},
                              "paper: sigmoid is more stable than cosine, most for large images"),
    "bfloat16": ({"train.dtype": "bfloat16"}, "compute dtype; parameters stay float32"),
    "one_block": ({"model.num_blocks": 1}, "fewer read-compute-write blocks"),
    "half_latents": ({"model.num_latents": None}, "half the latents"),
}


# ----------------------------------------------------------------------------
# Model-free baselines.
# ----------------------------------------------------------------------------

def _digits(split: str):
  from rin import data
  ds = data.load_dataset("digits", image_size=8, split=split)
  x = ds.images.astype(np.float64) / 127.5 - 1.0
  return x, np.asarray(ds.labels)


def gaussian_samples(rng: np.random.Generator, images: np.ndarray, n: int) -> np.ndarray:
  """n draws from one Gaussian fitted to the pixels of `images` [N, H, W, C]."""
  flat = images.reshape(images.shape[0], -1)
  draws = rng.multivariate_normal(flat.mean(0), np.cov(flat, rowvar=False), size=n,
                                  method="eigh")
  return np.clip(draws, -1.0, 1.0).reshape((n,) + images.shape[1:])


def class_gaussian_samples(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                           n: int, num_classes: int = 10):
  """n draws from ten class-conditional Gaussians, the classes drawn uniformly."""
  want = rng.integers(0, num_classes, n)
  out = np.empty((n,) + images.shape[1:])
  for k in range(num_classes):
    idx = np.flatnonzero(want == k)
    if idx.size:
      out[idx] = gaussian_samples(rng, images[labels == k], idx.size)
  return out, want


def baselines(evaluator, num_samples: int, seeds) -> dict:
  train_x, train_y = _digits("train")
  test_x, test_y = _digits("test")
  rows = {"real_train_digits": [], "held_out_digits": [], "gaussian": [],
          "class_gaussians": []}
  for s in seeds:
    rng = np.random.default_rng(s)
    idx = rng.choice(len(train_x), num_samples, replace=False)
    rows["real_train_digits"].append(evaluator(train_x[idx], train_y[idx]))
    rows["held_out_digits"].append(evaluator(test_x, test_y))
    rows["gaussian"].append(evaluator(gaussian_samples(rng, train_x, num_samples)))
    rows["class_gaussians"].append(evaluator(*class_gaussian_samples(rng, train_x, train_y,
                                                                      num_samples)))
  return {k: _summary(v) for k, v in rows.items()}


# ----------------------------------------------------------------------------
# Training runs.
# ----------------------------------------------------------------------------

def _read_metrics(workdir: str, eval_key: str = "eval/digits_fd"):
  """The evaluation records (those holding `eval_key`, keys without "eval/") and the last
  step of a run's metrics.jsonl."""
  evals, last_step = [], 0
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return evals, last_step
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      last_step = max(last_step, int(r.get("step", 0)))
      if eval_key in r:
        rec = {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
        rec["step"] = int(r["step"])
        evals.append(rec)
  return evals, last_step


def train_run(config_path: str, workdir: str, overrides: dict, *, num_steps: int | None,
              verbose: bool, eval_key: str = "eval/digits_fd") -> dict:
  """Trains (or reads a finished run) with `python -m rin.train`; returns its records."""
  meta_path = os.path.join(workdir, "bench_quality_run.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      return json.load(f)
  cmd = [sys.executable, "-m", "rin.train", "--config", config_path, "--workdir", workdir,
         "--progress=false"]
  if num_steps:
    cmd.append(f"--config.train.num_steps={num_steps}")
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  print("  $", " ".join(cmd[2:]), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, stdout=None if verbose else subprocess.DEVNULL,
                        stderr=None if verbose else subprocess.PIPE, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{(proc.stderr or '')[-3000:]}")
  evals, last_step = _read_metrics(workdir, eval_key)
  if not evals:
    raise RuntimeError(f"{workdir}: no {eval_key} records (config.train.eval_every?)")
  rec = {"command": " ".join(cmd[2:]), "wall_seconds": wall, "steps": last_step,
         "evals": evals, "final": evals[-1]}
  secs = [e.get("eval_seconds") for e in evals]
  if len(evals) > 1 and None not in secs:
    # The curve's extra evaluations, taken out: the first one (with its compile) stays, as
    # the config's own end-of-run evaluation pays it too.
    rec["wall_seconds_without_curve"] = wall - sum(secs) + secs[0]
  with open(meta_path, "w") as f:
    json.dump(rec, f, indent=1)
  return rec


def _resolve(overrides: dict, config) -> dict:
  out = {}
  for k, v in overrides.items():
    if k == "model.num_latents" and v is None:
      v = config.model.num_latents // 2
    out[k] = v
  return out


def _summary(results: list[dict]) -> dict:
  fd = [r["digits_fd"] for r in results]
  acc = [r["digits_label_accuracy"] for r in results if r.get("digits_label_accuracy") is not None]
  out = {"digits_fd": fd, "digits_fd_mean": float(np.mean(fd))}
  if acc:
    out.update(digits_label_accuracy=acc, digits_label_accuracy_mean=float(np.mean(acc)))
  return out


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------

def _fmt(vals, digits=2):
  return " / ".join(f"{v:.{digits}f}" for v in vals) if vals else "-"


def markdown(report: dict) -> str:
  lines = [f"# Digits sample quality ({report['num_samples']} samples per row)", "",
           "Frechet distance of rin.metrics.DigitsEvaluator features (lower is better) and the "
           "fraction of samples its classifier assigns to the requested class. One value per "
           "seed (baselines: seeds 0, 1, 2; each run row names its seeds).", "",
           "| row | steps | wall s (per seed) | digits FD | label accuracy | note |",
           "|---|---|---|---|---|---|"]
  for name, row in report.get("baselines", {}).items():
    lines.append(f"| baseline: {name} | - | - | {_fmt(row['digits_fd'])} | "
                 f"{_fmt(row.get('digits_label_accuracy', []))} | no model |")
  for name, row in report.get("runs", {}).items():
    wall = _fmt(row["wall_seconds"], 0)
    bare = [w for w in row.get("wall_seconds_without_curve", []) if w is not None]
    if bare:
      wall += f" (without the curve's evaluations: {_fmt(bare, 0)})"
    seeds = f"; seeds {', '.join(map(str, row['seeds']))}" if row.get("seeds") else ""
    lines.append(f"| {name} | {row['steps']} | {wall} | "
                 f"{_fmt(row['digits_fd'])} | {_fmt(row.get('digits_label_accuracy', []))} | "
                 f"{row.get('note', '')}{seeds} |")
  if report.get("main_curve"):
    lines += ["", "Main runs over training (FD / accuracy per seed):", "",
              "| step | digits FD | label accuracy |", "|---|---|---|"]
    for step, fds, accs in report["main_curve"]:
      lines.append(f"| {step} | {_fmt(fds)} | {_fmt(accs)} |")
  commands = sorted({row["command"] for row in report.get("runs", {}).values()
                     if row.get("command")} | {report["command"]})
  lines += ["", "Commands:", ""] + [f"- `{c}`" for c in commands] + [""]
  return "\n".join(lines)


def plot(report: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  curve = report.get("main_curve") or []
  base = report.get("baselines", {})
  for ax, key, title in ((axes[0], "digits_fd", "digits Frechet distance (lower is better)"),
                         (axes[1], "digits_label_accuracy", "label accuracy")):
    if curve:
      steps = [c[0] for c in curve]
      vals = np.array([c[1] if key == "digits_fd" else c[2] for c in curve], dtype=float)
      seeds = report.get("runs", {}).get("main", {}).get("seeds") or report["seeds"]
      for j in range(vals.shape[1]):
        ax.plot(steps, vals[:, j], marker="o", label=f"main, seed {seeds[j]}")
    for name, style in (("class_gaussians", "--"), ("gaussian", ":"), ("held_out_digits", "-.")):
      if name in base and f"{key}_mean" in base[name]:
        ax.axhline(base[name][f"{key}_mean"], ls=style, c="k", lw=1, label=name)
    ax.set_title(title)
    ax.set_xlabel("training step")
    if key == "digits_fd":
      ax.set_yscale("log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _main_curve(runs: list[dict]):
  steps = sorted({e["step"] for e in runs[0]["evals"]})
  curve = []
  for s in steps:
    fds, accs = [], []
    for r in runs:
      e = next((e for e in r["evals"] if e["step"] == s), None)
      if e is None:
        break
      fds.append(e["digits_fd"])
      accs.append(e["digits_label_accuracy"])
    else:
      curve.append((s, fds, accs))
  return curve


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--mode", choices=("training", "samplers"), default="training",
                  help="training: baselines, main runs and ablations; samplers: quality vs "
                       "sampling steps of a trained checkpoint (bench.sampler_quality)")
  ap.add_argument("--config", default=DEFAULT_CONFIG)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--parts", default="baselines,main",
                  help="comma list of baselines, main, ablations")
  ap.add_argument("--ablations", default=",".join(ABLATIONS),
                  help=f"comma list of {', '.join(ABLATIONS)}")
  ap.add_argument("--ablation-steps", type=int, default=None,
                  help="train the ablations (and the config they are compared with) for this "
                       "many steps instead of config.train.num_steps")
  ap.add_argument("--curve-every", type=int, default=None,
                  help="main runs: evaluate every this many steps for the FD-over-training "
                       "curve (default: a quarter of config.train.num_steps); the table also "
                       "gives the wall time without these extra evaluations")
  ap.add_argument("--out", default="bench/results/quality")
  ap.add_argument("--verbose", action="store_true", help="show the training runs' output")
  args, rest = ap.parse_known_args(argv)
  if args.mode == "samplers":
    from bench import sampler_quality
    return sampler_quality.main(rest)
  if rest:
    ap.error(f"unrecognised arguments: {' '.join(rest)}")

  from rin import metrics
  config = load_config(args.config)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  parts = set(args.parts.split(","))
  unknown = parts - {"baselines", "main", "ablations"}
  if unknown:
    ap.error(f"--parts: unknown {sorted(unknown)}; expected baselines, main, ablations")
  names = [a for a in args.ablations.split(",") if a]
  bad = [a for a in names if a not in ABLATIONS]
  if bad:
    ap.error(f"--ablations: unknown {bad}; expected some of {list(ABLATIONS)}")
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "quality.json")
  report = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      report = json.load(f)
  report.update(num_samples=int(config.eval.num_samples), seeds=seeds, config=args.config,
                command="python -m bench.quality " + " ".join(argv or sys.argv[1:]))
  report.setdefault("runs", {})

  if "baselines" in parts:
    print("baselines ...", flush=True)
    evaluator = metrics.DigitsEvaluator(config.model.image_size)
    report["baselines"] = baselines(evaluator, int(config.eval.num_samples), seeds)

  def runs_for(name, overrides, num_steps, note):
    recs = []
    for s in seeds:
      workdir = os.path.join(args.out, "runs", name, f"seed{s}")
      recs.append(train_run(args.config, workdir, {"train.seed": s, **overrides},
                            num_steps=num_steps, verbose=args.verbose))
    report["runs"][name] = {
        "note": note, "overrides": overrides, "steps": recs[0]["steps"], "seeds": seeds,
        "command": report["command"],
        "wall_seconds": [r["wall_seconds"] for r in recs],
        "wall_seconds_without_curve": [r.get("wall_seconds_without_curve") for r in recs],
        **_summary([r["final"] for r in recs])}
    return recs

  if "main" in parts:
    print("main runs ...", flush=True)
    every = args.curve_every or max(1, int(config.train.num_steps) // 4)
    recs = runs_for("main", {"train.eval_every": every}, None,
                    f"{args.config} as it is, evaluated every {every} steps for the curve")
    report["main_curve"] = _main_curve(recs)
  if "ablations" in parts:
    steps = args.ablation_steps
    if steps:
      print(f"ablation reference at {steps} steps ...", flush=True)
      runs_for(f"reference_{steps}_steps", {}, steps, "the config, at the ablation budget")
    for name in names:
      overrides, note = ABLATIONS[name]
      print(f"ablation {name} ...", flush=True)
      runs_for(name if not steps else f"{name}_{steps}_steps", _resolve(overrides, config),
               steps, note)

  print(write_report(args.out, "quality", report, markdown, plot))


if __name__ == "__main__":
  main()
