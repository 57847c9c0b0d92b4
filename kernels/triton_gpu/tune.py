"""Regenerates autotune_table.py on a GPU by timing candidate block sizes.

    python -m kernels.triton_gpu.tune [--dtype bfloat16] [--write]

For each attention shape of the published RIN configs (kernels.triton_gpu.shapes.PUBLISHED,
at --batch), times forward + backward of the op through jax-triton for every candidate in
a small grid, keeps the fastest, prints the table and (with --write) rewrites TABLE in
autotune_table.py (WINS, its other half, is written by gpu_check --write-wins).
Needs an NVIDIA GPU with jax-triton; not runnable on CPU.
"""
from __future__ import annotations

import argparse
import itertools
import os
import pprint
import sys

import jax
import jax.numpy as jnp

from bench import timing

ATTN_GRID = dict(block_q=(64, 128), block_kv=(64, 128), num_warps=(4, 8),
                 num_stages=(2, 3))


def _time(f, *args, iters=20):
  """Median seconds per call of f(*args): one warm-up call, then `iters` timed ones."""
  return timing.time_calls(f, [args], warmup=1, repeats=iters, sync=timing.block).median


def _best(make_fn, args, grid):
  best = None
  for values in itertools.product(*grid.values()):
    cand = dict(zip(grid, values))
    try:
      t = _time(make_fn(cand), *args)
    except Exception as e:  # invalid for this shape (budget, compile failure)
      print("  skip", cand, type(e).__name__, str(e)[:80])
      continue
    if best is None or t < best[0]:
      best = (t, cand)
  return best


def tune(dtype, batch):
  from kernels.triton_gpu import shapes as cr
  from kernels.triton_gpu import config
  from kernels.triton_gpu.attention import cross_attention
  table = {}
  seen = set()
  for s in cr.PUBLISHED:
    heads = s.heads
    dh = s.head_dim or s.width // s.heads
    for lq, lk in ((s.lq, s.lk),):
      key = f"attn:{lq}x{lk}x{dh}:{dtype}"
      if key in seen:
        continue
      seen.add(key)
      ks = jax.random.split(jax.random.key(0), 3)
      q = jax.random.normal(ks[0], (batch, lq, heads, dh), dtype)
      k = jax.random.normal(ks[1], (batch, lk, heads, dh), dtype)
      v = jax.random.normal(ks[2], (batch, lk, heads, dh), dtype)
      def make(c):
        bs = config.BlockSizes(**c, block_q_bwd=c["block_q"], block_kv_bwd=c["block_kv"])
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(cross_attention(
            q, k, v, block_sizes=bs).astype(jnp.float32)), argnums=(0, 1, 2)))
      best = _best(make, (q, k, v), ATTN_GRID)
      if best:
        c = best[1]
        table[key] = dict(c, block_q_bwd=c["block_q"], block_kv_bwd=c["block_kv"])
        print(key, f"{best[0] * 1e6:.1f} us", table[key])
  return table


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--write", action="store_true")
  a = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("tune.py needs a GPU (jax.default_backend() is "
          f"{jax.default_backend()!r})", file=sys.stderr)
    return 2
  table = tune(jnp.dtype(a.dtype), a.batch)
  text = pprint.pformat(table, width=100, sort_dicts=True)
  print(text)
  if a.write:
    from kernels.triton_gpu import autotune_table
    path = autotune_table.__file__
    src = open(path).read()
    head = src[: src.index("\nTABLE: dict") + 1]
    with open(path, "w") as fh:
      fh.write(head + f"TABLE: dict[str, dict[str, int]] = {text}\n")
    print("wrote", os.path.relpath(path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
