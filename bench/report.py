"""Result files: JSON (everything), markdown (tables), PNG (optional plot).

A result record is a dict {"benchmark", "environment", "ceilings", "rows", ...};
every row is a flat dict. `write_all` writes <stem>.json and <stem>.md side by side.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Sequence


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if math.isnan(v) or math.isinf(v):
      return str(v)
    a = abs(v)
    if a == 0:
      return "0"
    if a >= 1000:
      return f"{v:,.0f}"
    if a >= 100:
      return f"{v:.1f}"
    if a >= 1:
      return f"{v:.2f}"
    if a >= 0.01:
      return f"{v:.3f}"
    return f"{v:.2e}"
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
  """columns: (key, header) pairs. Missing values are left blank."""
  head = "| " + " | ".join(h for _, h in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
  return "\n".join([head, sep] + body)


def environment_markdown(env: dict, ceilings: Iterable[dict] = ()) -> str:
  dev = env.get("device", {})
  lines = [f"- date (UTC): {env.get('date_utc')}",
           f"- device: {dev.get('platform')} / {dev.get('device_kind')}"
           + (f" ({dev.get('cpu_model')}, {dev.get('cpu_count')} cores)" if dev.get("cpu_model")
              else "") + f", {dev.get('device_count')} device(s)",
           f"- python {env.get('python')}; "
           + ", ".join(f"{k} {v}" for k, v in sorted(env.get("packages", {}).items())),
           f"- git commit: {env.get('git_commit')}",
           f"- load average (1/5/15 min) at start: {env.get('load_average_1_5_15')}"]
  if env.get("command"):
    lines.append(f"- command: `{env['command']}`")
  if env.get("xla_flags"):
    lines.append(f"- XLA_FLAGS: `{env['xla_flags']}`")
  for c in ceilings:
    lines.append(f"- measured ceiling ({c['dtype']}): matmul {c['matmul_n']}^3 "
                 f"{c['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, copy "
                 f"{c['copy_bytes_per_s'] / 1e9:.1f} GB/s (load {c.get('load_average_1_5_15')})")
  return "\n".join(lines)


def write_json(path: str, record: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1, sort_keys=False, default=str, allow_nan=True)
    f.write("\n")
  return path


def load_config(name_or_path: str):
  """A config: a file path ("rin/configs/digits.py") or a name under rin/configs ("cifar10")."""
  import importlib
  import importlib.util
  if name_or_path.endswith(".py"):
    spec = importlib.util.spec_from_file_location("bench_config", name_or_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  else:
    mod = importlib.import_module(f"rin.configs.{name_or_path}")
  return mod.get_config()


def write_report(out_dir: str, name: str, report: dict, markdown, plot) -> str:
  """<out_dir>/<name>.json, .md (markdown(report)) and .png (plot(report, path)); returns
  the markdown, which the quality benchmarks also print."""
  write_json(os.path.join(out_dir, f"{name}.json"), report)
  text = markdown(report)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(text)
  plot(report, os.path.join(out_dir, f"{name}.png"))
  return text


def write_markdown(path: str, title: str, env: dict, sections: Sequence[tuple[str, str]],
                   ceilings: Iterable[dict] = (), notes: Sequence[str] = ()) -> str:
  """sections: (heading, markdown body) pairs."""
  parts = [f"# {title}", "", environment_markdown(env, ceilings), ""]
  for n in notes:
    parts.append(f"> {n}")
  if notes:
    parts.append("")
  for heading, body in sections:
    parts += [f"## {heading}", "", body, ""]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path


def plot_lines(rows: Sequence[dict], path: str, *, x: str, y: str, series: str,
               panel: Sequence[str] = (), xlabel: str | None = None,
               ylabel: str | None = None, logx: bool = True, logy: bool = True,
               title: str = "") -> str | None:
  """One PNG: panels by the `panel` keys, one line per `series` value, y vs x.

  Rows without a positive numeric `y` are skipped. Returns the path, or None when
  matplotlib is missing or there is nothing to draw.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  good = [r for r in rows if isinstance(r.get(y), (int, float)) and r.get(y) and r[y] > 0
          and r.get(x) is not None]
  if not good:
    return None
  panels: dict = {}
  for r in good:
    panels.setdefault(tuple(r.get(k) for k in panel), []).append(r)
  n = len(panels)
  cols = min(n, 3)
  nrows = math.ceil(n / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
  for ax, (key, rs) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
    lines: dict = {}
    for r in rs:
      lines.setdefault(r[series], []).append((r[x], r[y]))
    for name, pts in sorted(lines.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
    if logx:
      ax.set_xscale("log", base=2)
    if logy:
      ax.set_yscale("log")
    ax.set_title(" ".join(f"{k}={v}" for k, v in zip(panel, key)), fontsize=9)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def default_out_dir(kind: str) -> str:
  """bench/results/<device>-<date>/ (the device named, as the issue asks)."""
  import datetime
  from bench.timing import device_slug
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                      f"{device_slug()}-{stamp}")
