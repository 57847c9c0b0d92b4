"""Plots a training run's curves from its metrics.jsonl.

    python -m bench.plot_training --workdir runs/digits --out bench/results/digits_training.png

Left: training loss (raw and a running mean). Right: the evaluation metrics logged by
rin.train (digits Frechet distance, lower is better; label accuracy of class-conditional
samples and class-histogram entropy, higher is better), or FID when present.
Also prints the evaluation table.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def load(path: str):
  train, evals = [], []
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if "event" in r:
        continue
      if "loss" in r and isinstance(r["loss"], (int, float)):
        train.append(r)
      if any(k.startswith("eval/") for k in r):
        evals.append(r)
  return train, evals


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="runs/digits")
  ap.add_argument("--out", default="bench/results/digits_training.png")
  args = ap.parse_args()
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train, evals = load(f"{args.workdir}/metrics.jsonl")
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  steps = np.array([r["step"] for r in train])
  loss = np.array([r["loss"] for r in train])
  a.plot(steps, loss, alpha=0.35, label="loss (logged)")
  if len(loss) >= 5:
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    a.plot(steps[k - 1:], smooth, label=f"running mean ({k})")
  a.set_xlabel("step"); a.set_ylabel("eps MSE"); a.set_yscale("log"); a.legend()
  a.set_title("training loss")
  if evals:
    es = [r["step"] for r in evals]
    key = "eval/digits_fd" if "eval/digits_fd" in evals[0] else "eval/fid"
    b.plot(es, [r[key] for r in evals], "o-", color="C3", label=key)
    b.set_ylabel(key, color="C3"); b.set_yscale("log"); b.set_xlabel("step")
    if "eval/digits_label_accuracy" in evals[0]:
      b2 = b.twinx()
      b2.plot(es, [r["eval/digits_label_accuracy"] for r in evals], "s--", color="C2",
              label="label accuracy")
      b2.plot(es, [r["eval/digits_class_entropy"] / np.log(10) for r in evals], "^:",
              color="C4", label="class entropy / log 10")
      b2.set_ylim(0, 1.05); b2.legend(loc="center right")
    b.set_title("EMA-sample quality")
    b.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  cols = ["eval/digits_fd", "eval/digits_label_accuracy", "eval/digits_class_entropy",
          "eval/digits_confidence", "eval/digits_is"]
  print("step  " + "  ".join(c.split("/")[1] for c in cols))
  for r in evals:
    print(f"{r['step']:5d} " + "  ".join(f"{r.get(c, float('nan')):.4f}" for c in cols))


if __name__ == "__main__":
  main()
