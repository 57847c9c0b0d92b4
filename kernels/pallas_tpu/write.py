"""Fused RIN write block for TPU (Pallas / Mosaic), forward and backward.

    y   = x + OutProj(MHA(q=QProj(LN(x)), kv=KVProj(z)))
    out = y + MLP(LN(y))                  (MLP: Dense -> exact GELU -> Dense)

x is the interface [B, N, T] (many tokens), z the latents [B, M, D] (few). The
block is token-wise apart from the shared latent K/V, so the forward is ONE kernel
per interface tile: each tile of x is read once and the result written once,
with the K/V of every head (M x head_dim) and all the weights resident in VMEM.

The K/V projection of the latents (M tokens; tiny next to the N-token interface
work) is plain XLA before the kernel, and its backward is XLA's autodiff.

Backward (recomputing inside the kernels rather than saving activations):
  kernel A (MLP part, skipped without an MLP): from the saved y and dout, recompute
    LN/MLP and produce dy plus the MLP/LN weight gradients;
  kernel B (attention part): from x and dy, recompute LN, q, softmax and produce
    dx, dK, dV (per batch) and the LN / q / out-projection weight gradients.
Weight gradients accumulate in VMEM-resident output blocks across the whole grid,
so those grids are "arbitrary" (sequential) on every axis.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.pallas_tpu import common as c

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class WriteBlockSizes:
  """Tiling of write_block. block_n: interface rows per grid step (multiple of 8);
  None: the largest of 512, 256, ... that fits the VMEM budget."""
  block_n: int | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  num_heads: int
  scale: float
  has_mlp: bool
  block_n: int
  n: int
  interpret: object


def _full(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def vmem_estimate(block_n, t, m, h, dh, f, dtype, has_mlp) -> int:
  """Largest VMEM need of the three kernels (inputs/outputs double-buffered)."""
  v = c.vmem_bytes
  n = block_n
  tile = v((n, t), dtype)
  tile32 = v((n, t), f32)
  kv = 2 * v((h, m, dh), dtype)
  attn_w = 2 * v((h, dh, t), dtype) + v((h, 1, dh), f32) + 3 * v((1, t), f32)
  mlp_w = v((t, f), dtype) + v((f, t), dtype) + v((1, f), f32) + 3 * v((1, t), f32)
  temps_attn = 6 * tile32 + 4 * v((n, m), f32) + 3 * v((n, dh), f32)
  temps_mlp = 4 * v((n, f), f32) + 3 * tile32
  fwd = 2 * (3 * tile + kv + attn_w + (mlp_w if has_mlp else 0)) + temps_attn + (
      temps_mlp if has_mlp else 0)
  bwd_a = 0
  if has_mlp:
    grads = v((t, f), f32) + v((f, t), f32) + v((1, f), f32) + 3 * v((1, t), f32)
    bwd_a = 2 * (2 * tile + tile32 + mlp_w + grads) + temps_mlp + 2 * tile32
  grads_b = 2 * v((h, m, dh), f32) + 2 * v((h, dh, t), f32) + v((h, 1, dh), f32) + 3 * v(
      (1, t), f32)
  bwd_b = 2 * (2 * tile + tile32 + kv + attn_w + grads_b) + temps_attn + 2 * tile32
  return max(fwd, bwd_a, bwd_b)


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------

def _softmax(s):
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _attention_residual(x, k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref, wo_ref, bo_ref, *,
                        num_heads, scale, cd):
  """y = x + OutProj(MHA(QProj(LN(x)), K, V)) for one tile x [n, T] (fp32)."""
  h, _, _ = c.layer_norm_fwd(x, g_ref[...], b_ref[...])

  def head(i, acc):
    q = c.mm_nt(h, wq_ref[i], cd) + bq_ref[i]               # [n, dh]
    p = _softmax(c.mm_nt(q, k_ref[0, i], cd) * scale)        # [n, M]
    o = c.mm(p, v_ref[0, i], cd)                             # [n, dh]
    return acc + c.mm(o, wo_ref[i], cd)                      # [n, T]

  a = jax.lax.fori_loop(0, num_heads, head, jnp.zeros(x.shape, f32))
  return x + a + bo_ref[...]


def _mlp_residual(y, g_ref, b_ref, w1_ref, b1_ref, w2_ref, b2_ref, *, cd):
  h2, _, _ = c.layer_norm_fwd(y, g_ref[...], b_ref[...])
  u = c.mm(h2, w1_ref[...], cd) + b1_ref[...]
  return y + c.mm(c.gelu(u), w2_ref[...], cd) + b2_ref[...]


def _fwd_kernel(x_ref, k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref, wo_ref, bo_ref, *rest,
                num_heads, scale, has_mlp, save_y):
  mlp_refs, outs = (rest[:6], rest[6:]) if has_mlp else ((), rest)
  cd = x_ref.dtype
  y = _attention_residual(x_ref[0].astype(f32), k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref,
                          wo_ref, bo_ref, num_heads=num_heads, scale=scale, cd=cd)
  out = _mlp_residual(y, *mlp_refs, cd=cd) if has_mlp else y
  outs[0][0] = out.astype(outs[0].dtype)
  if save_y:
    outs[1][0] = y.astype(outs[1].dtype)


def _first_step():
  return (pl.program_id(0) == 0) & (pl.program_id(1) == 0)


def _zero(*refs):
  for r in refs:
    r[...] = jnp.zeros(r.shape, r.dtype)


def _mlp_bwd_kernel(y_ref, dout_ref, g_ref, b_ref, w1_ref, b1_ref, w2_ref,
                    dy_ref, dg_ref, db_ref, dw1_ref, db1_ref, dw2_ref, db2_ref):
  cd = y_ref.dtype

  @pl.when(_first_step())
  def _init():
    _zero(dg_ref, db_ref, dw1_ref, db1_ref, dw2_ref, db2_ref)

  y = y_ref[0].astype(f32)
  dout = dout_ref[0].astype(f32)
  h2, yhat, rstd = c.layer_norm_fwd(y, g_ref[...], b_ref[...])
  u = c.mm(h2, w1_ref[...], cd) + b1_ref[...]
  dw2_ref[...] += c.mm_tn(c.gelu(u), dout, cd)
  db2_ref[...] += jnp.sum(dout, axis=0, keepdims=True)
  du = c.mm_nt(dout, w2_ref[...], cd) * c.gelu_grad(u)      # [n, F]
  dw1_ref[...] += c.mm_tn(h2, du, cd)
  db1_ref[...] += jnp.sum(du, axis=0, keepdims=True)
  dh2 = c.mm_nt(du, w1_ref[...], cd)                          # [n, T]
  dy_ln, dg, db = c.layer_norm_bwd(dh2, yhat, rstd, g_ref[...])
  dg_ref[...] += dg
  db_ref[...] += db
  dy_ref[0] = dout + dy_ln


def _attn_bwd_kernel(x_ref, dy_ref, k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref, wo_ref,
                     dx_ref, dk_ref, dv_ref, dg_ref, db_ref, dwq_ref, dbq_ref, dwo_ref, dbo_ref,
                     *, num_heads, scale):
  cd = x_ref.dtype

  @pl.when(_first_step())
  def _init():
    _zero(dg_ref, db_ref, dwq_ref, dbq_ref, dwo_ref, dbo_ref)

  @pl.when(pl.program_id(1) == 0)        # dK/dV are per batch element
  def _init_kv():
    _zero(dk_ref, dv_ref)

  x = x_ref[0].astype(f32)
  dy = dy_ref[0].astype(f32)
  h, xhat, rstd = c.layer_norm_fwd(x, g_ref[...], b_ref[...])

  def head(i, dh):
    wq, k, v = wq_ref[i], k_ref[0, i], v_ref[0, i]
    q = c.mm_nt(h, wq, cd) + bq_ref[i]                      # [n, dh]
    p = _softmax(c.mm_nt(q, k, cd) * scale)                  # [n, M]
    o = c.mm(p, v, cd)
    dwo_ref[i] += c.mm_tn(o, dy, cd)                         # [dh, T]
    do = c.mm_nt(dy, wo_ref[i], cd)                          # [n, dh]
    dv_ref[0, i] += c.mm_tn(p, do, cd)                       # [M, dh]
    dp = c.mm_nt(do, v, cd)                                  # [n, M]
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    dq = c.mm(ds, k, cd) * scale                             # [n, dh]
    dk_ref[0, i] += c.mm_tn(ds, q, cd) * scale               # [M, dh]
    dwq_ref[i] += c.mm_tn(dq, h, cd)                         # [dh, T]
    dbq_ref[i] += jnp.sum(dq, axis=0, keepdims=True)
    return dh + c.mm(dq, wq, cd)                             # [n, T]

  dh = jax.lax.fori_loop(0, num_heads, head, jnp.zeros(x.shape, f32))
  dx_ln, dg, db = c.layer_norm_bwd(dh, xhat, rstd, g_ref[...])
  dg_ref[...] += dg
  db_ref[...] += db
  dbo_ref[...] += jnp.sum(dy, axis=0, keepdims=True)
  dx_ref[0] = (dy + dx_ln).astype(dx_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers. x: [B, Np, T] padded; k, v: [B, H, M, dh];
# attn = (g, b, wqT [H,dh,T], bq [H,1,dh], wo [H,dh,T], bo); mlp = (g2, b2, w1, b1, w2, bb2)
# ----------------------------------------------------------------------------

def _fwd_call(x, k, v, attn, mlp, st: _Static, save_y: bool):
  b, n_pad, t = x.shape
  bn = st.block_n
  tile = pl.BlockSpec((1, bn, t), lambda b_, i: (b_, i, 0))
  kvspec = pl.BlockSpec((1,) + k.shape[1:], lambda b_, i: (b_, 0, 0, 0))
  params = list(attn) + list(mlp)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if save_y:
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  kernel = functools.partial(_fwd_kernel, num_heads=st.num_heads, scale=st.scale,
                             has_mlp=st.has_mlp, save_y=save_y)
  outs = pl.pallas_call(
      kernel, grid=(b, n_pad // bn),
      in_specs=[tile, kvspec, kvspec] + [_full(a.shape) for a in params],
      out_specs=[tile] * len(out_shape), out_shape=out_shape,
      compiler_params=c.compiler_params("parallel", "parallel"),
      interpret=st.interpret, name="rin_write_block_fwd",
  )(x, k, v, *params)
  return outs


def _mlp_bwd_call(y, dout, mlp, st: _Static):
  b, n_pad, t = y.shape
  bn = st.block_n
  tile = pl.BlockSpec((1, bn, t), lambda b_, i: (b_, i, 0))
  ins = mlp[:5]                                   # g2, b2, w1, b1, w2 (bb2 not needed)
  grad_shapes = [a.shape for a in mlp]
  return pl.pallas_call(
      _mlp_bwd_kernel, grid=(b, n_pad // bn),
      in_specs=[tile, tile] + [_full(a.shape) for a in ins],
      out_specs=[tile] + [_full(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(y.shape, f32)]
      + [jax.ShapeDtypeStruct(s, f32) for s in grad_shapes],
      compiler_params=c.compiler_params("arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_write_block_mlp_bwd",
  )(y, dout, *ins)


def _attn_bwd_call(x, dy, k, v, attn, st: _Static):
  b, n_pad, t = x.shape
  bn = st.block_n
  tile = pl.BlockSpec((1, bn, t), lambda b_, i: (b_, i, 0))
  kvspec = pl.BlockSpec((1,) + k.shape[1:], lambda b_, i: (b_, 0, 0, 0))
  ins = attn[:5]                                  # g, b, wqT, bq, wo (bo not needed)
  grad_shapes = [a.shape for a in attn]
  kernel = functools.partial(_attn_bwd_kernel, num_heads=st.num_heads, scale=st.scale)
  return pl.pallas_call(
      kernel, grid=(b, n_pad // bn),
      in_specs=[tile, tile, kvspec, kvspec] + [_full(a.shape) for a in ins],
      out_specs=[tile, kvspec, kvspec] + [_full(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(k.shape, f32),
                 jax.ShapeDtypeStruct(v.shape, f32)]
      + [jax.ShapeDtypeStruct(s, f32) for s in grad_shapes],
      compiler_params=c.compiler_params("arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_write_block_attn_bwd",
  )(x, dy, k, v, *ins)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _write_core(x, k, v, attn, mlp, st: _Static):
  return _fwd_call(x, k, v, attn, mlp, st, save_y=False)[0]


def _write_core_fwd(x, k, v, attn, mlp, st: _Static):
  save_y = st.has_mlp
  outs = _fwd_call(x, k, v, attn, mlp, st, save_y=save_y)
  y = outs[1] if save_y else None
  return outs[0], (x, k, v, attn, mlp, y)


def _write_core_bwd(st: _Static, res, dout):
  x, k, v, attn, mlp, y = res
  if st.has_mlp:
    dy, *dmlp = _mlp_bwd_call(y, dout, mlp, st)
  else:
    dy, dmlp = dout.astype(f32), []
  dx, dk, dv, *dattn = _attn_bwd_call(x, dy, k, v, attn, st)
  cast = lambda gs, ps: tuple(g.astype(p.dtype) for g, p in zip(gs, ps))
  return dx, dk.astype(k.dtype), dv.astype(v.dtype), cast(dattn, attn), cast(dmlp, mlp)


_write_core.defvjp(_write_core_fwd, _write_core_bwd)


# ----------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------

def _choose_block_n(block_sizes, n, est):
  if block_sizes.block_n is not None:
    c.check_block("block_n", block_sizes.block_n, 8, block_sizes)
    bn = min(block_sizes.block_n, c.round_up(n, 8))
    c.check_vmem("pallas_tpu.write_block", est(bn), block_sizes)
    return bn
  for bn in (512, 256, 128, 64, 32, 16, 8):
    bn = min(bn, c.round_up(n, 8))
    if est(bn) <= c.VMEM_LIMIT_BYTES:
      return bn
  c.check_vmem("pallas_tpu.write_block", est(8), WriteBlockSizes(8))
  return 8


def write_block(x, z, p, *, num_heads, interpret=False, block_sizes=None):
  """Fused write block (see module doc). x [B, N, T], z [B, M, D] -> [B, N, T]."""
  block_sizes = c.op_block_sizes(block_sizes, "write", WriteBlockSizes)
  bsz, n, t = x.shape
  m = z.shape[1]
  width = p.wq.shape[1]
  dh = width // num_heads
  f = p.w1.shape[1] if p.has_mlp else 0
  cd = x.dtype
  est = lambda bn: vmem_estimate(bn, t, m, num_heads, dh, f, cd, p.has_mlp)
  bn = _choose_block_n(block_sizes, n, est)
  st = _Static(num_heads, float(dh ** -0.5), p.has_mlp, bn, n, interpret)

  # Latent K/V projection: plain XLA (M tokens), [B, H, M, dh].
  def kv(w, bias):
    y = jnp.einsum("bmd,da->bma", z.astype(f32), w.astype(f32)) + bias.astype(f32)
    return y.reshape(bsz, m, num_heads, dh).transpose(0, 2, 1, 3).astype(cd)

  vec = lambda a: a.reshape(1, -1).astype(f32)
  attn = (vec(p.ln_scale), vec(p.ln_bias),
          p.wq.reshape(t, num_heads, dh).transpose(1, 2, 0).astype(cd),   # [H, dh, T]
          p.bq.reshape(num_heads, 1, dh).astype(f32),
          p.wo.reshape(num_heads, dh, t).astype(cd),                       # [H, dh, T]
          vec(p.bo))
  mlp = ((vec(p.mlp_ln_scale), vec(p.mlp_ln_bias), p.w1.astype(cd), vec(p.b1),
          p.w2.astype(cd), vec(p.b2)) if p.has_mlp else ())
  xp = c.pad_axis(x, 1, c.round_up(n, bn))
  out = _write_core(xp, kv(p.wk, p.bk), kv(p.wv, p.bv), attn, mlp, st)
  return out[:, :n]
