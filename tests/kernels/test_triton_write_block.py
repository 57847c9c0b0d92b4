"""The one-kernel-per-tile write-block forward (kernels/triton_gpu/write_block_kernel.py).

* Numerics in Triton's interpreter (interpret=True) against the float64 reference,
  forward and gradients (jax.grad through the custom_vjp, whose backward re-runs the
  composed path), on a small published-like shape and odd ones (N in {1, 7, 200},
  M in {1, 7}, head dim 72, no MLP), fp32 and fp16 (the interpreter's bf16 tl.dot is
  wrong, DESIGN.md section 4).
* The forward really is K/V projections + one kernel (launches recorded, not run).
* The selection rule: which shapes get the one-kernel forward, which fall back.
* triton.compile for sm_90 / sm_80 at the published write-block shapes (bf16 and fp16,
  every configuration the rule selects; fp32 falls back): no spills, shared memory
  within the chip limit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.params import WriteBlockParams
from kernels.triton_gpu import blocks
from kernels.triton_gpu import compile_report as cr
from kernels.triton_gpu import write_block_kernel as wbk
from kernels.triton_gpu.launch import record_launches
from tests.kernels import op_cases as oc

KERNEL = "_write_block_fwd_kernel"


pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py


def _fn(heads, fused=True):
  return functools.partial(blocks.write_block, num_heads=heads, interpret=True, fused=fused)


def check(shape, dtype, seed=0):
  """shape: (batch, m, d, n, t, heads, width, mlp_ratio), as op_cases.ODD_BLOCKS."""
  batch, m, d, n, t, heads, width, mlp_ratio = shape
  args, ct = oc.block_inputs(seed, "write", batch, m, d, n, t, width, mlp_ratio, dtype)
  # fp32 is selected only when forced (fused=True, as _fn does): it spills on GPUs.
  assert blocks.write_plan(*args, heads, force_fp32=True) is not None
  out, grads = oc.value_and_grads(_fn(heads), args, ct)
  want_out, want_grads = oc.oracle("write", args, ct, num_heads=heads)
  assert out.dtype == jnp.dtype(dtype) and out.shape == args[0].shape
  tol = oc.triton_tolerance(dtype)
  what = f"write{shape} {jnp.dtype(dtype).name}: "
  oc.assert_close(out, want_out, tol=tol, what=what + "forward")
  oc.assert_close(grads, want_grads, tol=4 * tol, what=what + "grad")


# (batch, m, d, n, t, heads, width, mlp_ratio)
SMALL_PUBLISHED_LIKE = (1, 16, 64, 40, 64, 4, 64, 2)  # CIFAR-10 write, scaled down 4x
ODD = [
    pytest.param((1, 7, 40, 200, 24, 2, 144, 2), id="n200_m7_d72"),
    pytest.param((1, 1, 40, 7, 24, 2, 144, 2), id="n7_m1_d72"),
    pytest.param((1, 7, 24, 1, 40, 2, 144, 0), id="n1_m7_d72_nomlp"),
    pytest.param((2, 7, 16, 7, 20, 1, 16, 3), id="b2_n7_m7_t20_f60"),
]


def test_small_published_like_fp32():
  check(SMALL_PUBLISHED_LIKE, jnp.float32)


def test_small_published_like_fp16():
  check(SMALL_PUBLISHED_LIKE, jnp.float16)


@pytest.mark.parametrize("shape", ODD)
def test_odd_fp32(shape):
  check(shape, jnp.float32)


def test_odd_fp16():
  check((1, 7, 40, 200, 24, 2, 144, 2), jnp.float16)


def test_several_latent_chunks_and_hidden_chunks():
  # M = 70 > BLOCK_M (online softmax over 3 chunks, the last partial), hidden 72 > BLOCK_F.
  shape = (1, 70, 16, 20, 24, 2, 32, 3)
  batch, m, d, n, t, heads, width, ratio = shape
  args, _ = oc.block_inputs(1, "write", batch, m, d, n, t, width, ratio, jnp.float32)
  pl = blocks.write_plan(*args, heads, force_fp32=True)
  assert pl.block_m < m and pl.block_f < ratio * t, pl
  check(shape, jnp.float32, seed=1)


def _abstract_write(n, t, m, d, width, hidden, dtype):
  p = dict(ln_scale=(t,), ln_bias=(t,), wq=(t, width), bq=(width,), wk=(d, width),
           bk=(width,), wv=(d, width), bv=(width,), wo=(width, t), bo=(t,))
  if hidden:
    p.update(mlp_ln_scale=(t,), mlp_ln_bias=(t,), w1=(t, hidden), b1=(hidden,),
             w2=(hidden, t), b2=(t,))
  sds = lambda s: jax.ShapeDtypeStruct(s, dtype)
  return sds((1, n, t)), sds((1, m, d)), WriteBlockParams(**{k: sds(v) for k, v in p.items()})


def _fresh_traces():
  """Launches are recorded while tracing: drop cached traces so every launch re-traces."""
  from kernels.triton_gpu import attention, linear
  attention._units.cache_clear()
  linear._units.cache_clear()
  blocks._one_kernel_unit.cache_clear()
  jax.clear_caches()


def test_forward_is_kv_projections_plus_one_kernel():
  x, z, p = _abstract_write(256, 256, 128, 512, 256, 512, jnp.bfloat16)
  _fresh_traces()
  with record_launches() as recs:
    jax.make_jaxpr(_fn(8, fused=None))(x, z, p)
  names = [r.kernel.__name__ for r in recs]
  # (identical K and V launches are traced once, so are recorded once)
  assert set(names) == {"_fused_linear_kernel", KERNEL} and names[-1] == KERNEL, names
  assert names.count(KERNEL) == 1, names
  _fresh_traces()
  with record_launches() as recs:
    jax.make_jaxpr(_fn(8, fused=False))(x, z, p)
  assert KERNEL not in [r.kernel.__name__ for r in recs]


def test_selection_rule():
  def pl(n=256, t=256, m=128, width=256, heads=8, hidden=512, dtype="bfloat16"):
    return wbk.plan(n, t, m, width, heads, hidden, dtype)
  assert pl().block_n == 32 and pl().t_pad == 256                          # CIFAR-10
  assert pl(t=512, width=512, heads=16, hidden=2048).block_n == 16         # ImageNet-64
  assert pl(t=1024, width=1024, heads=16, hidden=4096) is None             # tile too big
  assert pl(dtype="float32") is None                                      # fp32 spills
  assert wbk.plan(256, 256, 128, 256, 8, 512, "float32", force_fp32=True).block_n == 16
  assert wbk.plan(256, 512, 128, 512, 16, 2048, "float32", force_fp32=True) is None
  assert pl(width=320, heads=2) is None                                    # head dim 160
  assert pl(n=1, t=24, width=144, heads=2, m=1).block_n == 16              # odd sizes pad
  x, z, p = _abstract_write(8, 1024, 16, 32, 64, 0, jnp.float32)
  with pytest.raises(ValueError, match="does not fit"):
    blocks.write_block(x, z, p, num_heads=2, fused=True)


# ----------------------------------------------------------------------------
# sm_90 / sm_80 compilation at the published write-block shapes.
# ----------------------------------------------------------------------------

WRITE_SHAPES = tuple(s for s in cr.PUBLISHED if s.op == "write")


def _kernel_records(shape, dtype):
  """Launch records of the one-kernel forward for `shape` (forward only, not run)."""
  hidden = shape.mlp
  x, z, p = _abstract_write(shape.lq, shape.cq, shape.lk, shape.ckv, shape.width, hidden,
                            dtype)
  _fresh_traces()
  with record_launches() as recs:
    jax.make_jaxpr(_fn(shape.heads, fused=None))(x, z, p)
  return [r for r in recs if r.kernel.__name__ == KERNEL]


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_compiles_without_spills_at_published_shapes(dtype):
  rows, selected = [], []
  for s in WRITE_SHAPES:
    recs = _kernel_records(s, jnp.dtype(dtype))
    if not recs:   # the rule falls back to the composed path here (covered by
      continue     # tests/kernels/test_triton_compile.py)
    selected.append(s.name)
    for arch in cr.ARCHS:
      r = cr.compile_record(recs[0], arch)
      rows.append((r, [f"{s.name}:{dtype}"]))
      print(f"{s.name:22s} {dtype:8s} sm_{arch} warps={r.num_warps} stages={r.num_stages} "
            f"regs={r.regs:3d} spill={r.spill_bytes} smem={r.shared_bytes:6d}  {r.key}")
  # The rule selects the kernel for every published shape in fp16/bf16 (never for fp32).
  assert selected == [s.name for s in WRITE_SHAPES], selected
  bad = cr.violations(rows)
  assert not bad, "\n".join(bad)


def test_vmap_folds_into_the_kernel_grid():
  # A vmapped axis over x and z folds into the kernel's batch axis (shared weights).
  args, _ = oc.block_inputs(2, "write", 2, 6, 16, 9, 24, 32, 2, jnp.float32)
  x, z, p = args
  x, z = x[:, None], z[:, None]   # vmap over axis 0, each example a batch of 1
  got = jax.vmap(_fn(2), in_axes=(0, 0, None))(x, z, p)
  want = jax.vmap(lambda a, b, q: oc.reference.write_block(a, b, q, num_heads=2),
                  in_axes=(0, 0, None))(*oc.to64((x, z, p)))
  oc.assert_close(got, want, tol=oc.triton_tolerance(jnp.float32), what="vmap: ")
