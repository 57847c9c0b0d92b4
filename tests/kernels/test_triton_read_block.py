"""The read block's attention with the K/V projection inside the kernel
(kernels/triton_gpu/read_block_kernel.py), through Triton's interpreter on CPU.

* The fused kernel checked on its own (kv_attention, no LN / projections around it)
  and inside the block, forward (undifferentiated: STORE_KV off) and under jax.grad (the
  same kernel with STORE_KV, then the attention backward kernels), against the float64
  reference, with the op test base's rule (op_cases.assert_close: per value). Shapes:
  several key tiles in one split (the online-softmax rescale runs), several splits
  (combine), two query blocks, T in several chunks, head dim 72, batch 2; fp32, fp16 and
  bf16 in the gate (bf16 dots made exact in the interpreter by launch._exact_bf16_dot),
  a real-batch and a long-N case in the slow tier.
* What launches: the forward never writes K/V, training launches the same fused kernel.
* The selection rule and its logged fallback.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import pytest

from kernels import shapes
from kernels.triton_gpu import blocks
from kernels.triton_gpu import config
from kernels.triton_gpu import read_block_kernel as rbk
from kernels.triton_gpu.launch import clear_caches, record_launches
from tests.kernels import op_cases as oc

KERNEL = "_read_attn_kernel"
pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py
ZERO = {".bk": ".wk"}   # the key-bias gradient is exactly zero in exact arithmetic


def _cfg(z, x, p, heads, precision="highest", **overrides):
  pl = rbk.plan(z.shape[0], z.shape[1], x.shape[1], x.shape[2], p.wq.shape[1], heads,
                jnp.dtype(z.dtype).name, precision, **overrides)
  assert pl is not None
  return rbk.ReadCfg(heads, True, config.BlockSizes(), pl, precision)


def _fn(heads, **overrides):
  """The read block with the fused kernel at a (possibly forced) plan."""
  if not overrides:
    return functools.partial(blocks.read_block, num_heads=heads, interpret=True, fused=True,
                             precision="highest")

  def f(z, x, p):
    cfg = _cfg(z, x, p, heads, **overrides)
    ref = oc.reference
    pc = blocks._cast_weights(p, z.dtype)
    q = ref.dense(ref.layer_norm(z, pc.ln_scale, pc.ln_bias), pc.wq, pc.bq, z.dtype,
                  precision="highest").astype(z.dtype)
    o = rbk.kv_attention(q, x, pc.wk, pc.bk, pc.wv, pc.bv, cfg)
    return (z.astype(jnp.float32) + ref.dense(o, pc.wo, pc.bo, z.dtype,
                                              precision="highest")).astype(z.dtype)
  return f


def check(shape, dtype, seed=0, **overrides):
  """shape: (batch, m, d, n, t, heads, width)."""
  batch, m, d, n, t, heads, width = shape
  args, ct = oc.block_inputs(seed, "read", batch, m, d, n, t, width, 0, dtype)
  fn = _fn(heads, **overrides)
  fused_out = jax.jit(fn)(*args)                 # undifferentiated: STORE_KV off
  out, grads = oc.value_and_grads(fn, args, ct)  # differentiated: STORE_KV on
  want_out, want_grads = oc.oracle("read", args, ct, num_heads=heads)
  for o in (fused_out, out):
    assert o.dtype == jnp.dtype(dtype) and o.shape == args[0].shape
  tol = oc.tolerance("triton", dtype)
  what = f"read{shape} {jnp.dtype(dtype).name}: "
  oc.assert_close(fused_out, want_out, tol=tol, what=what + "forward")
  oc.assert_close(out, want_out, tol=tol, what=what + "forward under grad")
  oc.assert_close(grads, want_grads, tol=oc.tolerance("triton", dtype, grad=True),
                  what=what + "grad",
                            zero_scaled_by=ZERO)


def test_kv_attention_alone_several_key_tiles():
  """The fused kernel without LN / projections around it: o = attention(q, xWk+bk, xWv+bv)
  over 13 key tiles of 16 in one split, so each tile's online-softmax rescale matters."""
  b, m, n, t, h, dh = 1, 20, 200, 24, 2, 16
  ks = jax.random.split(jax.random.key(0), 8)
  w = h * dh
  nrm = lambda k, s, sc=1.0: jax.random.normal(k, s, jnp.float32) * sc
  q = nrm(ks[0], (b, m, w), 2.0)     # large scores: the row max moves between tiles
  x = nrm(ks[1], (b, n, t))
  wk, wv = nrm(ks[2], (t, w), t ** -0.5), nrm(ks[3], (t, w), t ** -0.5)
  bk, bv = nrm(ks[4], (w,), 0.1), nrm(ks[5], (w,), 0.1)
  ct = nrm(ks[6], (b, m, w))
  cfg = rbk.ReadCfg(h, True, config.BlockSizes(),
                    rbk.plan(b, m, n, t, w, h, "float32", "highest", block_n=16, kv_splits=1),
                    "highest")
  assert cfg.plan.kv_splits == 1 and oc.reference  # one split: 13 tiles in one program

  def ref(q, x, wk, bk, wv, bv):
    split = lambda a: a.reshape(*a.shape[:-1], h, dh)
    k = oc.reference.dense(x, wk, bk, precision="highest")
    v = oc.reference.dense(x, wv, bv, precision="highest")
    o = oc.reference.cross_attention(split(q), split(k), split(v), precision="highest")
    return o.reshape(q.shape)

  args = (q, x, wk, bk, wv, bv)
  got, gg = oc.value_and_grads(lambda *a: rbk.kv_attention(*a, cfg), args, ct)
  want, wg = oc.value_and_grads(ref, oc.to64(args), oc.to64(ct))
  tol = oc.tolerance("triton", jnp.float32)
  oc.assert_close(got, want, tol=tol, what="kv_attention forward: ")
  names = ("q", "x", "wk", "bk", "wv", "bv")
  oc.assert_close(dict(zip(names, gg)), dict(zip(names, wg)),
                  tol=oc.tolerance("triton", jnp.float32, grad=True),
                            what="kv_attention grad: ", zero_scaled_by={"['bk']": "['wk']"})


# (batch, m, d, n, t, heads, width)
SMALL_PUBLISHED_LIKE = (1, 32, 128, 64, 64, 2, 64)  # CIFAR-10 read scaled down 4x (dh 32)
ODD = [
    pytest.param((1, 7, 40, 200, 24, 2, 144), {}, id="m7_n200_d72_splits"),
    pytest.param((1, 1, 16, 5, 24, 1, 8), {}, id="m1_n5_d8"),
    pytest.param((2, 9, 32, 7, 40, 2, 144), {}, id="b2_m9_n7_d72"),
    pytest.param((1, 7, 24, 300, 80, 1, 16), dict(block_t=32, block_n=16, kv_splits=3),
                 id="n300_t80_3chunks_3splits_tiles"),
    pytest.param((1, 200, 24, 20, 24, 2, 32), dict(block_m=128), id="m200_2qblocks"),
]


def test_small_published_like_fp32():
  check(SMALL_PUBLISHED_LIKE, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["fp16", "bf16"])
def test_small_published_like_low_precision(dtype):
  check(SMALL_PUBLISHED_LIKE, dtype)


@pytest.mark.parametrize("shape,overrides", ODD)
def test_odd_fp32(shape, overrides):
  check(shape, jnp.float32, **overrides)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["fp16", "bf16"])
def test_odd_low_precision_several_tiles(dtype):
  check((1, 7, 40, 200, 24, 2, 64), dtype, block_n=16, kv_splits=2)


@pytest.mark.slow
def test_real_batch_cifar10_fp16():
  check((8, 128, 512, 256, 256, 8, 256), jnp.float16)


@pytest.mark.slow
def test_long_interface_fp32():
  check((1, 16, 64, 4096, 32, 2, 64), jnp.float32)


# ----------------------------------------------------------------------------
# What launches (recorded while tracing, nothing runs).
# ----------------------------------------------------------------------------

def _abstract_read(b, m, d, n, t, width, dtype):
  """Abstract read-block operands, params in fp32 as the model keeps them."""
  o = shapes.OpShape("read", "read_block", m, n, 1, width, cq=d, ckv=t, width=width)
  return shapes.abstract_args(o, b, dtype, jnp.float32)


def _launches(fn, *args):
  clear_caches()
  with record_launches() as recs:
    jax.make_jaxpr(fn)(*args)
  return recs


def test_forward_never_writes_kv_and_training_runs_the_fused_kernel():
  cifar_read = shapes.op_shape(shapes.CIFAR10, "read_block")
  z, x, p = shapes.abstract_args(cifar_read, 256, jnp.bfloat16, jnp.float32)
  f = functools.partial(blocks.read_block, num_heads=8)
  recs = _launches(f, z, x, p)
  assert [r.kernel.__name__ for r in recs] == [KERNEL]   # q / out projections are XLA's
  assert dict(recs[0].constexprs)["STORE_KV"] is False
  assert recs[0].out_dtypes[-2:] == ("bfloat16", "bfloat16")
  loss = lambda z, x, p: jnp.sum(f(z, x, p).astype(jnp.float32))
  recs = _launches(jax.grad(loss, argnums=(0, 1, 2)), z, x, p)
  names = [r.kernel.__name__ for r in recs]
  assert names[0] == KERNEL and "_attn_fwd_kernel" not in names, names
  assert dict(recs[0].constexprs)["STORE_KV"] is True
  assert {"_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= set(names), names
  # Several splits (few examples): the combine kernel follows.
  long_read = shapes.op_shape(shapes.IMAGENET64_P4, "read_block", n=4096)
  z, x, p = shapes.abstract_args(long_read, 1, jnp.bfloat16, jnp.float32)
  names = [r.kernel.__name__ for r in _launches(functools.partial(
      blocks.read_block, num_heads=16), z, x, p)]
  assert names == [KERNEL, "_attn_combine_kernel"], names


def test_selection_rule_and_logged_fallback(caplog):
  def pl(b=1, m=128, n=256, t=256, width=256, heads=8, dtype="bfloat16", prec="default"):
    return rbk.plan(b, m, n, t, width, heads, dtype, prec)
  cifar = pl(b=256)
  assert (cifar.block_m, cifar.block_n, cifar.block_t, cifar.d_pad) == (128, 64, 64, 32)
  assert cifar.kv_splits == 1 and cifar.num_warps == 8
  assert pl().kv_splits == 4                                              # batch 1
  assert pl(t=512, width=512, heads=16, n=4096).kv_splits == 16          # long interface
  assert pl(t=4096, width=512, heads=16) is not None                      # T is streamed
  assert pl(m=256).block_m == 128                                         # 2 query blocks
  assert pl(m=257) is None                                                # 3: falls back
  assert pl(m=128, width=144, heads=2).block_m == 64                      # head dim 72
  assert pl(width=320, heads=2) is None                                   # head dim 160
  assert pl(dtype="float32").block_m == 128                               # TF32 dots
  assert pl(dtype="float32", prec="highest").block_m == 64                # IEEE dots
  z, x, p = _abstract_read(1, 300, 32, 8, 24, 64, jnp.float32)
  with pytest.raises(ValueError, match="does not fit"):
    jax.eval_shape(functools.partial(blocks.read_block, num_heads=2, fused=True), z, x, p)
  blocks._LOGGED.clear()
  with caplog.at_level(logging.WARNING):
    names = [r.kernel.__name__ for r in _launches(
        functools.partial(blocks.read_block, num_heads=2), z, x, p)]
  assert KERNEL not in names and "_attn_fwd_kernel" in names
  assert "outside the fused K/V attention's plan" in caplog.text


def test_vmap_folds_into_the_kernel_grid():
  args, _ = oc.block_inputs(2, "read", 2, 6, 16, 9, 24, 32, 0, jnp.float32)
  z, x, p = args
  z, x = z[:, None], x[:, None]   # vmap over axis 0, each example a batch of 1
  got = jax.vmap(_fn(2), in_axes=(0, 0, None))(z, x, p)
  want = jax.vmap(lambda a, b, q: oc.reference.read_block(a, b, q, num_heads=2,
                                                          precision="highest"),
                  in_axes=(0, 0, None))(*oc.to64((z, x, p)))
  oc.assert_close(got, want, tol=oc.tolerance("triton", jnp.float32), what="vmap: ")
