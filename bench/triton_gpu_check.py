"""One prepared GPU check: numerics through jax-triton (bf16 included) and timings.

    python -m bench.triton_gpu_check [--out bench/results/triton_gpu_check.md]
        [--write-wins]        # record the Triton-vs-XLA timings in autotune_table.WINS
    python -m bench.triton_gpu_check --interpret --quick   # CPU dry run of this script

For every published RIN shape (kernels.shapes.distinct_ops of OPS below, at --batch): forward
and gradients of the Triton op vs. the float64 reference (max error relative to
max(1, |ref|)), then the time of forward+backward for implementation="triton", "xla"
(jitted reference, default precision) and, for attention, jax.nn.dot_product_attention:
median microseconds per call over --iters calls, each waited on
(bench.timing.time_calls). Writes a markdown table. With --write-wins (GPU only), each
op/shape class's fwd+bwd medians go into kernels/triton_gpu/autotune_table.py WINS,
which `implementation=None` reads (kernels/api.py): Triton becomes the default only
where it measured faster.
"""
from __future__ import annotations

import argparse
import os
import pprint
import sys

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from bench import timing
from kernels import api, shapes
from kernels.triton_gpu import autotune_table

# The block ops (their attention inside) and the latent self-attention.
OPS = ("read_block", "write_block", "latent_self_attention")


def _rel_err(got, want):
  errs = []
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g = np.asarray(g, np.float64)
    w = np.asarray(w, np.float64)
    if not np.all(np.isfinite(g)):
      return float("nan")
    errs.append(np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w))))
  return float(max(errs))


def time_us(f, args, iters):
  """Median microseconds per call of f(*args): one warm-up call, then `iters` timed ones."""
  t = timing.time_calls(f, [args], warmup=1, repeats=iters, sync=timing.block)
  return t.median * 1e6


def _materialize(sds_tree, key):
  leaves, tree = jax.tree.flatten(sds_tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, s in zip(keys, leaves):
    scale = 1.0 if len(s.shape) != 2 else s.shape[0] ** -0.5
    out.append((jax.random.normal(k, s.shape, jnp.float32) * scale).astype(s.dtype))
  return jax.tree.unflatten(tree, out)


def check(s: shapes.OpShape, dtype, batch, interpret, iters):
  args = _materialize(shapes.abstract_args(s, batch, dtype, jnp.float32), jax.random.key(0))
  if s.kind == "attention":
    def op(impl):
      return lambda q, k, v: kernels.cross_attention(q, k, v, implementation=impl,
                                                     interpret=interpret)
  else:
    fn = kernels.read_block if s.kind == "read" else kernels.write_block
    def op(impl):
      return lambda a, b, p: fn(a, b, p, num_heads=s.heads, implementation=impl,
                                interpret=interpret)
  argn = tuple(range(3))
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  x64 = getattr(jax, "enable_x64", None)
  if x64 is None:
    from jax.experimental import enable_x64 as x64
  with x64(True):
    a64 = jax.tree.map(lambda x: x.astype(jnp.float64), args)
    want = op("xla")(*a64)
    gwant = jax.grad(loss(op("xla")), argnums=argn)(*a64)
  got = jax.jit(op("triton"))(*args)
  ggot = jax.jit(jax.grad(loss(op("triton")), argnums=argn))(*args)
  if s.kind == "attention":
    key = api.shape_class("attention", args[0], args[1])
  else:
    mlp = () if getattr(args[2], "w1", None) is None else (args[2].w1,)
    key = api.shape_class(s.kind, args[0], args[1], args[2].wq, *mlp, heads=s.heads,
                          dtype=args[0].dtype)
  row = dict(shape=s.name, dtype=jnp.dtype(dtype).name, key=key,
             fwd_err=_rel_err(got, want), grad_err=_rel_err(ggot, gwant))
  for impl in ("triton", "xla"):
    row[f"{impl}_fwd_us"] = time_us(jax.jit(op(impl)), args, iters)
    row[f"{impl}_fwdbwd_us"] = time_us(jax.jit(jax.grad(loss(op(impl)), argnums=argn)), args,
                                        iters)
  if s.kind == "attention":
    dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    row["dpa_fwd_us"] = time_us(jax.jit(dpa), args, iters)
    row["dpa_fwdbwd_us"] = time_us(jax.jit(jax.grad(loss(dpa), argnums=argn)), args, iters)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench/results/triton_gpu_check.md")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--dtypes", default="bfloat16,float16,float32")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--interpret", action="store_true", help="CPU dry run via the interpreter")
  ap.add_argument("--quick", action="store_true", help="first shape only")
  ap.add_argument("--write-wins", action="store_true",
                  help="write the fwd+bwd medians into autotune_table.WINS (GPU runs only)")
  a = ap.parse_args(argv)
  cases = shapes.distinct_ops(shapes.PUBLISHED, OPS)
  cases = cases[:1] if a.quick else cases
  rows = []
  for dt in a.dtypes.split(","):
    for s in cases:
      r = check(s, jnp.dtype(dt), a.batch, a.interpret, a.iters)
      print(r, flush=True)
      rows.append(r)
  cols = ["shape", "dtype", "fwd_err", "grad_err", "triton_fwd_us", "xla_fwd_us", "dpa_fwd_us",
          "triton_fwdbwd_us", "xla_fwdbwd_us", "dpa_fwdbwd_us"]
  lines = [f"# Triton kernels on {jax.devices()[0].device_kind} "
           f"({'interpreter dry run' if a.interpret else 'jax-triton'}), batch {a.batch}", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(
        f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  if a.write_wins:
    if a.interpret or jax.default_backend() != "gpu":
      print("--write-wins needs a GPU run (interpreter timings are not measurements)",
            file=sys.stderr)
      return 2
    write_wins(rows, jax.devices()[0].device_kind)
  return 0


def rewrite_autotune_table(*, wins=None, table=None):
  """Rewrites WINS and/or TABLE in kernels/triton_gpu/autotune_table.py (its docstring and
  the other table kept as they are)."""
  path = autotune_table.__file__
  src = open(path).read()
  head = src[: src.index("\nWINS: dict") + 1]
  old_wins = src[src.index("\nWINS: dict") + 1: src.index("\nTABLE: dict") + 1]
  old_table = src[src.index("\nTABLE: dict") + 1:]
  fmt = lambda d: pprint.pformat(d, width=100, sort_dicts=True)
  new_wins = old_wins if wins is None else f"WINS: dict[str, dict] = {fmt(wins)}\n\n"
  new_table = (old_table if table is None
               else f"TABLE: dict[str, dict[str, int]] = {fmt(table)}\n")
  with open(path, "w") as fh:
    fh.write(head + new_wins + new_table)
  print("wrote", os.path.relpath(path))


def write_wins(rows, device):
  """Rewrites autotune_table.WINS with these rows' fwd+bwd medians (kept: other keys)."""
  wins = dict(getattr(autotune_table, "WINS", {}))
  for r in rows:
    if not (np.isfinite(r["fwd_err"]) and np.isfinite(r["grad_err"])):
      continue   # a wrong kernel never becomes a default
    wins[r["key"]] = dict(triton_us=round(r["triton_fwdbwd_us"], 1),
                          xla_us=round(r["xla_fwdbwd_us"], 1),
                          triton_fwd_us=round(r["triton_fwd_us"], 1),
                          xla_fwd_us=round(r["xla_fwd_us"], 1), device=device)
  rewrite_autotune_table(wins=wins)
  print(len(wins), "WINS entries")


if __name__ == "__main__":
  sys.exit(main())
