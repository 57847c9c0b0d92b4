"""Regenerates TABLE in kernels/triton_gpu/autotune_table.py on a GPU by timing candidate
block sizes.

    python -m bench.triton_tune [--dtype bfloat16] [--write]

For each attention shape of the published RIN configs (the attention inside
bench.triton_gpu_check's ops, kernels.shapes, at --batch), times forward + backward of the
op through jax-triton for every candidate in a small grid, keeps the fastest, prints the
table and (with --write) rewrites TABLE (WINS, its other half, is written by
`python -m bench.triton_gpu_check --write-wins`). Needs an NVIDIA GPU with jax-triton.
"""
from __future__ import annotations

import argparse
import itertools
import pprint
import sys

import jax
import jax.numpy as jnp

from bench import triton_gpu_check
from kernels import shapes
from kernels.triton_gpu import config
from kernels.triton_gpu.attention import cross_attention

ATTN_GRID = dict(block_q=(64, 128), block_kv=(64, 128), num_warps=(4, 8),
                 num_stages=(2, 3))


def _best(make_fn, args, grid, iters):
  best = None
  for values in itertools.product(*grid.values()):
    cand = dict(zip(grid, values))
    try:
      t = triton_gpu_check.time_us(make_fn(cand), args, iters)
    except Exception as e:  # invalid for this shape (budget, compile failure)
      print("  skip", cand, type(e).__name__, str(e)[:80])
      continue
    if best is None or t < best[0]:
      best = (t, cand)
  return best


def tune(dtype, batch, iters=20):
  table = {}
  seen = set()
  for s in shapes.distinct_ops(shapes.PUBLISHED, triton_gpu_check.OPS):
    key = f"attn:{s.lq}x{s.lk}x{s.head_dim}:{dtype}"
    if key in seen:
      continue
    seen.add(key)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (batch, s.lq, s.heads, s.head_dim), dtype)
    k = jax.random.normal(ks[1], (batch, s.lk, s.heads, s.head_dim), dtype)
    v = jax.random.normal(ks[2], (batch, s.lk, s.heads, s.head_dim), dtype)

    def make(c):
      bs = config.BlockSizes(**c, block_q_bwd=c["block_q"], block_kv_bwd=c["block_kv"])
      return jax.jit(jax.grad(lambda q, k, v: jnp.sum(cross_attention(
          q, k, v, block_sizes=bs).astype(jnp.float32)), argnums=(0, 1, 2)))
    best = _best(make, (q, k, v), ATTN_GRID, iters)
    if best:
      c = best[1]
      table[key] = dict(c, block_q_bwd=c["block_q"], block_kv_bwd=c["block_kv"])
      print(key, f"{best[0]:.1f} us", table[key])
  return table


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--write", action="store_true")
  a = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("bench.triton_tune needs a GPU (jax.default_backend() is "
          f"{jax.default_backend()!r})", file=sys.stderr)
    return 2
  table = tune(jnp.dtype(a.dtype), a.batch)
  print(pprint.pformat(table, width=100, sort_dicts=True))
  if a.write:
    triton_gpu_check.rewrite_autotune_table(table=table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
