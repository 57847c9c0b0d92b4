"""Shared cases for the kernel backends' tests: shapes, tolerances, random inputs,
the float64 oracle and the comparison every backend test uses.

Imported by tests/kernels/test_pallas_tpu.py (and meant for the Triton tests too).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels import reference
from kernels.params import ReadBlockParams, WriteBlockParams

# Max-abs error allowed, relative to the largest magnitude of the reference value
# (see assert_close). fp32 kernels land around 1e-6 here; bf16 (bf16 MXU operands,
# fp32 accumulation, bf16 outputs) around 5e-3.
TOLERANCES = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 3e-2}


def tolerance(dtype) -> float:
  return TOLERANCES[jnp.dtype(dtype)]


# The Triton kernels through Triton's interpreter (fp32 and fp16 only: its bf16 dot is
# broken), same rule; gradients are checked at 4x.
TRITON_TOLERANCES = {jnp.dtype(jnp.float32): 5e-5, jnp.dtype(jnp.float16): 2e-2}


def triton_tolerance(dtype) -> float:
  return TRITON_TOLERANCES[jnp.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class BlockShape:
  """One read/write block configuration: latents [B, M, D], interface [B, N, T]."""
  name: str
  batch: int
  m: int          # latents
  d: int          # latent width
  n: int          # interface tokens
  t: int          # interface width
  heads: int      # read/write heads
  width: int      # read/write attention width (min(T, D) in RIN)
  mlp_ratio: int  # interface MLP ratio (0: no MLP)
  latent_heads: int
  latent_head_dim: int


# The published configs (DESIGN.md section 2), batch 1 for CPU tests.
CIFAR10 = BlockShape("cifar10", 1, 128, 512, 256, 256, 8, 256, 2, 16, 32)
IMAGENET64_P4 = BlockShape("imagenet64_p4", 1, 128, 768, 256, 512, 16, 512, 4, 16, 48)
IMAGENET64_P8 = BlockShape("imagenet64_p8", 1, 128, 768, 64, 512, 16, 512, 4, 16, 48)
PUBLISHED = (CIFAR10, IMAGENET64_P4, IMAGENET64_P8)

# Odd attention shapes: (batch, q_len, kv_len, heads, head_dim).
ODD_ATTENTION = (
    (1, 1, 1, 1, 8),
    (1, 7, 200, 2, 72),      # read-like, odd lengths, head dim 72
    (1, 200, 7, 2, 32),      # write-like
    (1, 128, 1000, 1, 32),   # keys streamed in several blocks, last one partial
    (2, 33, 300, 2, 160),    # head dim > 128: padded to 256
)
# Odd block shapes: (batch, m, d, n, t, heads, width, mlp_ratio).
ODD_BLOCKS = (
    (1, 7, 48, 200, 32, 2, 32, 2),
    (1, 1, 16, 1, 24, 1, 8, 0),
    (2, 9, 32, 20, 40, 2, 144, 1),  # head dim 72
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


def block_inputs(seed, direction, batch, m, d, n, t, width, mlp_ratio, dtype):
  """(queries' source, kv source, params), cotangent for the output."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  z = _normal(ks[0], (batch, m, d), 1.0, dtype)
  x = _normal(ks[1], (batch, n, t), 1.0, dtype)
  if direction == "read":
    return (z, x, read_params(ks[2], d, t, width, dtype)), _normal(ks[3], z.shape, 1.0, jnp.float32)
  p = write_params(ks[2], t, d, width, mlp_ratio * t, dtype)
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
        "write": lambda x, z, p: reference.write_block(x, z, p, **kw)}[op]
  return value_and_grads(fn, to64(args), to64(ct))


def assert_close(got, want, dtype=None, what="", *, tol=None):
  """Every leaf finite, and max|got - want| <= tol * scale, scale being the
  leaf's largest reference magnitude, floored at 10% of the largest over all leaves
  (some gradients, e.g. of the key bias, are exactly zero in exact arithmetic).
  tol: given explicitly, or tolerance(dtype)."""
  got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_l) == len(want_l), (len(got_l), len(want_l))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
  gmax = max(float(np.max(np.abs(np.asarray(w, np.float64)))) for w in want_l)
  if tol is None:
    tol = tolerance(dtype)
  for path, g, w in zip(paths, got_l, want_l):
    g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    w = np.asarray(w, np.float64)
    assert g.shape == w.shape, f"{what}{path}: shape {g.shape} != {w.shape}"
    assert np.all(np.isfinite(g)), f"{what}{path}: non-finite values"
    scale = max(float(np.max(np.abs(w))), 0.1 * gmax, 1e-30)
    err = float(np.max(np.abs(g - w)))
    assert err <= tol * scale, (
        f"{what}{path}: max abs err {err:.3g} > {tol:g} * {scale:.3g} (dtype {dtype if dtype is None else jnp.dtype(dtype)})")


def assert_close_per_value(got, want, *, tol, what="", zero_scaled_by=None):
  """Every leaf finite and, element by element, |got - want| <= tol * (|want| + rms(want)),
  rms over that leaf alone: no floor of 1 and none shared between leaves, so a leaf that
  is wrong by a few percent fails even when another leaf is much larger.

  zero_scaled_by: {path suffix: other path suffix} for leaves that are exactly zero in
  exact arithmetic (the key-bias gradient of attention: softmax ignores a per-query
  constant); they are held to tol * rms of the named leaf instead of their own rounding
  noise."""
  got_l = jax.tree.leaves(got)
  want_pl = jax.tree_util.tree_leaves_with_path(want)
  assert len(got_l) == len(want_pl), (len(got_l), len(want_pl))
  paths = [jax.tree_util.keystr(p) for p, _ in want_pl]
  want_l = [np.asarray(w, np.float64) for _, w in want_pl]
  rms = {p: float(np.sqrt(np.mean(np.square(w)))) if w.size else 0.0
         for p, w in zip(paths, want_l)}
  zero_scaled_by = zero_scaled_by or {}
  for path, g, w in zip(paths, got_l, want_l):
    g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    assert g.shape == w.shape, f"{what}{path}: shape {g.shape} != {w.shape}"
    assert np.all(np.isfinite(g)), f"{what}{path}: non-finite values"
    suffix = next((s for s in zero_scaled_by if path.endswith(s)), None)
    if suffix is not None:
      scale = rms[path[:-len(suffix)] + zero_scaled_by[suffix]]
      err = float(np.max(np.abs(g - w))) if g.size else 0.0
      assert err <= tol * scale, f"{what}{path}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"
      continue
    bound = tol * (np.abs(w) + rms[path])
    bad = np.abs(g - w) > bound
    if np.any(bad):
      i = np.unravel_index(np.argmax(np.abs(g - w) / np.maximum(bound, 1e-300)), g.shape)
      raise AssertionError(
          f"{what}{path}: {int(bad.sum())} of {g.size} values off, worst at {i}: got "
          f"{g[i]:.6g}, want {w[i]:.6g} (bound {bound[i]:.3g} = {tol:g} * (|want| + rms "
          f"{rms[path]:.3g}))")
