"""implementation="pallas_tpu": numerics in Pallas' interpreter against the float64
reference (forward and every gradient), the TPU-faithful interpreter with race
detection, TPU lowering of every kernel at every published shape, block-size checks.

All on CPU: `interpret=True` runs the very kernels that Mosaic compiles on TPU.
"""
from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
import kernels.pallas_tpu as P
from kernels import shapes
from tests.kernels import op_cases as oc


pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py


def _attn(interpret=True, block_sizes=None):
  return functools.partial(P.cross_attention, interpret=interpret, block_sizes=block_sizes)


def _block(direction, heads, interpret=True, block_sizes=None):
  op = P.read_block if direction == "read" else P.write_block
  return functools.partial(op, num_heads=heads, interpret=interpret, block_sizes=block_sizes)


def _op(kind, heads, interpret=True):
  """The pallas_tpu function of an OpShape's kind ("attention", "read", "write")."""
  return _attn(interpret) if kind == "attention" else _block(kind, heads, interpret)


def check_attention(shape, dtype, *, interpret=True, block_sizes=None, seed=0):
  oc.check_attention(_attn(interpret, block_sizes), shape, dtype, backend="pallas_tpu",
                     seed=seed)


def check_block(direction, shape, dtype, *, interpret=True, block_sizes=None, seed=0):
  """shape: (batch, m, d, n, t, heads, width, mlp_hidden)."""
  oc.check_block(_block(direction, shape[5], interpret, block_sizes), direction, shape, dtype,
                 backend="pallas_tpu", seed=seed)


def check_op(o, dtype):
  oc.check_op(_op, o, dtype, backend="pallas_tpu")


# ----------------------------------------------------------------------------
# Cross-attention.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", oc.ODD_ATTENTION, ids=str)
def test_attention_odd_shapes_fp32(shape):
  check_attention(shape, jnp.float32)


def test_attention_streamed_keys_small_blocks_fp32():
  # Two query blocks (the last partial) and three key blocks (the last partial).
  check_attention((1, 150, 300, 2, 32), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_q=128, block_k=128))


@pytest.mark.parametrize("head_dim", [32, 48, 64])
def test_attention_odd_lengths_head_dims_fp32(head_dim):
  # Lengths that are no multiple of any block, at the head dims of the configs (32, 48)
  # and 64; batch and head blocks of 2 with streamed, partial key blocks.
  check_attention((2, 13, 150, 2, head_dim), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_k=128, block_b=2))


@pytest.mark.parametrize("block_h", [1, 2, None], ids=["h1", "h2", "default"])
def test_attention_head_blocks_fp32(block_h):
  # Several heads per grid step (4 heads, streamed partial key blocks): fwd and all grads.
  check_attention((2, 9, 200, 4, 16), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_k=128, block_h=block_h))


@pytest.mark.parametrize("block_b", [1, 3, None], ids=["b1", "b3", "default"])
def test_attention_batch_blocks_fp32(block_b):
  # Several (batch, head) pairs per grid step: 3 batch elements x 2 heads, two query
  # blocks and two key blocks (both partial), so each step's online softmax, lse rows
  # and dK/dV accumulation cover pairs of different batch elements.
  check_attention((3, 130, 150, 2, 16), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_q=128, block_k=128, block_b=block_b))


def test_attention_block_rules():
  bs = P.AttentionBlockSizes().resolve(128, 128)
  assert bs.with_heads(16).block_h == 16            # 16 x 128 x 128 scores fit one step
  assert P.AttentionBlockSizes().resolve(512, 2048).with_heads(16).block_h == 2  # 256 x 2048
  with pytest.raises(ValueError, match="block_h=3 must be a positive divisor"):
    P.AttentionBlockSizes(block_h=3).resolve(8, 8).with_heads(4)
  # Batch blocks: the CIFAR-10 latent self-attention (16 heads, 128 x 128) at batch 32
  # takes 2 batch elements per step (2^19 scores); a batch of 2 with one step per batch
  # element keeps 2 parallel steps (one per TensorCore); a batch of 1 takes 1.
  lat = bs.with_heads(16)
  assert lat.with_batch(32, 16, 1).block_b == 2
  assert lat.with_batch(2, 16, 1).block_b == 1
  assert lat.with_batch(1, 16, 1).block_b == 1
  small = P.AttentionBlockSizes().resolve(8, 8).with_heads(1)     # 128 x 128 vreg-padded
  assert small.with_batch(64, 1, 1).block_b == 32                 # 2^19 / 2^14, 2 steps
  assert small.with_batch(8, 1, 1).block_b == 4                   # 8 / 4 = 2 parallel steps
  assert small.with_batch(8, 1, 1, fits=lambda b: b.block_b <= 2).block_b == 2
  with pytest.raises(ValueError, match="block_b=3 must be a positive divisor of the batch 4"):
    P.AttentionBlockSizes(block_b=3).resolve(8, 8).with_heads(1).with_batch(4, 1, 1)
  # Queries lie on lanes: a block that does not cover them all is a multiple of 128.
  with pytest.raises(ValueError, match=r"block_q=8 must be a multiple of 128 when it does "
                                       r"not cover all 20 queries"):
    P.AttentionBlockSizes(block_q=8).resolve(20, 8)
  assert P.AttentionBlockSizes(block_q=64).resolve(20, 8).block_q == 24   # one block


def test_attention_row_statistics_are_lane_dense():
  # The saved log-sum-exp is [B, H, 1, Lq] f32 (a query per lane), not [B, H, Lq, 1];
  # the forward's output leaves the kernel as [B, H, D, Lq].
  from kernels.pallas_tpu import attention as A
  q = jax.ShapeDtypeStruct((2, 3, 256, 32), jnp.bfloat16)
  bs = A.AttentionBlockSizes().resolve(256, 256).with_heads(3).with_batch(2, 3, 1)
  o_t, lse = jax.eval_shape(functools.partial(
      A._fwd_call, scale=1.0, kv_len=256, bs=bs, interpret=True), q, q, q)
  assert lse.shape == (2, 3, 1, 256) and lse.dtype == jnp.float32
  assert o_t.shape == (2, 3, 32, 256) and o_t.dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(1, 7, 200, 2, 72), (1, 64, 256, 2, 32)], ids=str)
def test_attention_bf16(shape):
  check_attention(shape, jnp.bfloat16)


@pytest.mark.parametrize("s", oc.PUBLISHED[:2], ids=lambda s: s.name)
def test_attention_latent_self_attention_published(s):
  # The model's latent self-attention: q = k = v source, length M.
  check_op(shapes.op_shape(s, "latent_self_attention"), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("s", oc.PUBLISHED, ids=lambda s: s.name)
def test_attention_read_write_directions_published(s):
  check_op(shapes.op_shape(s, "read_attention"), jnp.float32)     # latents <- interface
  check_op(shapes.op_shape(s, "write_attention"), jnp.bfloat16)   # interface <- latents


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(b=hst.integers(1, 2), lq=hst.integers(1, 300), lk=hst.integers(1, 600),
                  h=hst.integers(1, 2), d=hst.sampled_from([8, 24, 32, 72, 128]),
                  bf16=hst.booleans())
def test_attention_property_random_shapes(b, lq, lk, h, d, bf16):
  check_attention((b, lq, lk, h, d), jnp.bfloat16 if bf16 else jnp.float32, seed=lq + lk)


# ----------------------------------------------------------------------------
# Fused blocks.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("shape", oc.ODD_BLOCKS[:2] + tuple(
    pytest.param(s, marks=pytest.mark.slow) for s in oc.ODD_BLOCKS[2:]), ids=str)
def test_block_odd_shapes_fp32(direction, shape):
  check_block(direction, shape, jnp.float32)


def test_read_block_streamed_interface_small_blocks_fp32():
  # Two latent blocks (the last partial) x three interface blocks (the last partial).
  check_block("read", (1, 12, 32, 300, 32, 2, 32, 0), jnp.float32,
              block_sizes=P.ReadBlockSizes(block_m=8, block_n=128))


def test_write_block_several_tiles_fp32():
  check_block("write", (2, 8, 32, 200, 32, 2, 32, 64), jnp.float32,
              block_sizes=P.WriteBlockSizes(block_n=64))


# Lane-dense projections (heads as lane slices of [rows, heads * head_dim]) and the per-core
# partial weight-gradient accumulators: a batch the partials do not divide (padded), more
# partials than batch elements, head dims 32 and 48, odd token counts, several blocks.
PARTIAL_CASES = [
    ("read", (3, 9, 48, 300, 40, 2, 96, 0), P.ReadBlockSizes(8, 128, num_partials=2)),
    ("read", (2, 12, 32, 150, 32, 3, 96, 0), P.ReadBlockSizes(8, 128, num_partials=3)),
    ("write", (3, 9, 32, 200, 48, 3, 96, 64), P.WriteBlockSizes(64, num_partials=2)),
    ("write", (3, 7, 40, 30, 40, 2, 96, 0), P.WriteBlockSizes(16, num_partials=3)),
]


@pytest.mark.parametrize("direction,shape,bs", PARTIAL_CASES, ids=str)
def test_block_partials_fp32(direction, shape, bs):
  check_block(direction, shape, jnp.float32, block_sizes=bs)


def test_write_block_partials_bf16():
  check_block("write", (3, 16, 64, 100, 96, 2, 96, 128), jnp.bfloat16,
              block_sizes=P.WriteBlockSizes(32, num_partials=2))


def test_read_block_bf16_partials_match_one_accumulator():
  # The read block's bf16 dx misses the bf16 rule vs the float64 oracle at one value in
  # ~10^4 (so does XLA's own bf16 read block, at more values; test_block_bf16[read]), so
  # the bf16 partials are checked against the same kernel with one accumulator: dx and
  # dz do not depend on the split; the weight gradients differ only in the order of
  # their fp32 sum, i.e. by at most one bf16 rounding step.
  shape = (3, 16, 64, 200, 64, 2, 64, 0)
  args, ct = oc.block_inputs(0, "read", *shape[:5], shape[6], shape[7], jnp.bfloat16)
  run = lambda parts: oc.value_and_grads(
      _block("read", shape[5], block_sizes=P.ReadBlockSizes(num_partials=parts)), args, ct)
  (out1, (dz1, dx1, dp1)), (out2, (dz2, dx2, dp2)) = run(1), run(2)
  for a, b in ((out1, out2), (dz1, dz2), (dx1, dx2)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  for name, a, b in zip(dp1._fields, dp1, dp2):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # bk's gradient is zero in exact arithmetic (rounding noise): wk's scale bounds it.
    scale = float(np.abs(np.asarray(dp1.wk if name == "bk" else a, np.float32)).max())
    np.testing.assert_allclose(b, a, rtol=2.0 ** -7, atol=1e-6 * scale, err_msg=name)


def _weight_grad_kernels(direction, batch, bs):
  """(grid, dimension_semantics) of each weight-gradient kernel in the block's gradient."""
  shape = (batch, 9, 32, 200, 32, 2, 64, 32)
  args, _ = oc.block_inputs(0, direction, *shape[:5], shape[6], shape[7], jnp.float32)
  fn = _block(direction, shape[5], interpret=False, block_sizes=bs)
  g = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))
  from bench.tpu_static import find_kernels
  out = {}
  for e in find_kernels(jax.make_jaxpr(g)(*args)):
    if e.params["name"].endswith(("dkv", "attn_bwd", "mlp_bwd")):
      cp = e.params["compiler_params"]
      cp = cp.get("mosaic_tpu", cp) if isinstance(cp, dict) else cp
      out[e.params["name"]] = (tuple(e.params["grid_mapping"].grid),
                               tuple(cp.dimension_semantics))
  return out


def test_weight_gradient_kernels_have_a_parallel_partial_axis():
  got = _weight_grad_kernels("read", 4, P.ReadBlockSizes(block_n=128))
  assert got == {"rin_read_block_dkv": ((2, 2, 2, 1), ("parallel",) + ("arbitrary",) * 3)}
  got = _weight_grad_kernels("write", 5, P.WriteBlockSizes(block_n=128, num_partials=3))
  sem = ("parallel", "arbitrary", "arbitrary")
  assert got == {"rin_write_block_mlp_bwd": ((3, 2, 2), sem),
                 "rin_write_block_attn_bwd": ((3, 2, 2), sem)}
  # Never more partials than batch elements.
  got = _weight_grad_kernels("write", 1, P.WriteBlockSizes(block_n=128, num_partials=4))
  assert got["rin_write_block_attn_bwd"][0] == (1, 1, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_num_partials_must_be_a_positive_int(bad):
  (z, x, p), _ = oc.block_inputs(0, "read", 1, 8, 16, 8, 16, 16, 0, jnp.float32)
  with pytest.raises(ValueError, match=r"num_partials=.*must be a positive int"):
    P.read_block(z, x, p, num_heads=1, interpret=True,
                 block_sizes=P.ReadBlockSizes(num_partials=bad))
  (x, z, p), _ = oc.block_inputs(0, "write", 1, 8, 16, 8, 16, 16, 0, jnp.float32)
  with pytest.raises(ValueError, match=r"num_partials=.*must be a positive int"):
    P.write_block(x, z, p, num_heads=1, interpret=True,
                  block_sizes=P.WriteBlockSizes(num_partials=bad))


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
def test_block_bf16(direction):
  check_block(direction, (1, 16, 64, 200, 64, 2, 64, 128), jnp.bfloat16)


@pytest.mark.parametrize("direction", ["read", pytest.param("write", marks=pytest.mark.slow)])
def test_block_cifar10_published_fp32(direction):
  check_op(shapes.op_shape(oc.CIFAR10, f"{direction}_block"), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("s", oc.PUBLISHED[1:], ids=lambda s: s.name)
def test_block_imagenet64_published_fp32(direction, s):
  check_op(shapes.op_shape(s, f"{direction}_block"), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("s", oc.PUBLISHED[:2], ids=lambda s: s.name)
def test_block_published_bf16(direction, s):
  check_op(shapes.op_shape(s, f"{direction}_block"), jnp.bfloat16)


@pytest.mark.slow
@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(direction=hst.sampled_from(["read", "write"]), b=hst.integers(1, 2),
                  m=hst.integers(1, 40), n=hst.integers(1, 300), heads=hst.integers(1, 3),
                  dh=hst.sampled_from([8, 16, 24]), mlp=hst.integers(0, 2))
def test_block_property_random_shapes(direction, b, m, n, heads, dh, mlp):
  check_block(direction, (b, m, 24, n, 16, heads, heads * dh, mlp * 16), jnp.float32,
              seed=m + n)


# ----------------------------------------------------------------------------
# Fused latent self-attention block.
# ----------------------------------------------------------------------------

def _latent(heads, residual=False, interpret=True, block_sizes=None):
  return functools.partial(P.latent_attention_block, num_heads=heads, residual=residual,
                           interpret=interpret, block_sizes=block_sizes)


def check_latent(shape, dtype, *, residual=False, interpret=True, block_sizes=None, seed=0):
  """shape: (batch, m, d, heads, width)."""
  oc.check_latent(_latent(shape[3], residual, interpret, block_sizes), shape, dtype,
                  backend="pallas_tpu", residual=residual, seed=seed)


# (batch, m, d, heads, width), residual: latent counts no multiple of 8 (7, 130, 9), head
# dims 32, 48 and 72, with and without the residual.
LATENT_ODD = [
    ((1, 7, 32, 1, 32), False),
    ((2, 130, 96, 2, 96), True),
    ((2, 9, 64, 2, 144), False),
    ((1, 1, 16, 2, 16), True),
]


@pytest.mark.parametrize("shape,residual", LATENT_ODD, ids=str)
def test_latent_odd_shapes_fp32(shape, residual):
  check_latent(shape, jnp.float32, residual=residual)


@pytest.mark.parametrize("shape,residual", [((2, 16, 64, 2, 64), True),
                                            ((2, 20, 96, 2, 96), False)], ids=str)
def test_latent_bf16(shape, residual):
  check_latent(shape, jnp.bfloat16, residual=residual)


@pytest.mark.parametrize("bs", [P.LatentBlockSizes(block_b=2, num_partials=3),
                                P.LatentBlockSizes(block_b=1, num_partials=2),
                                P.LatentBlockSizes(block_b=5, num_partials=1)], ids=str)
def test_latent_batch_blocks_and_partials_fp32(bs):
  # 5 batch elements: blocks of 2 (the last padded) over 3 partials (the last with only
  # padding), one element a step over 2 partials (padded to 6), all in one step.
  check_latent((5, 9, 40, 2, 48), jnp.float32, residual=True, block_sizes=bs)


def test_latent_cifar10_published_fp32():
  s = oc.CIFAR10     # M = 128 latents of width 512, 16 heads of 32
  check_latent((1, s.m, s.d, s.latent_heads, s.d), jnp.float32)


def test_latent_block_rules(monkeypatch):
  R = P.LatentBlockSizes
  monkeypatch.setenv("RIN_TPU_GENERATION", "v5e")
  # 1024 rows a step: 8 latent blocks of 128 at batch 32; one TensorCore: one partial.
  assert R().resolve(32, 128) == R(8, 1)
  assert R().resolve(2, 128) == R(1, 1)              # 2 forward steps when the batch allows
  assert R().resolve(1, 8) == R(1, 1)
  assert R().resolve(6, 128) == R(3, 1)              # divisors of the batch first
  assert R().resolve(32, 128, fits=lambda bb: bb <= 2) == R(2, 1)
  assert R(block_b=64).resolve(32, 128).block_b == 32
  monkeypatch.setenv("RIN_TPU_GENERATION", "v5p")    # megacore: two partials
  assert R().resolve(32, 128).num_partials == 2
  monkeypatch.delenv("RIN_TPU_GENERATION")
  assert R().resolve(32, 128).num_partials == 2
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=r"block_b=.* must be a positive int"):
      R(block_b=bad).resolve(4, 8)
    with pytest.raises(ValueError, match=r"num_partials=.* must be a positive int"):
      R(num_partials=bad).resolve(4, 8)
  (z, p), _ = oc.latent_inputs(0, 1, 8, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"LatentBlockSizes"):
    P.latent_attention_block(z, p, num_heads=1, interpret=True, block_sizes=P.ReadBlockSizes())
  big = jax.ShapeDtypeStruct((64, 2048, 1024), jnp.float32)
  with pytest.raises(ValueError, match=r"pallas_tpu.latent_attention_block.*VMEM"):
    jax.eval_shape(lambda z, p: P.latent_attention_block(
        z, p, num_heads=8, block_sizes=R(block_b=8)), big,
        oc.latent_params(jax.random.PRNGKey(0), 1024, 1024, jnp.float32))


def _latent_kernels(batch, bs, residual=False):
  """{kernel name: (grid, dimension_semantics)} of the latent block's value and gradient,
  and the number of Pallas calls in each."""
  from bench.tpu_static import find_kernels
  (z, p), _ = oc.latent_inputs(0, batch, 128, 64, 64, jnp.bfloat16)
  fn = _latent(2, residual, interpret=False, block_sizes=bs)
  out = {}
  counts = []
  for f in (fn, jax.grad(lambda z, p: jnp.sum(fn(z, p).astype(jnp.float32)), argnums=(0, 1))):
    ks = find_kernels(jax.make_jaxpr(f)(z, p))
    counts.append(len(ks))
    for e in ks:
      cp = e.params["compiler_params"]
      cp = cp.get("mosaic_tpu", cp) if isinstance(cp, dict) else cp
      out[e.params["name"]] = (tuple(e.params["grid_mapping"].grid),
                               tuple(cp.dimension_semantics))
  return out, counts


def test_latent_kernels_grids():
  # One kernel forward, one backward (no XLA attention core, no delta pass); the backward
  # is sequential but for its leading per-core partial axis.
  got, counts = _latent_kernels(8, P.LatentBlockSizes(block_b=2, num_partials=2))
  assert got == {"rin_latent_attn_fwd": ((4,), ("parallel",)),
                 "rin_latent_attn_bwd": ((2, 2), ("parallel", "arbitrary"))}
  assert counts == [1, 2]      # the gradient: the saving forward and the backward
  got, _ = _latent_kernels(3, P.LatentBlockSizes(block_b=2, num_partials=4))
  assert got["rin_latent_attn_bwd"][0] == (2, 1)     # never more partials than blocks


def test_tpu_default_picks_the_latent_kernel_where_the_cost_table_says_it_wins(monkeypatch):
  # kernels/pallas_tpu/cost_table.py (bench.tpu_static --write-wins, v5e ESTIMATE): the
  # CIFAR-10 latent block class beats XLA, so implementation=None on TPU runs the kernel.
  from kernels import api
  from kernels.pallas_tpu import cost_table
  from bench.tpu_static import find_kernels
  monkeypatch.setattr(api.jax, "default_backend", lambda: "tpu")
  s = oc.CIFAR10
  z = jax.ShapeDtypeStruct((32, s.m, s.d), jnp.bfloat16)
  p = oc.latent_params(jax.random.PRNGKey(0), s.d, s.d, jnp.float32)
  key = api.shape_class("latent_attn", z, p.wq, heads=s.latent_heads, dtype=z.dtype)
  row = cost_table.WINS[key]
  assert row["pallas_tpu_us"] < row["xla_us"], row
  f = lambda z: kernels.latent_attention_block(z, p, num_heads=s.latent_heads)
  assert [e.params["name"] for e in find_kernels(jax.make_jaxpr(f)(z))] == [
      "rin_latent_attn_fwd"]


def test_latent_public_op_and_layer_use_the_kernel():
  (z, p), _ = oc.latent_inputs(0, 2, 9, 32, 32, jnp.float32)
  got = kernels.latent_attention_block(z, p, num_heads=2, implementation="pallas_tpu",
                                       interpret=True, residual=True,
                                       block_sizes=P.BlockSizes(latent=P.LatentBlockSizes(1)))
  want = kernels.latent_attention_block(z, p, num_heads=2, implementation="xla", residual=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  from bench.tpu_static import find_kernels
  f = lambda z: kernels.latent_attention_block(z, p, num_heads=2, implementation="pallas_tpu")
  assert [e.params["name"] for e in find_kernels(jax.make_jaxpr(f)(z))] == [
      "rin_latent_attn_fwd"]


# ----------------------------------------------------------------------------
# TPU-faithful interpreter (DMA / semaphore model) with race detection.
# ----------------------------------------------------------------------------

def _races_found():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  return ipc.races is not None and ipc.races.races_found


def test_tpu_interpreter_with_race_detection():
  ip = pltpu.InterpretParams(detect_races=True, on_race="warn")
  check_attention((2, 20, 300, 2, 32), jnp.float32, interpret=ip,
                  block_sizes=P.AttentionBlockSizes(block_k=128, block_b=2))
  assert not _races_found()
  check_block("write", (1, 8, 16, 20, 16, 2, 16, 32), jnp.float32, interpret=ip,
              block_sizes=P.WriteBlockSizes(block_n=8))
  assert not _races_found()
  check_latent((3, 9, 16, 2, 16), jnp.float32, interpret=ip, residual=True,
               block_sizes=P.LatentBlockSizes(block_b=1, num_partials=2))
  assert not _races_found()


@pytest.mark.slow
def test_tpu_interpreter_read_block_two_cores_race_detection():
  ip = pltpu.InterpretParams(detect_races=True, on_race="warn", num_cores_or_threads=2)
  check_block("read", (2, 12, 16, 150, 16, 2, 16, 0), jnp.float32, interpret=ip,
              block_sizes=P.ReadBlockSizes(block_m=8, block_n=128))
  assert not _races_found()


# ----------------------------------------------------------------------------
# The public op dispatches here; block-size and VMEM checks.
# ----------------------------------------------------------------------------

def test_public_op_dispatch_and_combined_block_sizes():
  (q, k, v), _ = oc.attention_inputs(0, 1, 9, 17, 2, 16, jnp.float32)
  bs = P.BlockSizes(attention=P.AttentionBlockSizes(block_q=16, block_b=1))
  got = kernels.cross_attention(q, k, v, implementation="pallas_tpu", interpret=True,
                                block_sizes=bs)
  want = kernels.cross_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_block_size_rules_are_clear_errors():
  (q, k, v), _ = oc.attention_inputs(0, 1, 16, 16, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"block_q=12.*multiple of 8"):
    P.cross_attention(q, k, v, interpret=True, block_sizes=P.AttentionBlockSizes(block_q=12))
  with pytest.raises(ValueError, match=r"block_k=64.*multiple of 128"):
    P.cross_attention(q, k, v, interpret=True, block_sizes=P.AttentionBlockSizes(block_k=64))
  with pytest.raises(ValueError, match=r"ReadBlockSizes"):
    P.cross_attention(q, k, v, interpret=True, block_sizes=P.ReadBlockSizes())


def test_vmem_budget_refuses_blocks_that_do_not_fit():
  big = jax.ShapeDtypeStruct((1, 8192, 1, 128), jnp.float32)
  with pytest.raises(ValueError, match=r"VMEM.*budget"):
    jax.eval_shape(lambda q, k, v: P.cross_attention(
        q, k, v, block_sizes=P.AttentionBlockSizes(block_q=4096, block_k=8192)), big, big, big)
  # Write block: a 4096-row tile of a wide MLP cannot fit; the default shrinks to fit.
  s = oc.IMAGENET64_P4
  f32 = jnp.float32
  x, z, p = shapes.abstract_args(shapes.op_shape(s, "write_block", n=8192), 1, f32)
  with pytest.raises(ValueError, match=r"pallas_tpu.write_block.*VMEM"):
    jax.eval_shape(lambda x, z, p: P.write_block(x, z, p, num_heads=s.rw_heads,
                                                 block_sizes=P.WriteBlockSizes(4096)), x, z, p)
  out = jax.eval_shape(lambda x, z, p: P.write_block(x, z, p, num_heads=s.rw_heads), x, z, p)
  assert out.shape == x.shape
  # Read block: too many latent rows per block.
  zr, x, pr = shapes.abstract_args(shapes.op_shape(s, "read_block", m=8192, n=8192), 1, f32)
  with pytest.raises(ValueError, match=r"pallas_tpu.read_block.*VMEM"):
    jax.eval_shape(lambda z, x, p: P.read_block(z, x, p, num_heads=s.rw_heads,
                                                block_sizes=P.ReadBlockSizes(8192, 8192)),
                   zr, x, pr)


def test_vmem_budget_per_generation(monkeypatch):
  from kernels.pallas_tpu import common as C
  mib = 2**20
  # 3/4 of each generation's VMEM per TensorCore: v5e/v6e 128 MiB, v5p/v7x 64, v4 16.
  assert {g: C.vmem_limit_bytes(g) // mib for g in ("v4", "v5e", "v5p", "v6e", "v7x")} == {
      "v4": 12, "v5e": 96, "v5p": 48, "v6e": 96, "v7x": 48}
  assert C.vmem_limit_bytes("v7x") < 64 * mib     # v7x has 64 MiB per core in all
  # The capacities are jax's own hardware table's.
  for g, chip in (("v5e", "v5e"), ("v5p", "v5p"), ("v6e", "v6e"), ("v7x", "7x")):
    info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(chip), 1)
    assert info.vmem_capacity_bytes == C.VMEM_CAPACITY_MIB[g] * mib, g
  # No TPU known (this CPU host): the smallest target budget, which fits them all.
  monkeypatch.delenv("RIN_TPU_GENERATION", raising=False)
  assert C.tpu_generation() is None and C.vmem_limit_bytes() == 48 * mib == C.VMEM_LIMIT_BYTES
  # An attention block of ~73 MiB: fits v5e's budget, not v7x's; the error names the
  # kernel, the block sizes, the estimate, the budget and the generation.
  big = jax.ShapeDtypeStruct((1, 2048, 1, 128), jnp.float32)
  bs = P.AttentionBlockSizes(block_q=2048, block_k=2048)
  # A fresh function each time: eval_shape caches traces by function, and the budget is
  # read at trace time.
  attend = lambda: jax.eval_shape(lambda q, k, v: P.cross_attention(q, k, v, block_sizes=bs),
                                  big, big, big)
  monkeypatch.setenv("RIN_TPU_GENERATION", "v5e")
  assert attend().shape == big.shape
  assert C.compiler_params("parallel").vmem_limit_bytes == 96 * mib
  monkeypatch.setenv("RIN_TPU_GENERATION", "v7x")
  assert C.compiler_params("parallel").vmem_limit_bytes == 48 * mib
  with pytest.raises(ValueError, match=r"pallas_tpu.cross_attention: block_sizes=Attention"
                     r"BlockSizes\(block_q=2048, block_k=2048, block_h=1, block_b=1\) need "
                     r"about 7\d\.\d MiB of VMEM .* more than the 48 MiB budget of TPU v7x"):
    attend()
  monkeypatch.delenv("RIN_TPU_GENERATION")
  with pytest.raises(ValueError, match=r"48 MiB budget of the smallest of v5e, v5p, v6e, v7x"):
    attend()
  # The default head and batch blocks shrink to fit the budget instead of failing: the
  # CIFAR-10 latent self-attention takes 16 heads x 2 batch elements a step on v5e, fewer
  # heads on v4 (12 MiB).
  from kernels.pallas_tpu import attention as A
  d_bs = A.AttentionBlockSizes().resolve(128, 128)
  for gen, hb, bb in (("v5e", 16, 2), ("v4", 8, 1)):
    budget = C.vmem_limit_bytes(gen)
    fits = lambda b: A.vmem_estimate(b, 32, jnp.float32) <= budget
    got = d_bs.with_heads(16, fits).with_batch(32, 16, 1, fits)
    assert (got.block_h, got.block_b) == (hb, bb), (gen, got)
  monkeypatch.setenv("RIN_TPU_GENERATION", "v4")
  q = jax.ShapeDtypeStruct((32, 128, 16, 32), jnp.float32)
  assert jax.eval_shape(lambda q: P.cross_attention(q, q, q), q).shape == q.shape
  monkeypatch.setenv("RIN_TPU_GENERATION", "v9")
  with pytest.raises(ValueError, match=r"RIN_TPU_GENERATION='v9' is not one of"):
    C.vmem_limit_bytes()
  with pytest.raises(ValueError, match=r"generation 'v9' is not one of"):
    C.vmem_limit_bytes("v9")


# ----------------------------------------------------------------------------
# Every kernel lowers for TPU (Mosaic) at every published shape, forward and grad.
# ----------------------------------------------------------------------------

def _export_tpu(fn, *args):
  """Lowers fn and its gradient for TPU; returns the number of Mosaic kernels in each."""
  counts = []
  for g in (fn, jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                         argnums=tuple(range(len(args))))):
    exp = jax.export.export(jax.jit(g), platforms=["tpu"])(*args)
    counts.append(exp.mlir_module().count("tpu_custom_call"))
  return counts


EXPORT_BATCH = 8


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("s", oc.PUBLISHED, ids=lambda s: s.name)
def test_every_kernel_lowers_for_tpu_at_published_shapes(s, dtype):
  # Latent self-attention, read/write-direction attention and the fused blocks (params in
  # the compute dtype, as the layers pass them).
  for o in shapes.op_shapes(s):
    args = shapes.abstract_args(o, EXPORT_BATCH, dtype)
    assert _export_tpu(_op(o.kind, o.heads, interpret=False), *args) == [1, 3], o.name


def test_odd_shapes_lower_for_tpu():
  for o in shapes.ODD:
    args = shapes.abstract_args(o, 1, jnp.float32)
    assert _export_tpu(_op(o.kind, o.heads, interpret=False), *args) == [1, 3], o.name
  # No MLP: no saved y, so XLA drops the forward kernel from the gradient.
  o = dataclasses.replace(shapes.ODD[-1], mlp=0)
  args = shapes.abstract_args(o, 1, jnp.float32)
  assert _export_tpu(_op(o.kind, o.heads, interpret=False), *args) == [1, 1]


def test_latent_block_lowers_for_tpu_at_published_and_odd_shapes():
  # The fused latent block: forward 1 kernel, gradient 2 (the saving forward, backward).
  from bench.tpu_aot_check import ODD_LATENT, _latent_case
  cases = [(EXPORT_BATCH, s.m, s.d, s.latent_heads, False, dt)
           for s in oc.PUBLISHED[:2] for dt in (jnp.bfloat16, jnp.float32)]
  cases += [(1, m, d, heads, residual, jnp.float32) for _, m, d, heads, residual in ODD_LATENT]
  for case in cases:
    fn, args = _latent_case(*case, None)
    assert _export_tpu(fn, *args) == [1, 2], case


# ----------------------------------------------------------------------------
# Stronger than export: the real XLA:TPU + Mosaic compilers, deviceless (libtpu).
# ----------------------------------------------------------------------------

def _libtpu_site():
  from bench.tpu_static import libtpu_site    # scripts/setup.sh: .venv/libtpu_site
  return libtpu_site()


def _libtpu_env():
  import os
  env = dict(os.environ)
  if _libtpu_site():
    env["PYTHONPATH"] = os.pathsep.join([_libtpu_site(), os.getcwd(), env.get("PYTHONPATH", "")])
  return env


# A deviceless compile (the real XLA:TPU and Mosaic compilers, no TPU) of the fused latent
# block and the write block at tiny shapes, forward and gradient, in a fresh process (libtpu
# reads its flags once); prints each program's Pallas kernel names.
_TINY_COMPILE = """
import functools, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
import kernels.pallas_tpu as P
from tests.kernels import op_cases as oc
sh = SingleDeviceSharding(topologies.get_topology_desc(platform="tpu",
                                                        topology_name="v5e:1x1").devices[0])
place = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t)
def compile_(name, fn, args):
  for f in (fn, jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                         argnums=tuple(range(len(args))))):
    text = jax.jit(f).lower(*place(args)).compile().as_text()
    print(name, sorted(set(k for k in ("rin_latent_attn_fwd", "rin_latent_attn_bwd",
                                       "rin_write_block_fwd", "rin_write_block_attn_bwd",
                                       "rin_write_block_mlp_bwd") if k in text)))
(z, p), _ = oc.latent_inputs(0, 2, 20, 128, 128, jnp.bfloat16)
compile_("latent", functools.partial(P.latent_attention_block, num_heads=4, residual=True),
         (z, p))
args, _ = oc.block_inputs(0, "write", 2, 16, 64, 40, 64, 64, 128, jnp.bfloat16)
compile_("write", functools.partial(P.write_block, num_heads=2), args)
"""


@pytest.mark.skipif(_libtpu_site() is None,
                    reason="needs libtpu (scripts/setup.sh puts it in .venv/libtpu_site; or RIN_LIBTPU_SITE)"
                    "; export lowering above still checks every kernel")
def test_latent_and_write_block_compile_for_tpu_v5e_with_libtpu():
  import subprocess
  import sys
  from bench.tpu_static import _libtpu_env as bench_env
  env = bench_env("v5e") | {k: v for k, v in _libtpu_env().items() if k == "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", _TINY_COMPILE], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  assert r.stdout.split("\n")[:4] == [
      "latent ['rin_latent_attn_fwd']", "latent ['rin_latent_attn_bwd', 'rin_latent_attn_fwd']",
      "write ['rin_write_block_fwd']",
      "write ['rin_write_block_attn_bwd', 'rin_write_block_fwd', 'rin_write_block_mlp_bwd']"], (
      r.stdout)


@pytest.mark.slow
@pytest.mark.skipif(_libtpu_site() is None,
                    reason="needs libtpu (scripts/setup.sh puts it in .venv/libtpu_site; or RIN_LIBTPU_SITE)"
                    "; export lowering above still checks every kernel")
def test_every_kernel_compiles_for_tpu_v5e_with_libtpu():
  import os
  import subprocess
  import sys
  env = _libtpu_env()
  r = subprocess.run([sys.executable, "-m", "bench.tpu_aot_check", "--topology",
                      "v5e:1x1", "--batch", "8"], env=env, capture_output=True, text=True,
                     timeout=1500)
  assert r.returncode == 0 and "\n0 failures" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
  # 5 ops x 2 dtypes x 3 configs + 4 odd shapes; the latent block: 2 x 3 + 3 odd.
  assert r.stdout.count("| yes |") == 2 * (3 * 2 * 5 + 4) + 2 * (2 * 3 + 3)
