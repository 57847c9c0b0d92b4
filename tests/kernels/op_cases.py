"""The op test base every backend's tests build on: shapes (kernels/shapes.py), random
inputs, the float64 oracle, one comparison rule and its tolerance table.

    out, grads = value_and_grads(fn, args, ct)        # the backend under test
    check_op(fn, o, dtype, backend="triton")          # forward and every gradient of an
                                                      # OpShape against the oracle

tests/kernels/test_api.py (xla), test_pallas_tpu.py and test_triton_*.py use these and add
only their backend's own checks (block-size rules, what launches, lowering).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import reference, shapes
from kernels.params import (LatentAttentionParams, LatentMLPParams, ReadBlockParams,
                            WriteBlockParams)

# The comparison rule (assert_close): per value, |got - want| <= tol * (|want| + rms of
# that leaf), and per leaf rms(got - want) <= tol * rms(want): a leaf off by tol or more
# everywhere (a 10% error at any tol below 0.1) fails, whatever the other leaves' size.
# tol per backend and dtype; gradients at GRAD_FACTOR times the forward's.
#   xla: the jax.numpy reference vs a hand-written NumPy float64 oracle.
#   pallas_tpu: Pallas' interpreter (fp32 dots exact on CPU; bf16 operands, fp32
#     accumulation, bf16 outputs).
#   triton: Triton's CPU interpreter (its bf16 tl.dot is made exact by
#     kernels/triton_gpu/launch.py's _exact_bf16_dot). bf16 as fp16: measured needs, forward
#     0.006-0.009 (write block over M=70/130 latents, attention q7_k200_d72), gradients up
#     to 0.061 (the read block's dX at a key row whose terms cancel; XLA's own bf16 needs
#     0.034 at that row), under 2e-2 and 4 x 2e-2.
TOLERANCES = {
    "xla": {jnp.dtype(jnp.float32): 1e-5},
    "pallas_tpu": {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 3e-2},
    "triton": {jnp.dtype(jnp.float32): 5e-5, jnp.dtype(jnp.float16): 2e-2,
               jnp.dtype(jnp.bfloat16): 2e-2},
}
GRAD_FACTOR = {"xla": 1, "pallas_tpu": 1, "triton": 4}
# bf16: XLA's own bf16 error as a second per-value bound. A bf16 gradient where terms
# cancel (the read block's dX at some key rows) is off from float64 by more than any
# tolerance relative to its size, for XLA's bf16 as for a kernel's. So in bf16 a value also
# passes when its error is within XLA_BF16_FACTOR x the largest error of XLA's bf16 result
# (the jax.numpy reference at the same inputs) in the same row (last axis) against the same
# float64 oracle. No floor: where XLA's bf16 is close to float64, so must the kernel be;
# the per-leaf rms rule is unchanged.
XLA_BF16_FACTOR = 2.0


def tolerance(backend: str, dtype, *, grad: bool = False) -> float:
  return TOLERANCES[backend][jnp.dtype(dtype)] * (GRAD_FACTOR[backend] if grad else 1)


# The published configs (kernels/shapes.py) at batch 1, the CPU tests' batch.
PUBLISHED = shapes.PUBLISHED
CIFAR10, IMAGENET64_P4, IMAGENET64_P8 = PUBLISHED


def block_shape(s: shapes.ModelShapes) -> tuple:
  """(batch, m, d, n, t, heads, width, mlp_hidden) of a published row at batch 1."""
  return (1, s.m, s.d, s.n, s.t, s.rw_heads, s.rw_width, s.mlp_hidden)


# Odd attention shapes: (batch, q_len, kv_len, heads, head_dim).
ODD_ATTENTION = (
    (1, 1, 1, 1, 8),
    (1, 7, 200, 2, 72),      # read-like, odd lengths, head dim 72
    (1, 200, 7, 2, 32),      # write-like
    (1, 128, 1000, 1, 32),   # keys streamed in several blocks, last one partial
    (2, 33, 300, 2, 160),    # head dim > 128: padded to 256
)
# Odd block shapes: (batch, m, d, n, t, heads, width, mlp_hidden).
ODD_BLOCKS = (
    (1, 7, 48, 200, 32, 2, 32, 64),
    (1, 1, 16, 1, 24, 1, 8, 0),
    (2, 9, 32, 20, 40, 2, 144, 40),  # head dim 72
)


def _normal(key, shape, scale, dtype):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def attention_inputs(seed, batch, q_len, kv_len, heads, head_dim, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = _normal(ks[0], (batch, q_len, heads, head_dim), 1.0, dtype)
  k = _normal(ks[1], (batch, kv_len, heads, head_dim), 1.0, dtype)
  v = _normal(ks[2], (batch, kv_len, heads, head_dim), 1.0, dtype)
  ct = _normal(ks[3], (batch, q_len, heads, head_dim), 1.0, jnp.float32)
  return (q, k, v), ct


def read_params(key, d, t, width, dtype) -> ReadBlockParams:
  ks = iter(jax.random.split(key, 16))
  n = lambda s, sc: _normal(next(ks), s, sc, dtype)
  return ReadBlockParams(
      ln_scale=1 + n((d,), 0.1), ln_bias=n((d,), 0.1),
      wq=n((d, width), d ** -0.5), bq=n((width,), 0.1),
      wk=n((t, width), t ** -0.5), bk=n((width,), 0.1),
      wv=n((t, width), t ** -0.5), bv=n((width,), 0.1),
      wo=n((width, d), width ** -0.5), bo=n((d,), 0.1))


def write_params(key, t, d, width, hidden, dtype) -> WriteBlockParams:
  ks = iter(jax.random.split(key, 20))
  n = lambda s, sc: _normal(next(ks), s, sc, dtype)
  mlp = {}
  if hidden:
    mlp = dict(mlp_ln_scale=1 + n((t,), 0.1), mlp_ln_bias=n((t,), 0.1),
               w1=n((t, hidden), t ** -0.5), b1=n((hidden,), 0.1),
               w2=n((hidden, t), hidden ** -0.5), b2=n((t,), 0.1))
  return WriteBlockParams(
      ln_scale=1 + n((t,), 0.1), ln_bias=n((t,), 0.1),
      wq=n((t, width), t ** -0.5), bq=n((width,), 0.1),
      wk=n((d, width), d ** -0.5), bk=n((width,), 0.1),
      wv=n((d, width), d ** -0.5), bv=n((width,), 0.1),
      wo=n((width, t), width ** -0.5), bo=n((t,), 0.1), **mlp)


def latent_params(key, d, width, dtype) -> LatentAttentionParams:
  ks = iter(jax.random.split(key, 12))
  n = lambda s, sc: _normal(next(ks), s, sc, dtype)
  return LatentAttentionParams(
      ln_scale=1 + n((d,), 0.1), ln_bias=n((d,), 0.1),
      wq=n((d, width), d ** -0.5), bq=n((width,), 0.1),
      wk=n((d, width), d ** -0.5), bk=n((width,), 0.1),
      wv=n((d, width), d ** -0.5), bv=n((width,), 0.1),
      wo=n((width, d), width ** -0.5), bo=n((d,), 0.1))


def latent_inputs(seed, batch, m, d, width, dtype):
  """(z, params), cotangent for the output of a latent self-attention block."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  z = _normal(ks[0], (batch, m, d), 1.0, dtype)
  return (z, latent_params(ks[1], d, width, dtype)), _normal(ks[2], z.shape, 1.0, jnp.float32)


def mlp_params(key, d, hidden, dtype) -> LatentMLPParams:
  ks = iter(jax.random.split(key, 6))
  n = lambda s, sc: _normal(next(ks), s, sc, dtype)
  return LatentMLPParams(ln_scale=1 + n((d,), 0.1), ln_bias=n((d,), 0.1),
                         w1=n((d, hidden), d ** -0.5), b1=n((hidden,), 0.1),
                         w2=n((hidden, d), hidden ** -0.5), b2=n((d,), 0.1))


def mlp_inputs(seed, batch, m, d, hidden, dtype):
  """(z, params), cotangent for the output of a latent MLP block."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  z = _normal(ks[0], (batch, m, d), 1.0, dtype)
  return (z, mlp_params(ks[1], d, hidden, dtype)), _normal(ks[2], z.shape, 1.0, jnp.float32)


# The latent MLP's train-mode extras, as the model passes them: drop-path scales (one
# example dropped, the rest at 1/keep) and a dropout seed.
def mlp_train_kw(batch, rate=0.1):
  scale = jnp.where(jnp.arange(batch) == batch - 1, 0.0, 1.0 / 0.9).astype(jnp.float32)
  return dict(residual=True, branch_scale=scale, dropout_rate=rate,
              dropout_seed=jnp.array([0x1234567, 0x89ABCDE], jnp.uint32))


def block_inputs(seed, direction, batch, m, d, n, t, width, hidden, dtype):
  """(queries' source, kv source, params), cotangent for the output (hidden: the write
  block's MLP width, 0: none)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  z = _normal(ks[0], (batch, m, d), 1.0, dtype)
  x = _normal(ks[1], (batch, n, t), 1.0, dtype)
  if direction == "read":
    return (z, x, read_params(ks[2], d, t, width, dtype)), _normal(ks[3], z.shape, 1.0, jnp.float32)
  p = write_params(ks[2], t, d, width, hidden, dtype)
  return (x, z, p), _normal(ks[3], x.shape, 1.0, jnp.float32)


def to64(tree):
  return jax.tree.map(lambda a: None if a is None else jnp.asarray(a, jnp.float64), tree)


def value_and_grads(fn, args, ct):
  """(fn(*args), d<fn(*args), ct>/d args), both from one jitted forward + VJP (one
  compilation: interpreted kernels are slow to trace and compile)."""
  def loss(args, ct):
    out = fn(*args)
    cdt = jnp.promote_types(out.dtype, jnp.float32)
    return jnp.sum(out.astype(cdt) * ct.astype(cdt)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tuple(args), ct)
  return out, grads


def oracle(op, args, ct, **kw):
  """Float64 reference value and gradients at precision="highest" (needs jax_enable_x64)."""
  assert jax.config.jax_enable_x64, "the float64 oracle needs jax_enable_x64"
  kw = dict(kw, precision="highest")
  fn = {"attention": lambda q, k, v: reference.cross_attention(q, k, v, precision="highest"),
        "read": lambda z, x, p: reference.read_block(z, x, p, **kw),
        "write": lambda x, z, p: reference.write_block(x, z, p, **kw),
        "latent": lambda z, p: reference.latent_attention_block(z, p, **kw),
        "mlp": lambda z, p: reference.latent_mlp_block(z, p, **kw)}[op]
  return value_and_grads(fn, to64(args), to64(ct))


def xla_bf16_row_errors(xla, want):
  """Per leaf: max |xla - want| over the last axis (keepdims), None for a scalar leaf."""
  out = []
  for x, w in zip(jax.tree.leaves(xla), jax.tree.leaves(want)):
    e = np.abs(np.asarray(jnp.asarray(x, jnp.float32), np.float64) - np.asarray(w, np.float64))
    out.append(np.max(e, axis=-1, keepdims=True) if e.ndim else None)
  return out


def xla_bf16(op, args, ct, dtype, **kw):
  """(value, gradients) of XLA's own bf16 op (the jax.numpy reference, default precision)
  at the same inputs, the baseline of assert_close's bf16 bound; (None, None) otherwise."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return None, None
  fn = {"attention": reference.cross_attention,
        "read": lambda z, x, p: reference.read_block(z, x, p, **kw),
        "write": lambda x, z, p: reference.write_block(x, z, p, **kw),
        "latent": lambda z, p: reference.latent_attention_block(z, p, **kw),
        "mlp": lambda z, p: reference.latent_mlp_block(z, p, **kw)}[op]
  return value_and_grads(fn, args, ct)


def assert_close(got, want, *, tol, what="", zero_scaled_by=None, xla=None):
  """The comparison rule (see TOLERANCES): every leaf finite and, element by element,
  |got - want| <= tol * (|want| + rms(want)), and rms(got - want) <= tol * rms(want), rms
  over that leaf alone: no floor of 1 and none shared between leaves, so a leaf that is
  wrong by a few percent fails even when another leaf is much larger.

  Leaves that are exactly zero in exact arithmetic (the key-bias gradient: softmax ignores
  a per-query constant; with one key, everything on the query side) have no scale of their
  own: zero_scaled_by {path suffix: other path suffix} names the leaf whose rms scales
  them; one not named, whose oracle is zero to float64 rounding, is held to the rms of
  the whole tree.

  xla (bf16 only): XLA's bf16 result at the same inputs; a value whose error is within
  XLA_BF16_FACTOR x that result's largest error in its row (xla_bf16_row_errors) also
  passes the per-value rule."""
  got_l = jax.tree.leaves(got)
  xla_rows = xla_bf16_row_errors(xla, want) if xla is not None else [None] * len(got_l)
  assert len(xla_rows) == len(got_l), (len(xla_rows), len(got_l))
  want_pl = jax.tree_util.tree_leaves_with_path(want)
  assert len(got_l) == len(want_pl), (len(got_l), len(want_pl))
  paths = [jax.tree_util.keystr(p) for p, _ in want_pl]
  want_l = [np.asarray(w, np.float64) for _, w in want_pl]
  rms = {p: float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
         for p, w in zip(paths, want_l)}
  n_all = sum(w.size for w in want_l)
  tree_rms = float(np.sqrt(sum(np.sum(np.square(w)) for w in want_l) / max(1, n_all)))
  zero_scaled_by = zero_scaled_by or {}
  for path, g, w, xr in zip(paths, got_l, want_l, xla_rows):
    g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    assert g.shape == w.shape, f"{what}{path}: shape {g.shape} != {w.shape}"
    assert np.all(np.isfinite(g)), f"{what}{path}: non-finite values"
    if not g.size:
      continue
    suffix = next((s for s in zero_scaled_by if path.endswith(s)), None)
    if suffix is not None or rms[path] <= 1e-12 * tree_rms:
      named = rms[path[:-len(suffix)] + zero_scaled_by[suffix]] if suffix is not None else 0.0
      # The named leaf can be structurally zero too (one key: the whole query side): then
      # the tree's rms is the scale.
      scale = named if named > 1e-12 * tree_rms else tree_rms
      err = float(np.max(np.abs(g - w)))
      assert err <= tol * scale, f"{what}{path}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"
      continue
    rms_err = float(np.sqrt(np.mean(np.square(g - w))))
    assert rms_err <= tol * rms[path], (
        f"{what}{path}: rms err {rms_err:.3g} > {tol:g} * rms {rms[path]:.3g}")
    bound = tol * (np.abs(w) + rms[path])
    xla_bound = None
    if xr is not None:
      xla_bound = np.broadcast_to(XLA_BF16_FACTOR * xr, w.shape)
      bound = np.maximum(bound, xla_bound)
    bad = np.abs(g - w) > bound
    if np.any(bad):
      i = np.unravel_index(np.argmax(np.abs(g - w) / np.maximum(bound, 1e-300)), g.shape)
      also = (f"; XLA's bf16 bound there {xla_bound[i]:.3g} = {XLA_BF16_FACTOR:g} x its row's "
              "max error" if xla_bound is not None else "")
      raise AssertionError(
          f"{what}{path}: {int(bad.sum())} of {g.size} values off, worst at {i}: got "
          f"{g[i]:.6g}, want {w[i]:.6g} (bound {bound[i]:.3g}: {tol:g} * (|want| + rms "
          f"{rms[path]:.3g}){also})")


# ----------------------------------------------------------------------------
# Checking one op of a backend: forward and every gradient against the oracle.
# ----------------------------------------------------------------------------

def check_attention(fn, shape, dtype, *, backend, seed=0, what=""):
  """fn(q, k, v) at shape (batch, q_len, kv_len, heads, head_dim) against the oracle."""
  args, ct = attention_inputs(seed, *shape, dtype)
  out, grads = value_and_grads(fn, args, ct)
  want_out, want_grads = oracle("attention", args, ct)
  xo, xg = xla_bf16("attention", args, ct, dtype)
  assert out.dtype == jnp.dtype(dtype), out.dtype
  what = f"{what}attention{tuple(shape)} {jnp.dtype(dtype).name}: "
  assert_close(out, want_out, tol=tolerance(backend, dtype), what=what + "forward", xla=xo)
  assert_close(grads, want_grads, tol=tolerance(backend, dtype, grad=True),
               what=what + "grad", xla=xg)


def check_block(fn, direction, shape, dtype, *, backend, seed=0, what=""):
  """fn(q_src, kv_src, params) of a read/write block at shape (batch, m, d, n, t, heads,
  width, mlp_hidden) against the oracle (fn closes over num_heads)."""
  batch, m, d, n, t, heads, width, hidden = shape
  args, ct = block_inputs(seed, direction, batch, m, d, n, t, width, hidden, dtype)
  out, grads = value_and_grads(fn, args, ct)
  want_out, want_grads = oracle(direction, args, ct, num_heads=heads)
  xo, xg = xla_bf16(direction, args, ct, dtype, num_heads=heads)
  assert out.dtype == jnp.dtype(dtype) and out.shape == args[0].shape, (out.dtype, out.shape)
  what = f"{what}{direction}_block{tuple(shape)} {jnp.dtype(dtype).name}: "
  assert_close(out, want_out, tol=tolerance(backend, dtype), what=what + "forward", xla=xo)
  assert_close(grads, want_grads, tol=tolerance(backend, dtype, grad=True),
               what=what + "grad", zero_scaled_by={".bk": ".wk"}, xla=xg)


def check_latent(fn, shape, dtype, *, backend, seed=0, residual=False, what=""):
  """fn(z, params) of a latent self-attention block at shape (batch, m, d, heads, width)
  against the oracle (fn closes over num_heads and residual)."""
  batch, m, d, heads, width = shape
  args, ct = latent_inputs(seed, batch, m, d, width, dtype)
  out, grads = value_and_grads(fn, args, ct)
  kw = dict(num_heads=heads, residual=residual)
  want_out, want_grads = oracle("latent", args, ct, **kw)
  xo, xg = xla_bf16("latent", args, ct, dtype, **kw)
  assert out.dtype == jnp.dtype(dtype) and out.shape == args[0].shape, (out.dtype, out.shape)
  what = f"{what}latent_attention_block{tuple(shape)} {jnp.dtype(dtype).name}: "
  assert_close(out, want_out, tol=tolerance(backend, dtype), what=what + "forward", xla=xo)
  assert_close(grads, want_grads, tol=tolerance(backend, dtype, grad=True),
               what=what + "grad", zero_scaled_by={".bk": ".wk"}, xla=xg)


def check_mlp(fn, shape, dtype, *, backend, seed=0, what="", **kw):
  """fn(z, params) of a latent MLP block at shape (batch, m, d, hidden) against the oracle
  (fn closes over kw: residual, branch_scale, dropout_rate, dropout_seed, passed here too so
  the oracle computes the same function)."""
  batch, m, d, hidden = shape
  args, ct = mlp_inputs(seed, batch, m, d, hidden, dtype)
  out, grads = value_and_grads(fn, args, ct)
  want_out, want_grads = oracle("mlp", args, ct, **kw)
  xo, xg = xla_bf16("mlp", args, ct, dtype, **kw)
  assert out.dtype == jnp.dtype(dtype) and out.shape == args[0].shape, (out.dtype, out.shape)
  what = f"{what}latent_mlp_block{tuple(shape)} {jnp.dtype(dtype).name}: "
  assert_close(out, want_out, tol=tolerance(backend, dtype), what=what + "forward", xla=xo)
  assert_close(grads, want_grads, tol=tolerance(backend, dtype, grad=True),
               what=what + "grad", xla=xg)


def check_op(impl_fn, o: shapes.OpShape, dtype, *, backend, batch=1, seed=0):
  """An OpShape of the table through impl_fn(kind, heads) -> the op's function."""
  if o.kind == "attention":
    check_attention(impl_fn("attention", o.heads), (batch, o.lq, o.lk, o.heads, o.head_dim),
                    dtype, backend=backend, seed=seed, what=f"{o.name} ")
    return
  m, n = (o.lq, o.lk) if o.kind == "read" else (o.lk, o.lq)
  d, t = (o.cq, o.ckv) if o.kind == "read" else (o.ckv, o.cq)
  check_block(impl_fn(o.kind, o.heads), o.kind, (batch, m, d, n, t, o.heads, o.width, o.mlp),
              dtype, backend=backend, seed=seed, what=f"{o.name} ")
