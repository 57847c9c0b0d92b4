"""Compile every Pallas TPU kernel for a real TPU on a machine without one.

    pip install libtpu            # the TPU compiler (runtime library), ~140 MB
    python -m bench.tpu_aot_check --topology v5e:1x1 [--batch 8] [--kinds attention]

`jax.export(..., platforms=["tpu"])` stops at Mosaic MLIR. This goes further:
with libtpu present, `jax.experimental.topologies` describes a TPU slice without
any device attached and `jax.jit(f).lower(...).compile()` runs the actual XLA:TPU
and Mosaic compilers (layouts, VMEM allocation, block legality) on the forward and
the gradient of every op at every published RIN shape (kernels.shapes), in fp32 and bf16,
plus the odd shapes. Exit status 1 if anything fails to compile;
tests/kernels/test_pallas_tpu.py runs it when libtpu is installed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

import kernels.pallas_tpu as P
from kernels import shapes


def _fn(o: shapes.OpShape):
  if o.kind == "attention":
    return lambda q, k, v: P.cross_attention(q, k, v)
  op = P.read_block if o.kind == "read" else P.write_block
  return lambda a, b, p: op(a, b, p, num_heads=o.heads)


KINDS = ("attention", "read", "write", "latent")
# Odd latent self-attention blocks: (name, m, d, heads, residual): M no multiple of 8,
# head dims 32, 48 and 72.
ODD_LATENT = (("latent_m7_d32_h1", 7, 32, 1, False), ("latent_m130_d96_h2", 130, 96, 2, True),
              ("latent_m9_d144_h2", 9, 144, 2, False))


def _latent_case(batch, m, d, heads, residual, dt, sharding):
  from kernels.params import LatentAttentionParams
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  p = LatentAttentionParams(sds(d), sds(d), sds(d, d), sds(d), sds(d, d), sds(d), sds(d, d),
                            sds(d), sds(d, d), sds(d))
  fn = lambda z, p: P.latent_attention_block(z, p, num_heads=heads, residual=residual)
  return fn, (sds(batch, m, d), p)


def _cases(batch, sharding, kinds=KINDS):
  """(name, function, abstract args): every op of every published config in bf16 and fp32
  (params in the compute dtype, as the layers pass them), then the odd shapes; only the
  ops whose kind is in `kinds`."""
  for s in shapes.PUBLISHED:
    for dt in (jnp.bfloat16, jnp.float32):
      for o in shapes.op_shapes(s):
        if o.kind in kinds:
          yield (f"{s.name} {jnp.dtype(dt).name} {o.op}", _fn(o),
                 shapes.abstract_args(o, batch, dt, sharding=sharding))
  for o in shapes.ODD:
    if o.kind in kinds:
      yield f"odd {o.name}", _fn(o), shapes.abstract_args(o, 1, jnp.float32, sharding=sharding)
  if "latent" in kinds:      # the fused latent self-attention block (the model's layer)
    for s in shapes.PUBLISHED:
      for dt in (jnp.bfloat16, jnp.float32):
        yield (f"{s.name} {jnp.dtype(dt).name} latent_attention_block",
               *_latent_case(batch, s.m, s.d, s.latent_heads, False, dt, sharding))
    for name, m, d, heads, residual in ODD_LATENT:
      yield f"odd {name}", *_latent_case(1, m, d, heads, residual, jnp.float32, sharding)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--topology", default="v5e:1x1", help="e.g. v5e:1x1, v5p:2x2x1, v6e:1x1")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {KINDS}")
  args = ap.parse_args(argv)
  kinds = [k for k in args.kinds.split(",") if k]
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"--kinds: {k!r} is not one of {KINDS}")
  # The kernels size their VMEM budget by the target generation; the default device is
  # the CPU here, so name it from the topology (v5e:1x1 -> v5e) unless already set.
  gen = args.topology.split(":")[0]
  if gen in P.common.VMEM_CAPACITY_MIB:
    os.environ.setdefault("RIN_TPU_GENERATION", gen)
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  sharding = SingleDeviceSharding(topo.devices[0])
  failures = 0
  print(f"| kernel ({args.topology}, batch {args.batch}) | pass | compiled | seconds |")
  print("|---|---|---|---:|")
  for name, fn, fargs in _cases(args.batch, sharding, kinds):
    grad = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)),
                    argnums=tuple(range(len(fargs))))
    for pas, f in (("fwd", fn), ("fwd+bwd", grad)):
      t = time.time()
      try:
        jax.jit(f).lower(*fargs).compile()
        ok = "yes"
      except Exception as e:  # report every failure, then exit non-zero
        ok = f"NO: {type(e).__name__}: {str(e)[:300]}"
        failures += 1
      print(f"| {name} | {pas} | {ok} | {time.time() - t:.1f} |", flush=True)
  print(f"\n{failures} failures")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
