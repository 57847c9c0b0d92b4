"""Roofline of every RIN kernel at the published shapes (kernels.shapes) on TPU v5e and v5p.

    python -m bench.roofline [--batch 64] [--dtype bfloat16] [--out bench/results/roofline.json]

For each kernel (forward, and backward alone) prints FLOPs, minimum HBM bytes
(bench/costs.py), arithmetic intensity and the roofline time max(FLOPs / peak,
bytes / bandwidth) at datasheet rates, as a markdown table, and writes the same
rows as JSON. A measured time divided by this is the fraction of roofline reached.
"""
from __future__ import annotations

import argparse
import json
import os

from bench import costs
from kernels import shapes

# Datasheet rates (bf16 dense matmul, HBM bandwidth).
CHIPS = {
    "v5e": {"peak_flops": 197e12, "hbm_bytes_per_s": 819e9},
    "v5p": {"peak_flops": 459e12, "hbm_bytes_per_s": 2765e9},
}


def kernel_costs(config: str, batch: int, dtype: str):
  for backward in (False, True):
    for o in shapes.op_shapes(shapes.BY_NAME[config]):
      yield o.op, "bwd" if backward else "fwd", costs.op_cost(o, batch, dtype,
                                                             backward=backward)


def rows(batch: int, dtype: str):
  out = []
  for config in (s.name for s in shapes.PUBLISHED):
    for kernel, pas, c in kernel_costs(config, batch, dtype):
      row = {"config": config, "kernel": kernel, "pass": pas, "batch": batch, "dtype": dtype,
             "flops": c.flops, "bytes": c.bytes, "intensity": c.intensity}
      for chip, r in CHIPS.items():
        t = c.roofline_s(r["peak_flops"], r["hbm_bytes_per_s"])
        row[f"{chip}_roofline_us"] = t * 1e6
        row[f"{chip}_bound"] = "compute" if c.flops / r["peak_flops"] >= c.bytes / r[
            "hbm_bytes_per_s"] else "memory"
      out.append(row)
  return out


def markdown(rs) -> str:
  head = ("| config | kernel | pass | GFLOP | MB | FLOP/B | v5e us (bound) | v5p us (bound) |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rs:
    lines.append(f"| {r['config']} | {r['kernel']} | {r['pass']} | {r['flops'] / 1e9:.2f} | "
                 f"{r['bytes'] / 1e6:.2f} | {r['intensity']:.0f} | "
                 f"{r['v5e_roofline_us']:.1f} ({r['v5e_bound']}) | "
                 f"{r['v5p_roofline_us']:.1f} ({r['v5p_bound']}) |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64, help="examples per chip")
  ap.add_argument("--dtype", default="bfloat16", choices=sorted(costs.ITEMSIZE))
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "roofline.json"))
  args = ap.parse_args(argv)
  rs = rows(args.batch, args.dtype)
  print(f"Roofline per call, batch {args.batch} per chip, {args.dtype}; chips: "
        + ", ".join(f"{k} {v['peak_flops'] / 1e12:.0f} TFLOP/s, {v['hbm_bytes_per_s'] / 1e9:.0f} GB/s"
                    for k, v in CHIPS.items()))
  print(markdown(rs))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"chips": CHIPS, "batch": args.batch, "dtype": args.dtype, "rows": rs}, f, indent=1)
  print(f"\nwrote {args.out}")
  return rs


if __name__ == "__main__":
  main()
