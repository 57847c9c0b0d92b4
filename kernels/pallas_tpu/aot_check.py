"""Compile every Pallas TPU kernel for a real TPU on a machine without one.

    pip install libtpu            # the TPU compiler (runtime library), ~140 MB
    python -m kernels.pallas_tpu.aot_check --topology v5e:1x1 [--batch 8]

`jax.export(..., platforms=["tpu"])` stops at Mosaic MLIR. This goes further:
with libtpu present, `jax.experimental.topologies` describes a TPU slice without
any device attached and `jax.jit(f).lower(...).compile()` runs the actual XLA:TPU
and Mosaic compilers (layouts, VMEM allocation, block legality) on the forward and
the gradient of every op at every published RIN shape, in fp32 and bf16, plus odd
shapes. Exit status 1 if anything fails to compile.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

# name: (M, D, N, T, rw heads, rw width, interface MLP ratio, latent heads, latent head dim)
CONFIGS = {
    "cifar10": (128, 512, 256, 256, 8, 256, 2, 16, 32),
    "imagenet64_p4": (128, 768, 256, 512, 16, 512, 4, 16, 48),
    "imagenet64_p8": (128, 768, 64, 512, 16, 512, 4, 16, 48),
}


def _cases(batch, sds, params_sds):
  import kernels.pallas_tpu as P
  from kernels.params import ReadBlockParams, WriteBlockParams

  attn = lambda q, k, v: P.cross_attention(q, k, v)

  def read_params(d, t, a, dt):
    s = lambda *shape: sds(shape, dt)
    return ReadBlockParams(s(d), s(d), s(d, a), s(a), s(t, a), s(a), s(t, a), s(a), s(a, d), s(d))

  def write_params(t, d, a, f, dt):
    s = lambda *shape: sds(shape, dt)
    mlp = (s(t), s(t), s(t, f), s(f), s(f, t), s(t)) if f else ()
    return WriteBlockParams(s(t), s(t), s(t, a), s(a), s(d, a), s(a), s(d, a), s(a), s(a, t),
                            s(t), *mlp)

  for name, (m, d, n, t, h, a, ratio, lh, ldh) in CONFIGS.items():
    for dt in (jnp.bfloat16, jnp.float32):
      tag = f"{name} {jnp.dtype(dt).name}"
      dh = a // h
      lat = sds((batch, m, lh, ldh), dt)
      yield f"{tag} latent self-attention", attn, (lat, lat, lat)
      yield f"{tag} read attention", attn, (sds((batch, m, h, dh), dt), sds((batch, n, h, dh), dt),
                                            sds((batch, n, h, dh), dt))
      yield f"{tag} write attention", attn, (sds((batch, n, h, dh), dt), sds((batch, m, h, dh), dt),
                                             sds((batch, m, h, dh), dt))
      yield (f"{tag} read_block", lambda z, x, p, h=h: P.read_block(z, x, p, num_heads=h),
             (sds((batch, m, d), dt), sds((batch, n, t), dt), read_params(d, t, a, dt)))
      yield (f"{tag} write_block", lambda x, z, p, h=h: P.write_block(x, z, p, num_heads=h),
             (sds((batch, n, t), dt), sds((batch, m, d), dt), write_params(t, d, a, ratio * t, dt)))
  f32 = jnp.float32
  yield "odd attention q7 k1000 dh72", attn, (sds((1, 7, 2, 72), f32), sds((1, 1000, 2, 72), f32),
                                             sds((1, 1000, 2, 72), f32))
  yield "odd attention q1 k1 dh200", attn, tuple(sds((1, 1, 1, 200), f32) for _ in range(3))
  yield ("odd read_block m7 n1000 dh72", lambda z, x, p: P.read_block(z, x, p, num_heads=2),
         (sds((1, 7, 48), f32), sds((1, 1000, 32), f32), read_params(48, 32, 144, f32)))
  yield ("odd write_block n1000 m7 dh72", lambda x, z, p: P.write_block(x, z, p, num_heads=2),
         (sds((1, 1000, 32), f32), sds((1, 7, 48), f32), write_params(32, 48, 144, 64, f32)))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--topology", default="v5e:1x1", help="e.g. v5e:1x1, v5p:2x2x1, v6e:1x1")
  ap.add_argument("--batch", type=int, default=8)
  args = ap.parse_args(argv)
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  sharding = SingleDeviceSharding(topo.devices[0])
  sds = lambda shape, dt: jax.ShapeDtypeStruct(tuple(shape), dt, sharding=sharding)
  failures = 0
  print(f"| kernel ({args.topology}, batch {args.batch}) | pass | compiled | seconds |")
  print("|---|---|---|---:|")
  for name, fn, fargs in _cases(args.batch, sds, None):
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
