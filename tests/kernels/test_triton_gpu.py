"""implementation="triton" through Triton's interpreter on CPU (interpret=True).

Every kernel runs forward and backward (jax.grad -> custom_vjp -> Triton backward
kernels) against the float64 jax.numpy reference (kernels/reference.py), on the
published RIN block shapes (batch 1) and odd ones (lengths 1, 7, 200, 1000; head
dim 72). fp32 and fp16 only: the interpreter's bf16 tl.dot is wrong (DESIGN.md);
bf16 is covered by the compile report / lint (tests/kernels/test_triton_lint.py) and by
the GPU script. Comparisons are per value (op_cases.assert_close_per_value).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference
from kernels import triton_gpu
from kernels.params import ReadBlockParams, WriteBlockParams
from tests.kernels import op_cases as oc



pytestmark = pytest.mark.usefixtures("float64_oracle")   # tests/kernels/conftest.py


def _f64(t):
  return jax.tree.map(lambda a: None if a is None else jnp.asarray(a, jnp.float64), t)


def _close(got, want, tol, what="", zero=None):
  """Per value: |got - want| <= tol * (|want| + rms of that leaf); NaN/inf never pass."""
  oc.assert_close_per_value(got, want, tol=tol, what=what + ": ", zero_scaled_by=zero)


def _attn_case(b, lq, lk, h, dh, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, h, dh), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, lk, h, dh), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, lk, h, dh), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, lq, h, dh), jnp.float32).astype(dtype)
  return q, k, v, do


def _check_attention(b, lq, lk, h, dh, dtype, block_sizes=None):
  q, k, v, do = _attn_case(b, lq, lk, h, dh, dtype)
  f = lambda q, k, v: kernels.cross_attention(q, k, v, implementation="triton",
                                              interpret=True, block_sizes=block_sizes)
  o, vjp = jax.vjp(f, q, k, v)
  assert o.dtype == dtype
  o_ref, vjp_ref = jax.vjp(lambda *a: reference.cross_attention(*a, precision="highest"),
                           *_f64((q, k, v)))
  tol = oc.triton_tolerance(dtype)
  _close(o, o_ref, tol, "forward")
  # One key: the output is v whatever q and k are, so dq and dk are exactly zero.
  zero = {"[0]": "[2]", "[1]": "[2]"} if lk == 1 else None
  _close(vjp(do), vjp_ref(_f64(do)), 4 * tol, "dq, dk, dv", zero=zero)


# (batch, q_len, kv_len, heads, head_dim)
PUBLISHED_ATTENTION = [
    pytest.param(1, 128, 256, 8, 32, id="cifar10_read"),
    pytest.param(1, 256, 128, 8, 32, id="cifar10_write", marks=pytest.mark.slow),
    pytest.param(1, 128, 128, 16, 32, id="cifar10_latent_self_attn", marks=pytest.mark.slow),
    pytest.param(1, 128, 256, 16, 32, id="imagenet64_read", marks=pytest.mark.slow),
    pytest.param(1, 256, 128, 16, 32, id="imagenet64_write", marks=pytest.mark.slow),
    pytest.param(1, 128, 128, 16, 48, id="imagenet64_latent_self_attn",
                 marks=pytest.mark.slow),
]
ODD_ATTENTION = [
    pytest.param(1, 1, 7, 2, 72, id="q1_k7_d72"),
    pytest.param(1, 7, 200, 2, 72, id="q7_k200_d72"),
    pytest.param(1, 7, 1000, 1, 72, id="q7_k1000_d72"),
    pytest.param(1, 200, 1, 2, 32, id="q200_k1"),
    pytest.param(2, 1000, 7, 1, 72, id="q1000_k7_d72_b2", marks=pytest.mark.slow),
    pytest.param(1, 200, 1000, 1, 72, id="q200_k1000_d72", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("b,lq,lk,h,dh", PUBLISHED_ATTENTION)
def test_attention_published_fp32(b, lq, lk, h, dh):
  _check_attention(b, lq, lk, h, dh, jnp.float32)


@pytest.mark.parametrize("b,lq,lk,h,dh", ODD_ATTENTION)
def test_attention_odd_fp32(b, lq, lk, h, dh):
  _check_attention(b, lq, lk, h, dh, jnp.float32)


@pytest.mark.parametrize("b,lq,lk,h,dh", [
    pytest.param(1, 128, 256, 8, 32, id="cifar10_read", marks=pytest.mark.slow),
    pytest.param(1, 7, 200, 2, 72, id="q7_k200_d72"),
])
def test_attention_fp16(b, lq, lk, h, dh):
  _check_attention(b, lq, lk, h, dh, jnp.float16)


def test_attention_explicit_block_sizes_and_splits():
  # Forces several kv splits (combine kernel) and dK/dV query splits with small tiles.
  bs = triton_gpu.BlockSizes(block_q=16, block_kv=16, kv_splits=3,
                                     block_q_bwd=16, block_kv_bwd=16, q_splits_bwd=2)
  _check_attention(1, 40, 70, 2, 24, jnp.float32, block_sizes=bs)


def _block_params(key, cq, ckv, width, mlp, dtype, write):
  ks = iter(jax.random.split(key, 20))
  n = lambda *s, sc=0.2: (jax.random.normal(next(ks), s) * sc).astype(dtype)
  p = dict(ln_scale=1 + n(cq), ln_bias=n(cq), wq=n(cq, width, sc=cq ** -0.5), bq=n(width),
           wk=n(ckv, width, sc=ckv ** -0.5), bk=n(width), wv=n(ckv, width, sc=ckv ** -0.5),
           bv=n(width), wo=n(width, cq, sc=width ** -0.5), bo=n(cq))
  if write and mlp:
    p.update(mlp_ln_scale=1 + n(cq), mlp_ln_bias=n(cq), w1=n(cq, mlp, sc=cq ** -0.5),
             b1=n(mlp), w2=n(mlp, cq, sc=mlp ** -0.5), b2=n(cq))
  return (WriteBlockParams if write else ReadBlockParams)(**p)


def _check_block(direction, b, lq, lk, cq, ckv, width, heads, mlp, dtype):
  write = direction == "write"
  p = _block_params(jax.random.key(3), cq, ckv, width, mlp, dtype, write)
  xq = jax.random.normal(jax.random.key(1), (b, lq, cq), jnp.float32).astype(dtype)
  xkv = jax.random.normal(jax.random.key(2), (b, lk, ckv), jnp.float32).astype(dtype)
  op = kernels.write_block if write else kernels.read_block
  ref = reference.write_block if write else reference.read_block
  out = op(xq, xkv, p, num_heads=heads, implementation="triton", interpret=True)
  assert out.dtype == dtype and out.shape == xq.shape
  _close(out, ref(*_f64((xq, xkv, p)), num_heads=heads, precision="highest"),
         oc.triton_tolerance(dtype), "forward")
  # Gradient of a non-linear scalar loss w.r.t. inputs and every parameter.
  cot = jax.random.normal(jax.random.key(4), xq.shape, jnp.float64)
  loss = lambda a, c, pp: jnp.sum(op(a, c, pp, num_heads=heads, implementation="triton",
                                     interpret=True).astype(jnp.float32) * cot.astype(jnp.float32))
  loss_ref = lambda a, c, pp: jnp.sum(ref(a, c, pp, num_heads=heads, precision="highest")
                                      * cot)
  g = jax.grad(loss, argnums=(0, 1, 2))(xq, xkv, p)
  g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(*_f64((xq, xkv, p)))
  _close(g, g_ref, 4 * oc.triton_tolerance(dtype), "gradients", zero={".bk": ".wk"})


# (batch, q-side tokens, kv-side tokens, q-side width, kv-side width, attention width, heads, mlp)
@pytest.mark.parametrize("direction,b,lq,lk,cq,ckv,width,heads,mlp", [
    pytest.param("read", 1, 128, 256, 512, 256, 256, 8, 0, id="cifar10_read",
                 marks=pytest.mark.slow),
    pytest.param("write", 1, 256, 128, 256, 512, 256, 8, 512, id="cifar10_write",
                 marks=pytest.mark.slow),
    pytest.param("read", 1, 128, 256, 768, 512, 512, 16, 0, id="imagenet64_p4_read",
                 marks=pytest.mark.slow),
    pytest.param("write", 1, 256, 128, 512, 768, 512, 16, 2048, id="imagenet64_p4_write",
                 marks=pytest.mark.slow),
    pytest.param("write", 1, 64, 128, 512, 768, 512, 16, 2048, id="imagenet64_p8_write",
                 marks=pytest.mark.slow),
])
def test_blocks_published_fp32(direction, b, lq, lk, cq, ckv, width, heads, mlp):
  _check_block(direction, b, lq, lk, cq, ckv, width, heads, mlp, jnp.float32)


@pytest.mark.parametrize("direction,b,lq,lk,cq,ckv,width,heads,mlp", [
    pytest.param("read", 1, 7, 200, 40, 24, 144, 2, 0, id="read_m7_n200_d72"),
    pytest.param("write", 1, 200, 7, 24, 40, 144, 2, 48, id="write_n200_m7_d72",
                 marks=pytest.mark.slow),
    pytest.param("write", 1, 1, 7, 24, 40, 144, 2, 0, id="write_n1_nomlp_d72"),
    pytest.param("read", 1, 1, 1000, 40, 24, 144, 2, 0, id="read_m1_n1000_d72",
                 marks=pytest.mark.slow),
])
def test_blocks_odd_fp32(direction, b, lq, lk, cq, ckv, width, heads, mlp):
  _check_block(direction, b, lq, lk, cq, ckv, width, heads, mlp, jnp.float32)


def test_write_block_fp16():
  _check_block("write", 1, 40, 16, 32, 48, 64, 2, 64, jnp.float16)


def test_vmap_and_grad_through_attention():
  q, k, v, _ = _attn_case(6, 9, 20, 2, 16, jnp.float32)
  q, k, v = (a.reshape(3, 2, *a.shape[1:]) for a in (q, k, v))
  f = lambda q, k, v: kernels.cross_attention(q, k, v, implementation="triton", interpret=True)
  fr = reference.cross_attention
  _close(jax.vmap(f)(q, k, v), jax.vmap(fr)(*_f64((q, k, v))), 5e-5, "vmap")
  _close(jax.vmap(f, in_axes=(0, None, None))(q, k[0], v[0]),
         jax.vmap(fr, in_axes=(0, None, None))(*_f64((q, k[0], v[0]))), 5e-5, "vmap bcast")
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(jax.vmap(f)(q, k, v)))
  _close(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v),
         jax.grad(loss(fr), argnums=(0, 1, 2))(*_f64((q, k, v))), 2e-4, "grad of vmap")
  per_ex = lambda f: jax.vmap(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))))
  _close(per_ex(f)(q, k, v), per_ex(fr)(*_f64((q, k, v))), 2e-4, "vmap of grad")


def test_vmap_and_grad_through_write_block():
  # Batched inputs with shared weights fold into rows; per-example weight grads use lax.map.
  p = _block_params(jax.random.key(0), 24, 32, 32, 48, jnp.float32, True)
  x = jax.random.normal(jax.random.key(1), (2, 1, 10, 24), jnp.float32)
  z = jax.random.normal(jax.random.key(2), (2, 1, 6, 32), jnp.float32)
  f = lambda x, z, p: kernels.write_block(x, z, p, num_heads=2, implementation="triton",
                                          interpret=True)
  fr = lambda x, z, p: reference.write_block(x, z, p, num_heads=2)
  vm = lambda f: jax.vmap(f, in_axes=(0, 0, None))
  _close(vm(f)(x, z, p), vm(fr)(*_f64((x, z, p))), 5e-5, "vmap")
  per_ex = lambda f: jax.vmap(jax.grad(lambda x, z, p: jnp.sum(jnp.tanh(f(x, z, p))),
                                       argnums=2), in_axes=(0, 0, None))
  _close(per_ex(f)(x, z, p), per_ex(fr)(*_f64((x, z, p))), 2e-4, "per-example weight grads",
         zero={".bk": ".wk"})   # the key-bias gradient is exactly zero


def test_jit_and_no_env_var_needed():
  import triton
  assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] in ("", "0")
  assert not triton.knobs.runtime.interpret  # kernels stay compiled-GPU JITFunctions
  q, k, v, _ = _attn_case(1, 5, 9, 1, 16, jnp.float32)
  f = jax.jit(lambda q, k, v: kernels.cross_attention(q, k, v, implementation="triton",
                                                      interpret=True))
  _close(f(q, k, v), reference.cross_attention(*_f64((q, k, v))), 5e-5, "jit")


def test_nested_jit_helpers_are_interpreted():
  """launch.interpreted swaps the kernel module's own @triton.jit helpers (here the
  backward kernels' shared _attn_bwd_p / _attn_bwd_ds) for interpreted ones that see
  the same interpreted globals; the module's compiled JITFunctions are left untouched."""
  from triton.runtime.interpreter import InterpretedFunction
  from triton.runtime.jit import JITFunction
  from kernels.triton_gpu import attention_kernels as ak
  from kernels.triton_gpu.launch import interpreted
  for kern in (ak._attn_bwd_dkdv_kernel, ak._attn_bwd_dq_kernel):
    globs = interpreted(kern).fn.__globals__
    for name in ("_attn_bwd_p", "_attn_bwd_ds"):
      helper = globs[name]
      assert isinstance(helper, InterpretedFunction), name
      assert helper.fn.__globals__ is globs, name
      assert isinstance(getattr(ak, name), JITFunction), name


def test_interpreted_launch_leaves_triton_language_unpatched():
  """Triton's interpreter leaks wrappers into triton.language after a launch that calls
  stdlib helpers (tl.max / tl.sum in the softmax); they break a later triton.compile.
  launch.py restores the originals on the way out of every interpreted launch."""
  import triton.language as tl
  q, k, v, _ = _attn_case(1, 5, 9, 1, 16, jnp.float32)
  jax.block_until_ready(kernels.cross_attention(q, k, v, implementation="triton",
                                                interpret=True))
  leaked = [f"{getattr(o, '__name__', o)}.{n}"
            for o in (tl, tl.core, tl.math, tl.core.tensor) for n, val in vars(o).items()
            if getattr(val, "__name__", "") == "<lambda>"
            and "member" in (getattr(val, "__kwdefaults__", None) or {})]
  assert not leaked, leaked


def test_bad_arguments_raise_clear_errors():
  q, k, v, _ = _attn_case(1, 5, 9, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match="block_q"):
    kernels.cross_attention(q, k, v, implementation="triton", interpret=True,
                            block_sizes={"block_q": 24})
  with pytest.raises(ValueError, match="unknown fields"):
    kernels.cross_attention(q, k, v, implementation="triton", interpret=True,
                            block_sizes={"blockq": 16})
  with pytest.raises(ValueError, match="shared memory"):
    kernels.cross_attention(q, k, v, implementation="triton", interpret=True,
                            block_sizes={"block_kv": 1024, "num_stages": 4})
  with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
    kernels.cross_attention(*(a.astype(jnp.float64) for a in (q, k, v)),
                            implementation="triton", interpret=True)
  big = jnp.zeros((1, 4, 1, 300), jnp.float32)
  with pytest.raises(ValueError, match="head_dim"):
    kernels.cross_attention(big, big, big, implementation="triton", interpret=True)


def test_whole_model_triton_interpret_matches_xla():
  """rin.RIN on the tiny digits config: forward and a parameter gradient with
  implementation="triton", interpret=True match implementation="xla"."""
  import rin
  from rin.configs import digits
  cfg = digits.get_config()
  b = 2
  m = cfg.model
  x = jax.random.normal(jax.random.key(0), (b, m["image_size"], m["image_size"], m["channels"]),
                        jnp.float32)
  gamma = jnp.linspace(0.1, 0.9, b, dtype=jnp.float32)
  labels = jnp.arange(b, dtype=jnp.int32) % m["num_classes"]
  ref_model = rin.RIN(**m, implementation="xla")
  tri_model = rin.RIN(**m, implementation="triton", interpret=True)
  params = ref_model.init(jax.random.key(1), x, gamma, labels)
  prev = jax.random.normal(jax.random.key(2), (b, m["num_latents"], m["latent_dim"]),
                           jnp.float32)

  def loss(model):
    def f(params):
      out, z = model.apply(params, x, gamma, labels, prev)
      return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(z))
    return f

  (o_ref, z_ref) = ref_model.apply(params, x, gamma, labels, prev)
  (o_tri, z_tri) = tri_model.apply(params, x, gamma, labels, prev)
  _close(o_tri, o_ref, 1e-4, "model output")
  _close(z_tri, z_ref, 1e-4, "model latents")
  l_ref, g_ref = jax.value_and_grad(loss(ref_model))(params)
  l_tri, g_tri = jax.value_and_grad(loss(tri_model))(params)
  assert abs(float(l_tri) - float(l_ref)) <= 1e-4 * max(1.0, abs(float(l_ref)))
  # Key-bias gradients are exactly zero in exact arithmetic (softmax ignores a per-query
  # constant): held to the matching key kernel's scale.
  _close(g_tri, g_ref, 1e-3, "parameter gradients",
         zero={"['k']['bias']": "['k']['kernel']", "['bk']": "['wk']"})


@pytest.mark.parametrize("dh", [72, 128, 256])
def test_default_tiles_fit_shared_memory_at_float32(dh):
  """float32 at head_dim > 64 does not fit 64-row tiles (the slow q200_k1000_d72 case raised
  before the defaults shrank); the planned defaults fit every arch's per-block limit."""
  from kernels.triton_gpu import config
  plan = config.attention_plan(1, 200, 1000, 1, dh, "float32")
  item, d = 4, plan.d_pad
  fwd = plan.num_stages * 2 * plan.block_kv * d * item + plan.block_q * d * item
  bwd = plan.num_stages * 2 * plan.block_q_bwd * d * item + 2 * plan.block_kv_bwd * d * item
  assert max(fwd, bwd) <= min(config.SMEM_LIMIT_BYTES.values())
  assert plan.block_q >= 16 and plan.block_kv >= 16
