"""Sample quality against sampling steps: DDPM / DDIM / DPM-Solver++(2M), with and without
classifier-free guidance, from trained checkpoints (no download).

    python -m bench.sampler_quality --workdir runs/digits [--workdir-guided runs/digits_cfg]
        [--steps 10,20,50,100,250] [--samplers ddpm,ddim,dpmpp_2m] [--seeds 0,1,2]
        [--guidance 1.0] [--num-samples 1000] [--inception PATH] [--out DIR]

Each workdir is loaded with its own config (<workdir>/config.json, or --config /
--config-guided). Rows: every sampler at every step count, for each seed, scored on
`--num-samples` EMA samples (labels drawn uniformly per seed): on digits data the digits
Frechet distance and label accuracy (rin.metrics.DigitsEvaluator); with --inception (a
pytorch-fid `pt_inception-2015-12-05-*.pth` or the .npz of rin.metrics.InceptionV3) also
FID/IS against the training images. The guided workdir (trained with
config.diffusion.cond_dropout > 0) is scored at guidance 0 and at each --guidance weight.
Every (workdir, sampler, steps, guidance) is jitted once and reused for all seeds.
Writes sampler_quality.json, sampler_quality.md and sampler_quality.png into --out
(default bench/results/<device>-<date>/).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from ml_collections import ConfigDict

from bench import report, timing
from rin import diffusion
from rin import evaluation, sampling, train_state
from rin.configs import base
from rin import xla_cpu

METRIC_KEYS = ("digits_fd", "digits_label_accuracy", "fid", "inception_score")


def load_workdir_config(workdir: str, config_path: str | None = None) -> ConfigDict:
  """The config a workdir was trained with (its config.json, completed with the fields an
  older version did not write), or a config file."""
  if config_path:
    return report.load_config(config_path)
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json; pass --config")
  with open(path) as f:
    return base.complete(json.load(f))


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--{name} takes comma-separated integers, got {text!r}") from None
  if not vals or min(vals) < (1 if name == "steps" else 0):
    raise ValueError(f"--{name} must list integers >= {1 if name == 'steps' else 0}, got {text!r}")
  return vals


class _Model:
  def __init__(self, name, workdir, config, inception):
    self.name, self.workdir = name, workdir
    self.config = ConfigDict(config.to_dict())
    if inception:
      self.config.eval.inception_path = inception
    self.model = train_state.create_model(self.config)
    self.params, self.step = train_state.load_ema_params(self.config, workdir, self.model)
    if not evaluation.has_eval_metric(self.config):
      raise ValueError(f"{workdir}: no metric for data set {self.config.data.name!r}; pass "
                       "--inception with an Inception weights file for FID")
    dataset = None
    if self.config.eval.inception_path and not self.config.eval.fid_reference:
      dataset = train_state.load_and_check_data(self.config)
    self.evaluator = evaluation.Evaluator(self.config, dataset)


def _score(m: _Model, sample_fn, seed: int, n: int, batch: int) -> dict:
  res, _ = evaluation.evaluate(m.config, m.evaluator, sample_fn, m.params, seed=seed,
                               num_samples=n, batch_size=batch)
  return {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}


def run(workdir: str, *, workdir_guided: str | None = None, config: str | None = None,
        config_guided: str | None = None, samplers=diffusion.SAMPLERS,
        steps=(10, 20, 50, 100, 250), seeds=(0, 1, 2), guidance=(1.0,),
        num_samples: int = 1000, batch_size: int = 500, inception: str | None = None,
        out: str | None = None, progress: bool = True) -> dict:
  """Scores every configuration; returns the JSON record (also written to `out`)."""
  from tqdm.auto import tqdm
  for s in samplers:
    if s not in diffusion.SAMPLERS:
      raise ValueError(f"unknown sampler {s!r}; expected some of {diffusion.SAMPLERS}")
  if num_samples < 2 or batch_size < 1:
    raise ValueError(f"num_samples must be >= 2 and batch_size >= 1, got {num_samples}, "
                     f"{batch_size}")
  models = [(_Model("plain", workdir, load_workdir_config(workdir, config), inception),
             (0.0,))]
  if workdir_guided:
    cfg = load_workdir_config(workdir_guided, config_guided)
    if cfg.diffusion.cond_dropout <= 0:
      raise ValueError(f"--workdir-guided={workdir_guided!r} was trained without label "
                       "dropout (config.diffusion.cond_dropout = 0): it has no unconditional "
                       "model to guide with")
    models.append((_Model("guided", workdir_guided, cfg, inception),
                   (0.0,) + tuple(float(w) for w in guidance if w != 0)))
  jobs = [(m, w, s, n) for m, ws in models for w in ws for s in samplers for n in steps]
  rows = []
  bar = tqdm(total=len(jobs) * len(seeds), desc="sampler quality", disable=not progress,
             dynamic_ncols=True)
  for m, w, s, n in jobs:
    sample_fn = sampling.make_sample_fn(m.model, m.config, num_steps=n, sampler=s,
                                         guidance=w)
    for seed in seeds:
      t0 = time.perf_counter()
      res = _score(m, sample_fn, seed, num_samples, batch_size)
      rows.append(dict(model=m.name, checkpoint_step=m.step, guidance=w, sampler=s, steps=n,
                       seed=seed, seconds=time.perf_counter() - t0, **res))
      bar.set_postfix(model=m.name, sampler=s, steps=n,
                      fd=f"{res.get('digits_fd', res.get('fid', float('nan'))):.2f}")
      bar.update(1)
  bar.close()
  summary = summarize(rows)
  record = dict(environment=timing.environment(), command=timing.command_line(),
                workdirs={m.name: m.workdir for m, _ in models}, num_samples=num_samples,
                seeds=list(seeds), rows=rows, summary=summary)
  out = out or report.default_out_dir("sampler_quality")
  record["files"] = write_outputs(record, out)
  return record


def summarize(rows) -> list[dict]:
  """Mean and std over seeds of every metric, per (model, guidance, sampler, steps)."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r["model"], r["guidance"], r["sampler"], r["steps"]), []).append(r)
  out = []
  for (model, w, s, n), rs in groups.items():
    row = dict(model=model, guidance=w, sampler=s, steps=n, seeds=len(rs))
    for k in METRIC_KEYS:
      vals = [r[k] for r in rs if k in r]
      if vals:
        row[k] = float(np.mean(vals))
        row[k + "_std"] = float(np.std(vals))
    out.append(row)
  return out


def _label(r):
  return f"{r['model']} w={r['guidance']:g}"


def write_outputs(record: dict, out: str) -> dict:
  os.makedirs(out, exist_ok=True)
  summary = record["summary"]
  keys = [k for k in METRIC_KEYS if any(k in r for r in summary)]
  table = []
  for r in summary:
    row = {"model": _label(r), "sampler": r["sampler"], "steps": r["steps"]}
    for k in keys:
      if k in r:
        row[k] = f"{r[k]:.4g} ± {r[k + '_std']:.2g}"
    table.append(row)
  md = report.markdown_table(table, [("model", "model / guidance"), ("sampler", "sampler"),
                                     ("steps", "steps")] + [(k, k) for k in keys])
  notes = [f"{record['num_samples']} samples per seed, seeds {record['seeds']}; mean ± std "
           "over seeds; command: " + str(record.get("command"))]
  files = {"json": os.path.join(out, "sampler_quality.json"),
           "md": os.path.join(out, "sampler_quality.md")}
  report.write_markdown(files["md"], "Sample quality against sampling steps",
                        record["environment"], [("Results", md)], notes=notes)
  png = plot(summary, os.path.join(out, "sampler_quality.png"), keys)
  if png:
    files["png"] = png
  report.write_json(files["json"], dict(record, files=files))
  return files


def plot(summary, path: str, keys) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  keys = [k for k in keys if k in ("digits_fd", "digits_label_accuracy", "fid")]
  if not keys:
    return None
  fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
  styles = {"ddpm": "o-", "ddim": "s--", "dpmpp_2m": "^-."}
  for ax, k in zip(axes.flat, keys):
    lines: dict = {}
    for r in summary:
      if k in r:
        lines.setdefault((_label(r), r["sampler"]), []).append((r["steps"], r[k], r[k + "_std"]))
    for (label, s), pts in sorted(lines.items()):
      pts.sort()
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                  fmt=styles.get(s, "o-"), capsize=2, label=f"{s}, {label}")
    ax.set_xscale("log")
    if k != "digits_label_accuracy":
      ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(k)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="Checkpoint workdir (unguided model).")
  ap.add_argument("--workdir-guided", default=None,
                  help="Workdir of a model trained with cond_dropout > 0.")
  ap.add_argument("--config", default=None, help="Config file (default <workdir>/config.json).")
  ap.add_argument("--config-guided", default=None)
  ap.add_argument("--samplers", default=",".join(diffusion.SAMPLERS))
  ap.add_argument("--steps", default="10,20,50,100,250")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--guidance", default="1.0", help="Guidance weights for the guided model.")
  ap.add_argument("--num-samples", type=int, default=1000)
  ap.add_argument("--batch-size", type=int, default=500)
  ap.add_argument("--inception", default=None,
                  help="Inception weights (.pth of pytorch-fid or .npz) for FID/IS.")
  ap.add_argument("--out", default=None)
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  cfg_dtype = load_workdir_config(a.workdir, a.config).train.dtype
  xla_cpu.configure(cfg_dtype)
  try:
    guidance = [float(w) for w in a.guidance.split(",") if w.strip()]
  except ValueError:
    raise SystemExit(f"--guidance takes comma-separated numbers, got {a.guidance!r}")
  rec = run(a.workdir, workdir_guided=a.workdir_guided, config=a.config,
            config_guided=a.config_guided, samplers=[s for s in a.samplers.split(",") if s],
            steps=_ints(a.steps, "steps"), seeds=_ints(a.seeds, "seeds"), guidance=guidance,
            num_samples=a.num_samples, batch_size=a.batch_size, inception=a.inception,
            out=a.out, progress=not a.no_progress)
  print(open(rec["files"]["md"]).read())
  return rec


if __name__ == "__main__":
  main()
