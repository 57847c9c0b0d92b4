"""implementation="pallas_tpu": numerics in Pallas' interpreter against the float64
reference (forward and every gradient), the TPU-faithful interpreter with race
detection, TPU lowering of every kernel at every published shape, block-size checks.

All on CPU: `interpret=True` runs the very kernels that Mosaic compiles on TPU.
"""
from __future__ import annotations

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
from kernels.params import ReadBlockParams, WriteBlockParams
from tests.kernels import op_cases as oc


pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py


def _attn(interpret=True, block_sizes=None):
  return functools.partial(P.cross_attention, interpret=interpret, block_sizes=block_sizes)


def check_attention(shape, dtype, *, interpret=True, block_sizes=None, seed=0):
  args, ct = oc.attention_inputs(seed, *shape, dtype)
  got = oc.value_and_grads(_attn(interpret, block_sizes), args, ct)
  want = oc.oracle("attention", args, ct)
  oc.assert_close(got, want, dtype, what=f"attention{shape} {jnp.dtype(dtype)}: ")


def check_block(direction, shape, dtype, *, interpret=True, block_sizes=None, seed=0):
  batch, m, d, n, t, heads, width, mlp_ratio = shape
  args, ct = oc.block_inputs(seed, direction, batch, m, d, n, t, width, mlp_ratio, dtype)
  op = P.read_block if direction == "read" else P.write_block
  fn = functools.partial(op, num_heads=heads, interpret=interpret, block_sizes=block_sizes)
  got = oc.value_and_grads(fn, args, ct)
  want = oc.oracle(direction, args, ct, num_heads=heads)
  oc.assert_close(got, want, dtype, what=f"{direction}_block{shape} {jnp.dtype(dtype)}: ")


def _block_shape(s: oc.BlockShape):
  return (s.batch, s.m, s.d, s.n, s.t, s.heads, s.width, s.mlp_ratio)


# ----------------------------------------------------------------------------
# Cross-attention.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", oc.ODD_ATTENTION, ids=str)
def test_attention_odd_shapes_fp32(shape):
  check_attention(shape, jnp.float32)


def test_attention_streamed_keys_small_blocks_fp32():
  # Several query blocks and several key blocks, partial last key block.
  check_attention((1, 20, 300, 2, 32), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_q=8, block_k=128))


@pytest.mark.parametrize("block_h", [1, 2, None], ids=["h1", "h2", "default"])
def test_attention_head_blocks_fp32(block_h):
  # Several heads per grid step (4 heads, streamed partial key blocks): fwd and all grads.
  check_attention((2, 9, 200, 4, 16), jnp.float32,
                  block_sizes=P.AttentionBlockSizes(block_q=8, block_k=128, block_h=block_h))


def test_attention_head_block_rules():
  bs = P.AttentionBlockSizes().resolve(128, 128)
  assert bs.with_heads(16).block_h == 16            # 16 x 128 x 128 scores fit one step
  assert P.AttentionBlockSizes().resolve(512, 2048).with_heads(16).block_h == 2  # 256 x 2048
  with pytest.raises(ValueError, match="block_h=3 must be a positive divisor"):
    P.AttentionBlockSizes(block_h=3).resolve(8, 8).with_heads(4)


@pytest.mark.parametrize("shape", [(1, 7, 200, 2, 72), (1, 64, 256, 2, 32)], ids=str)
def test_attention_bf16(shape):
  check_attention(shape, jnp.bfloat16)


@pytest.mark.parametrize("s", oc.PUBLISHED[:2], ids=lambda s: s.name)
def test_attention_latent_self_attention_published(s):
  # The model's latent self-attention: q = k = v source, length M.
  check_attention((1, s.m, s.m, s.latent_heads, s.latent_head_dim), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("s", oc.PUBLISHED, ids=lambda s: s.name)
def test_attention_read_write_directions_published(s):
  dh = s.width // s.heads
  check_attention((1, s.m, s.n, s.heads, dh), jnp.float32)    # read: latents <- interface
  check_attention((1, s.n, s.m, s.heads, dh), jnp.bfloat16)   # write: interface <- latents


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
  check_block("write", (2, 8, 32, 200, 32, 2, 32, 2), jnp.float32,
              block_sizes=P.WriteBlockSizes(block_n=64))


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
def test_block_bf16(direction):
  check_block(direction, (1, 16, 64, 200, 64, 2, 64, 2), jnp.bfloat16)


@pytest.mark.parametrize("direction", ["read", pytest.param("write", marks=pytest.mark.slow)])
def test_block_cifar10_published_fp32(direction):
  check_block(direction, _block_shape(oc.CIFAR10), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("s", oc.PUBLISHED[1:], ids=lambda s: s.name)
def test_block_imagenet64_published_fp32(direction, s):
  check_block(direction, _block_shape(s), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("s", oc.PUBLISHED[:2], ids=lambda s: s.name)
def test_block_published_bf16(direction, s):
  check_block(direction, _block_shape(s), jnp.bfloat16)


@pytest.mark.slow
@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(direction=hst.sampled_from(["read", "write"]), b=hst.integers(1, 2),
                  m=hst.integers(1, 40), n=hst.integers(1, 300), heads=hst.integers(1, 3),
                  dh=hst.sampled_from([8, 16, 24]), mlp=hst.integers(0, 2))
def test_block_property_random_shapes(direction, b, m, n, heads, dh, mlp):
  check_block(direction, (b, m, 24, n, 16, heads, heads * dh, mlp), jnp.float32, seed=m + n)


# ----------------------------------------------------------------------------
# TPU-faithful interpreter (DMA / semaphore model) with race detection.
# ----------------------------------------------------------------------------

def _races_found():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  return ipc.races is not None and ipc.races.races_found


def test_tpu_interpreter_with_race_detection():
  ip = pltpu.InterpretParams(detect_races=True, on_race="warn")
  check_attention((1, 20, 300, 2, 32), jnp.float32, interpret=ip,
                  block_sizes=P.AttentionBlockSizes(block_q=8, block_k=128))
  assert not _races_found()
  check_block("write", (1, 8, 16, 20, 16, 2, 16, 2), jnp.float32, interpret=ip,
              block_sizes=P.WriteBlockSizes(block_n=8))
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
  bs = P.BlockSizes(attention=P.AttentionBlockSizes(block_q=8))
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
  x = jax.ShapeDtypeStruct((1, 8192, s.t), jnp.float32)
  z = jax.ShapeDtypeStruct((1, s.m, s.d), jnp.float32)
  p = jax.eval_shape(lambda: oc.write_params(jax.random.PRNGKey(0), s.t, s.d, s.width,
                                              4 * s.t, jnp.float32))
  with pytest.raises(ValueError, match=r"pallas_tpu.write_block.*VMEM"):
    jax.eval_shape(lambda x, z, p: P.write_block(x, z, p, num_heads=s.heads,
                                                 block_sizes=P.WriteBlockSizes(4096)), x, z, p)
  out = jax.eval_shape(lambda x, z, p: P.write_block(x, z, p, num_heads=s.heads), x, z, p)
  assert out.shape == x.shape
  # Read block: too many latent rows per block.
  zr = jax.ShapeDtypeStruct((1, 8192, s.d), jnp.float32)
  pr = jax.eval_shape(lambda: oc.read_params(jax.random.PRNGKey(0), s.d, s.t, s.width,
                                             jnp.float32))
  with pytest.raises(ValueError, match=r"pallas_tpu.read_block.*VMEM"):
    jax.eval_shape(lambda z, x, p: P.read_block(z, x, p, num_heads=s.heads,
                                                block_sizes=P.ReadBlockSizes(8192, 8192)),
                   zr, x, pr)


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


def _sds(tree, dtype):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), tree)


EXPORT_BATCH = 8


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("s", oc.PUBLISHED, ids=lambda s: s.name)
def test_every_kernel_lowers_for_tpu_at_published_shapes(s, dtype):
  b = EXPORT_BATCH
  dh = s.width // s.heads
  sds = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
  attn = lambda q, k, v: P.cross_attention(q, k, v)
  lat = sds((b, s.m, s.latent_heads, s.latent_head_dim))
  # Latent self-attention, read-direction and write-direction attention.
  assert _export_tpu(attn, lat, lat, lat) == [1, 3]
  assert _export_tpu(attn, sds((b, s.m, s.heads, dh)), sds((b, s.n, s.heads, dh)),
                     sds((b, s.n, s.heads, dh))) == [1, 3]
  assert _export_tpu(attn, sds((b, s.n, s.heads, dh)), sds((b, s.m, s.heads, dh)),
                     sds((b, s.m, s.heads, dh))) == [1, 3]
  # Fused blocks (params in the compute dtype, as the layers pass them).
  z, x = sds((b, s.m, s.d)), sds((b, s.n, s.t))
  rp = _sds(oc.read_params(jax.random.PRNGKey(0), s.d, s.t, s.width, jnp.float32), dtype)
  wp = _sds(oc.write_params(jax.random.PRNGKey(0), s.t, s.d, s.width, s.mlp_ratio * s.t,
                            jnp.float32), dtype)
  assert _export_tpu(lambda z, x, p: P.read_block(z, x, p, num_heads=s.heads), z, x, rp) == [1, 3]
  assert _export_tpu(lambda x, z, p: P.write_block(x, z, p, num_heads=s.heads), x, z, wp) == [1, 3]


def test_odd_shapes_lower_for_tpu():
  f32 = jnp.float32
  sds = lambda shape: jax.ShapeDtypeStruct(shape, f32)
  attn = lambda q, k, v: P.cross_attention(q, k, v)
  assert _export_tpu(attn, sds((1, 7, 2, 72)), sds((1, 1000, 2, 72)), sds((1, 1000, 2, 72))) == [1, 3]
  assert _export_tpu(attn, sds((1, 1, 1, 200)), sds((1, 1, 1, 200)), sds((1, 1, 1, 200))) == [1, 3]
  rp = _sds(oc.read_params(jax.random.PRNGKey(0), 48, 32, 144, f32), f32)
  assert _export_tpu(lambda z, x, p: P.read_block(z, x, p, num_heads=2),
                     sds((1, 7, 48)), sds((1, 1000, 32)), rp) == [1, 3]
  wp = _sds(oc.write_params(jax.random.PRNGKey(0), 32, 48, 144, 0, f32), f32)
  assert _export_tpu(lambda x, z, p: P.write_block(x, z, p, num_heads=2),
                     sds((1, 1000, 32)), sds((1, 7, 48)), wp) == [1, 1]  # no MLP: no
  # saved y, so XLA drops the forward kernel from the gradient.


# ----------------------------------------------------------------------------
# Whole model: pallas_tpu (interpreted) == xla on the tiny digits config.
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_whole_model_pallas_tpu_matches_xla_digits():
  import rin
  from rin.configs import digits
  cfg = digits.get_config()
  b = 2
  m = cfg.model
  x = jax.random.normal(jax.random.PRNGKey(0), (b, m.image_size, m.image_size, m.channels))
  gamma = jnp.array([0.3, 0.8])
  labels = jnp.array([1, 7])
  prev = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (b, m.num_latents, m.latent_dim))
  ref = rin.RIN(**m, implementation="xla")
  fast = rin.RIN(**m, implementation="pallas_tpu", interpret=True)
  params = ref.init(jax.random.PRNGKey(2), x, gamma, labels, prev)
  # LN0 of self-conditioning starts at zero; make it non-zero so prev matters.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 if "self_cond_ln0" in jax.tree_util.keystr(p) else a, params)

  def loss(model, params):
    out, z = model.apply(params, x, gamma, labels, prev)
    return jnp.mean(out ** 2) + jnp.mean(z ** 2), (out, z)

  (l_ref, (o_ref, z_ref)), g_ref = jax.value_and_grad(
      functools.partial(loss, ref), has_aux=True)(params)
  (l_fast, (o_fast, z_fast)), g_fast = jax.value_and_grad(
      functools.partial(loss, fast), has_aux=True)(params)
  assert jax.tree.structure(g_ref) == jax.tree.structure(g_fast)
  np.testing.assert_allclose(o_fast, o_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z_fast, z_ref, rtol=1e-4, atol=1e-4)
  oc.assert_close(g_fast, g_ref, jnp.float32, what="model grads ")


# ----------------------------------------------------------------------------
# bench/costs.py and bench/roofline.py (the roofline the TPU timings are held to).
# ----------------------------------------------------------------------------

def test_costs_match_hand_counts_and_roofline_writes_json(tmp_path):
  from bench import costs, roofline
  c = costs.cross_attention(2, 3, 5, 7, 8, "bfloat16")
  assert c.flops == 4 * 2 * 3 * 5 * 7 * 8
  assert c.bytes == 2 * (2 * 2 * 3 * 7 * 8 + 2 * 2 * 5 * 7 * 8) + 4 * 2 * 7 * 3
  assert costs.cross_attention(2, 3, 5, 7, 8, backward=True).flops == 2 * c.flops
  # Block FLOPs agree with XLA's own count of the reference's matmuls (fp32 inputs).
  s = oc.CIFAR10
  (x, z, p), _ = oc.block_inputs(0, "write", 1, s.m, s.d, s.n, s.t, s.width, s.mlp_ratio,
                                 jnp.float32)
  xla = jax.jit(lambda x, z, p: kernels.reference.write_block(x, z, p, num_heads=s.heads)
                ).lower(x, z, p).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  ours = costs.write_block(1, s.n, s.t, s.m, s.d, s.heads, s.width, s.mlp_ratio * s.t, "float32")
  assert abs(ours.flops - xla["flops"]) / xla["flops"] < 0.05, (ours.flops, xla["flops"])
  out = tmp_path / "roofline.json"
  rs = roofline.main(["--batch", "4", "--out", str(out)])
  assert out.exists() and len(rs) == 3 * 10
  r = rs[0]
  assert r["v5e_roofline_us"] == pytest.approx(
      1e6 * max(r["flops"] / 197e12, r["bytes"] / 819e9))


# ----------------------------------------------------------------------------
# Stronger than export: the real XLA:TPU + Mosaic compilers, deviceless (libtpu).
# ----------------------------------------------------------------------------

def _libtpu_site():
  import importlib.util
  import os
  if importlib.util.find_spec("libtpu") is not None:
    return ""
  site = os.environ.get("RIN_LIBTPU_SITE", "")   # a `pip install --target` dir with libtpu
  return site if site and os.path.isdir(os.path.join(site, "libtpu")) else None


@pytest.mark.slow
@pytest.mark.skipif(_libtpu_site() is None,
                    reason="needs libtpu (pip install libtpu, or RIN_LIBTPU_SITE=<--target dir>)"
                    "; export lowering above still checks every kernel")
def test_every_kernel_compiles_for_tpu_v5e_with_libtpu():
  import os
  import subprocess
  import sys
  env = dict(os.environ)
  if _libtpu_site():
    env["PYTHONPATH"] = os.pathsep.join([_libtpu_site(), os.getcwd(), env.get("PYTHONPATH", "")])
  r = subprocess.run([sys.executable, "-m", "bench.tpu_aot_check", "--topology",
                      "v5e:1x1", "--batch", "8"], env=env, capture_output=True, text=True,
                     timeout=1500)
  assert r.returncode == 0 and "\n0 failures" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
  assert r.stdout.count("| yes |") == 2 * (3 * 2 * 5 + 4)
