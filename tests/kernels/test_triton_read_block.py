"""The read-block forward with the K/V projection fused into split-K attention
(kernels/triton_gpu/read_block_kernel.py).

* Numerics in Triton's interpreter (interpret=True) against the float64 reference:
  the fused forward (an undifferentiated call) and, under jax.grad, the value and the
  gradients w.r.t. z, x and every parameter (the custom_vjp's differentiated call runs
  the composed forward and backward), on a small published-like
  shape and odd ones (M in {1, 7, 200}, N in {1, 7, 200, 1000}, T in {24, 40, 80}, head
  dim 72, batch 1 and 2, one and several key splits, query blocks and T chunks), fp32
  and fp16 (the interpreter's bf16 tl.dot is wrong, DESIGN.md section 4).
* The forward never projects K/V with a separate launch (launches recorded, not run).
* The selection rule: which shapes get the fused forward, which fall back.
* triton.compile for sm_90 / sm_80 at the published read-block shapes (plus N = 4096 and
  a head-dim-72 case; bf16, fp16 as a slow test) of the fused kernel and the combine
  launched after it: no spills, shared memory within the chip limit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.params import ReadBlockParams
from kernels.triton_gpu import blocks
from kernels.triton_gpu import compile_report as cr
from kernels.triton_gpu import config
from kernels.triton_gpu import read_block_kernel as rbk
from kernels.triton_gpu.launch import record_launches
from tests.kernels import op_cases as oc

KERNEL = "_read_attn_kernel"


pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py


def _fn(heads, fused=True, **overrides):
  """The read block; with overrides, the fused forward at a forced plan (tests only)."""
  if not overrides:
    return functools.partial(blocks.read_block, num_heads=heads, interpret=True, fused=fused)

  def f(z, x, p):
    pl = rbk.plan(z.shape[0], z.shape[1], x.shape[1], x.shape[2], p.wq.shape[1], heads,
                  jnp.dtype(z.dtype).name, force_fp32=True, **overrides)
    return rbk.read_block(z, x, p, rbk.ReadCfg(heads, True, config.BlockSizes(), pl))
  return f


def check(shape, dtype, seed=0, **overrides):
  """shape: (batch, m, d, n, t, heads, width)."""
  batch, m, d, n, t, heads, width = shape
  args, ct = oc.block_inputs(seed, "read", batch, m, d, n, t, width, 0, dtype)
  fn = _fn(heads, **overrides)
  # Undifferentiated call: the fused forward (a differentiated call runs the composed
  # forward + backward, so value_and_grads' value is the composed path's).
  fused_out = jax.jit(fn)(*args)
  out, grads = oc.value_and_grads(fn, args, ct)
  want_out, want_grads = oc.oracle("read", args, ct, num_heads=heads)
  for o in (fused_out, out):
    assert o.dtype == jnp.dtype(dtype) and o.shape == args[0].shape
  tol = oc.triton_tolerance(dtype)
  what = f"read{shape} {jnp.dtype(dtype).name}: "
  oc.assert_close(fused_out, want_out, tol=tol, what=what + "fused forward")
  oc.assert_close(out, want_out, tol=tol, what=what + "forward under grad")
  oc.assert_close(grads, want_grads, tol=4 * tol, what=what + "grad")


# (batch, m, d, n, t, heads, width)
SMALL_PUBLISHED_LIKE = (1, 32, 128, 64, 64, 2, 64)  # CIFAR-10 read scaled down 4x (dh 32)
ODD = [
    pytest.param((1, 7, 40, 200, 24, 2, 144), {}, id="m7_n200_d72_4splits"),
    pytest.param((1, 1, 16, 1, 24, 1, 8), {}, id="m1_n1_d8"),
    pytest.param((2, 9, 32, 7, 40, 2, 144), {}, id="b2_m9_n7_d72"),
    pytest.param((1, 7, 24, 1000, 80, 1, 16), dict(block_t=32, kv_splits=3),
                 id="n1000_t80_3chunks_3splits"),
    pytest.param((1, 200, 24, 20, 24, 2, 32), dict(block_m=128), id="m200_2qblocks"),
]


def test_small_published_like_fp32():
  check(SMALL_PUBLISHED_LIKE, jnp.float32)


def test_small_published_like_fp16():
  check(SMALL_PUBLISHED_LIKE, jnp.float16)


@pytest.mark.parametrize("shape,overrides", ODD)
def test_odd_fp32(shape, overrides):
  check(shape, jnp.float32, **overrides)


def test_odd_fp16():
  check((1, 7, 40, 200, 24, 2, 144), jnp.float16)


def _abstract_read(b, m, d, n, t, width, dtype):
  sds = lambda s: jax.ShapeDtypeStruct(s, dtype)
  p = ReadBlockParams(ln_scale=sds((d,)), ln_bias=sds((d,)), wq=sds((d, width)),
                      bq=sds((width,)), wk=sds((t, width)), bk=sds((width,)),
                      wv=sds((t, width)), bv=sds((width,)), wo=sds((width, d)), bo=sds((d,)))
  return sds((b, m, d)), sds((b, n, t)), p


def _fresh_traces():
  """Launches are recorded while tracing: drop cached traces so every launch re-traces."""
  from kernels.triton_gpu import attention, linear
  attention._units.cache_clear()
  linear._units.cache_clear()
  rbk._unit.cache_clear()
  jax.clear_caches()


def _launches(fn, *args):
  _fresh_traces()
  with record_launches() as recs:
    jax.make_jaxpr(fn)(*args)
  return recs


def test_forward_never_writes_kv():
  z, x, p = _abstract_read(1, 128, 512, 256, 256, 256, jnp.bfloat16)   # CIFAR-10 read
  recs = _launches(_fn(8, fused=None), z, x, p)
  names = [r.kernel.__name__ for r in recs]
  assert names == ["_fused_linear_kernel", KERNEL, "_attn_combine_kernel",
                   "_fused_linear_kernel"], names
  # The two projections are q = LN(z) Wq + bq (K = D = 512) and the out-projection
  # (K = W = 256): no launch takes the interface x (K = T) as its matmul input.
  ks = [dict(r.constexprs)["K"] for r in recs if r.kernel.__name__ == "_fused_linear_kernel"]
  assert ks == [512, 256], ks
  names = [r.kernel.__name__ for r in _launches(_fn(8, fused=False), z, x, p)]
  assert KERNEL not in names and "_attn_fwd_kernel" in names, names
  # A differentiated call runs the composed forward (its residuals feed the backward).
  loss = lambda z, x, p: jnp.sum(_fn(8, fused=None)(z, x, p).astype(jnp.float32))
  names = [r.kernel.__name__ for r in _launches(jax.grad(loss, argnums=(0, 1, 2)), z, x, p)]
  assert KERNEL not in names and "_attn_bwd_dq_kernel" in names, names
  # One split: no combine launch.
  z, x, p = _abstract_read(1, 128, 768, 64, 512, 512, jnp.bfloat16)    # ImageNet-64 p8
  names = [r.kernel.__name__ for r in _launches(_fn(16, fused=None), z, x, p)]
  assert names == ["_fused_linear_kernel", KERNEL, "_fused_linear_kernel"], names


def test_selection_rule():
  def pl(b=1, m=128, n=256, t=256, width=256, heads=8, dtype="bfloat16"):
    return rbk.plan(b, m, n, t, width, heads, dtype)
  cifar = pl()
  assert (cifar.block_m, cifar.block_n, cifar.block_t, cifar.d_pad) == (128, 64, 64, 32)
  assert cifar.kv_splits == 4 and cifar.num_warps == 8
  assert pl(t=512, width=512, heads=16, n=4096).kv_splits == 16          # ImageNet-64, long
  assert pl(t=4096, width=512, heads=16) is not None                      # T is streamed
  assert pl(m=256).block_m == 128                                         # 2 query blocks
  assert pl(m=257) is None                                                # 3: falls back
  assert pl(m=128, width=144, heads=2).block_m == 64                      # head dim 72
  assert pl(m=129, width=144, heads=2) is None
  assert pl(width=320, heads=2) is None                                   # head dim 160
  assert pl(dtype="float32") is None                                     # fp32 spills
  assert rbk.plan(1, 128, 256, 256, 256, 8, "float32", force_fp32=True).block_m == 64
  assert pl(m=1, n=1, t=24, width=8, heads=1).block_n == 16               # tiny sizes pad
  z, x, p = _abstract_read(1, 300, 32, 8, 24, 64, jnp.float32)
  with pytest.raises(ValueError, match="does not fit"):
    blocks.read_block(z, x, p, num_heads=2, fused=True)


def test_vmap_folds_into_the_kernel_grid():
  args, _ = oc.block_inputs(2, "read", 2, 6, 16, 9, 24, 32, 0, jnp.float32)
  z, x, p = args
  z, x = z[:, None], x[:, None]   # vmap over axis 0, each example a batch of 1
  got = jax.vmap(_fn(2), in_axes=(0, 0, None))(z, x, p)
  want = jax.vmap(lambda a, b, q: oc.reference.read_block(a, b, q, num_heads=2),
                  in_axes=(0, 0, None))(*oc.to64((z, x, p)))
  oc.assert_close(got, want, tol=oc.triton_tolerance(jnp.float32), what="vmap: ")


# ----------------------------------------------------------------------------
# sm_90 / sm_80 compilation at the published read-block shapes.
# ----------------------------------------------------------------------------

# (name, b, m, d, n, t, width, heads)
READ_SHAPES = (
    ("cifar10", 1, 128, 512, 256, 256, 256, 8),
    ("imagenet64_p4", 1, 128, 768, 256, 512, 512, 16),
    ("imagenet64_p8", 1, 128, 768, 64, 512, 512, 16),
    ("imagenet64_long_n4096", 1, 128, 768, 4096, 512, 512, 16),
    ("head_dim72_n1000", 1, 128, 64, 1000, 64, 144, 2),  # not published: the D_PAD 128 plan
)


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_compiles_without_spills_at_published_shapes(dtype):
  rows = []
  for name, b, m, d, n, t, width, heads in READ_SHAPES:
    recs = _launches(_fn(heads, fused=None),
                     *_abstract_read(b, m, d, n, t, width, jnp.dtype(dtype)))
    assert [r.kernel.__name__ for r in recs].count(KERNEL) == 1, \
        f"{name}: the rule must select the fused forward"
    # The fused kernel and the combine launched after it (its BLOCK_M / warps are the
    # fused plan's, a variant the composed attention never launches).
    for rec in (r for r in recs if r.kernel.__name__ in (KERNEL, "_attn_combine_kernel")):
      for arch in cr.ARCHS:
        r = cr.compile_record(rec, arch)   # interpreted launches leave tl clean (launch.py)
        rows.append((r, [f"{name}:{dtype}"]))
        print(f"{name:22s} {dtype:8s} {r.kernel:20s} sm_{arch} grid={rec.grid} "
              f"warps={r.num_warps} stages={r.num_stages} regs={r.regs:3d} "
              f"spill={r.spill_bytes} smem={r.shared_bytes:6d}  {r.key}")
  bad = cr.violations(rows)
  assert not bad, "\n".join(bad)
