"""MXU proxy of the fused read/write block kernels alone, at one published op shape.

    DUMP=$(mktemp -d) LIBTPU_INIT_ARGS=--xla_mosaic_dump_to=$DUMP JAX_PLATFORMS=cpu \\
      python -m bench.tpu_block_mxu --config cifar10 --batch 8 --dtype bfloat16

A quick check while changing bench.tpu_static's subjects (its functions do the work): the
forward and gradient of `read_block` / `write_block` at the op shapes of one published
config (kernels.shapes), each distinct Pallas kernel compiled alone for a deviceless v5e,
its final LLO parsed, MXU proxy = matmul FLOPs / (vmatmul count x FLOPs of one full-tile
vmatmul, calibrated on a lane-dense matmul kernel). ESTIMATES from the compiler's own
output, not measurements; bench.tpu_static has the whole-step tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="cifar10", help="a kernels.shapes.PUBLISHED name")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--topology", default="v5e:1x1")
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from jax._src.pallas import pallas_call as pc
  import kernels.pallas_tpu as P
  from bench import tpu_static as ts
  from kernels import shapes
  dump = os.environ.get("DUMP")
  if not dump or f"--xla_mosaic_dump_to={dump}" not in os.environ.get("LIBTPU_INIT_ARGS", ""):
    sys.exit("set DUMP=<dir> and LIBTPU_INIT_ARGS=--xla_mosaic_dump_to=<dir> (see the doc)")
  topo, sds = ts._placed(args.topology)
  name, f, n = ts._calibration_kernels()[0]
  a = sds((n, n), jnp.bfloat16)
  _, conds = ts.kernel_flops_and_conds(ts.find_kernels(jax.make_jaxpr(f)(a, a))[0])
  llo = ts.parse_llo(ts._compile_kernel_alone(f, (a, a), dump, name)[1], conds)
  vm_flops = 2.0 * n ** 3 / (ts.op_classes(llo["ops"])["vmatmul"] * math.prod(llo["grid"]))
  print(json.dumps(dict(calibration_flops_per_vmatmul=vm_flops)), flush=True)
  s = next(s for s in shapes.PUBLISHED if s.name == args.config)
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  for kind in ("read", "write"):
    o = shapes.op_shape(s, f"{kind}_block")
    fargs = shapes.abstract_args(o, args.batch, jnp.dtype(args.dtype), sharding=sharding)
    op = P.read_block if kind == "read" else P.write_block
    fn = lambda a_, b_, p_, op=op, h=o.heads: op(a_, b_, p_, num_heads=h)
    g = jax.grad(lambda *a_, fn=fn: jnp.sum(fn(*a_).astype(jnp.float32)), argnums=(0, 1, 2))
    seen = set()
    for e in ts.find_kernels(jax.make_jaxpr(g)(*fargs)):
      if ts.kernel_key(e) in seen:
        continue
      seen.add(ts.kernel_key(e))
      flops, conds = ts.kernel_flops_and_conds(e)
      kargs = [sds(v.aval.shape, v.aval.dtype) for v in e.invars]
      params = dict(e.params)
      kfn = lambda *a_, params=params: pc.pallas_call_p.bind(*a_, **params)
      compiled, text = ts._compile_kernel_alone(kfn, kargs, dump, params["name"])
      llo = ts.parse_llo(text, conds)
      vm = ts.op_classes(llo["ops"])["vmatmul"] * (math.prod(llo["grid"]) or 1)
      print(json.dumps(dict(
          kernel=params["name"], config=args.config, batch=args.batch, dtype=args.dtype,
          grid=llo["grid"], flops=flops, vmatmul=vm,
          mxu_proxy=round(flops / (vm * vm_flops), 3) if vm else None,
          vmem_bytes=ts._scoped_vmem(compiled.as_text()), llo_exact=llo["exact"])), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
