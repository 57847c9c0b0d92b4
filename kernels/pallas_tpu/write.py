"""Fused RIN write block for TPU (Pallas / Mosaic), forward and backward.

    y   = x + OutProj(MHA(q=QProj(LN(x)), kv=KVProj(z)))
    out = y + MLP(LN(y))                  (MLP: Dense -> exact GELU -> Dense)

x is the interface [B, N, T] (many tokens), z the latents [B, M, D] (few); A =
heads * head_dim. The block is token-wise apart from the shared latent K/V, so the
forward is ONE kernel per interface tile: each tile of x is read once and the result
written once, with K/V [M, A] and all the weights resident in VMEM.

The projections are single lane-dense matmuls over all heads, LN(x) @ Wq [T, A] and
concat_h(o_h) @ Wo [A, T] (the parameters' own layouts), and so are their backward
products (dy Wo^T, dWo, dWq, dq Wq^T): only QK^T and P.V are per head, on static lane
slices (head_dim 32 fills a quarter of a 128-wide MXU pass, so per-head projections
kept the kernels near 25-44% of the MXU).

The K/V projection of the latents (M tokens; tiny next to the N-token interface
work) is plain XLA before the kernel, and its backward is XLA's autodiff.

Backward (recomputing inside the kernels rather than saving activations):
  kernel A (MLP part, skipped without an MLP): from the saved y and dout, recompute
    LN/MLP and produce dy plus the MLP/LN weight gradients;
  kernel B (attention part): from x and dy, recompute LN, q, softmax and produce
    dx, dK, dV (per batch) and the LN / q / out-projection weight gradients.
Weight gradients accumulate in VMEM-resident output blocks across the grid, so those
grids are sequential except for a leading "parallel" axis of `num_partials` per-core
partial accumulators (both TensorCores of a megacore chip) over the batch, summed in
XLA after the call.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.pallas_tpu import common as c

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class WriteBlockSizes:
  """Tiling of write_block. block_n: interface rows per grid step (multiple of 8);
  None: the largest of 512, 256, ... that fits the VMEM budget. num_partials: per-core
  partial weight-gradient accumulators of the backward kernels (their leading "parallel"
  grid axis, over the batch), positive; default 2 (the TensorCores of a megacore chip).
  At most the batch is used; a batch they do not divide is zero-padded in the backward."""
  block_n: int | None = None
  num_partials: int = c.DEFAULT_NUM_PARTIALS


@dataclasses.dataclass(frozen=True)
class _Static:
  num_heads: int
  head_dim: int
  scale: float
  has_mlp: bool
  block_n: int
  n: int
  num_partials: int
  interpret: object


def _full(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def vmem_estimate(block_n, t, m, h, dh, f, dtype, has_mlp) -> int:
  """Largest VMEM need of the three kernels (inputs/outputs double-buffered)."""
  v = c.vmem_bytes
  n = block_n
  a = h * dh
  tile = v((n, t), dtype)
  tile32 = v((n, t), f32)
  kv = 2 * v((m, a), dtype)
  attn_w = 2 * v((t, a), dtype) + v((1, a), f32) + 3 * v((1, t), f32)
  mlp_w = v((t, f), dtype) + v((f, t), dtype) + v((1, f), f32) + 3 * v((1, t), f32)
  rows = v((n, a), f32)                  # q, do, o, dq: [n, A]
  temps_attn = 6 * tile32 + 4 * v((n, m), f32) + 4 * rows
  temps_mlp = 4 * v((n, f), f32) + 3 * tile32
  fwd = 2 * (3 * tile + kv + attn_w + (mlp_w if has_mlp else 0)) + temps_attn + rows + (
      temps_mlp if has_mlp else 0)
  bwd_a = 0
  if has_mlp:
    grads = v((t, f), f32) + v((f, t), f32) + v((1, f), f32) + 3 * v((1, t), f32)
    bwd_a = 2 * (2 * tile + tile32 + mlp_w + grads) + temps_mlp + 2 * tile32
  grads_b = 2 * v((m, a), f32) + 2 * v((t, a), f32) + v((1, a), f32) + 3 * v((1, t), f32)
  bwd_b = 2 * (2 * tile + tile32 + kv + attn_w + grads_b) + temps_attn + 2 * rows + 2 * tile32
  return max(fwd, bwd_a, bwd_b)


# ----------------------------------------------------------------------------
# Kernels. Heads are static lane slices: head i of a [rows, A] array is
# [:, i*dh:(i+1)*dh].
# ----------------------------------------------------------------------------

def _heads(num_heads, dh):
  return [slice(i * dh, (i + 1) * dh) for i in range(num_heads)]


def _softmax(s):
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _attention_residual(x, k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref, wo_ref, bo_ref, o_sc,
                        *, num_heads, dh, scale, cd):
  """y = x + OutProj(MHA(QProj(LN(x)), K, V)) for one tile x [n, T] (fp32)."""
  h, _, _ = c.layer_norm_fwd(x, g_ref[...], b_ref[...])
  q = (c.mm(h, wq_ref[...], cd) + bq_ref[...]).astype(cd)   # [n, A]
  k, v = k_ref[0], v_ref[0]                                  # [M, A]
  for hs in _heads(num_heads, dh):
    p = _softmax(c.mm_nt(q[:, hs], k[:, hs], cd) * scale)   # [n, M]
    o_sc[:, hs] = c.mm(p, v[:, hs], cd)                      # [n, dh]
  return x + c.mm(o_sc[...], wo_ref[...], cd) + bo_ref[...]  # [n, T]


def _mlp_residual(y, g_ref, b_ref, w1_ref, b1_ref, w2_ref, b2_ref, *, cd):
  h2, _, _ = c.layer_norm_fwd(y, g_ref[...], b_ref[...])
  u = c.mm(h2, w1_ref[...], cd) + b1_ref[...]
  return y + c.mm(c.gelu(u), w2_ref[...], cd) + b2_ref[...]


def _fwd_kernel(x_ref, k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref, wo_ref, bo_ref, *rest,
                num_heads, dh, scale, has_mlp, save_y):
  mlp_refs, outs = (rest[:6], rest[6:-1]) if has_mlp else ((), rest[:-1])
  o_sc = rest[-1]
  cd = x_ref.dtype
  y = _attention_residual(x_ref[0].astype(f32), k_ref, v_ref, g_ref, b_ref, wq_ref, bq_ref,
                          wo_ref, bo_ref, o_sc, num_heads=num_heads, dh=dh, scale=scale, cd=cd)
  out = _mlp_residual(y, *mlp_refs, cd=cd) if has_mlp else y
  outs[0][0] = out.astype(outs[0].dtype)
  if save_y:
    outs[1][0] = y.astype(outs[1].dtype)


def _first_step_of_partial():
  """Grid (partial, batch in partial, tile): this partial's accumulators start here."""
  return (pl.program_id(1) == 0) & (pl.program_id(2) == 0)


def _zero(*refs):
  for r in refs:
    r[...] = jnp.zeros(r.shape, r.dtype)


def _mlp_bwd_kernel(y_ref, dout_ref, g_ref, b_ref, w1_ref, b1_ref, w2_ref,
                    dy_ref, dg_ref, db_ref, dw1_ref, db1_ref, dw2_ref, db2_ref):
  cd = y_ref.dtype

  @pl.when(_first_step_of_partial())
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
                     o_sc, dq_sc, *, num_heads, dh, scale):
  cd = x_ref.dtype

  @pl.when(_first_step_of_partial())
  def _init():
    _zero(dg_ref, db_ref, dwq_ref, dbq_ref, dwo_ref, dbo_ref)

  @pl.when(pl.program_id(2) == 0)        # dK/dV are per batch element
  def _init_kv():
    _zero(dk_ref, dv_ref)

  x = x_ref[0].astype(f32)
  dy = dy_ref[0].astype(f32)
  h, xhat, rstd = c.layer_norm_fwd(x, g_ref[...], b_ref[...])
  q = (c.mm(h, wq_ref[...], cd) + bq_ref[...]).astype(cd)  # [n, A]
  do = c.mm_nt(dy, wo_ref[...], cd).astype(cd)             # [n, A] = dy Wo^T
  k, v = k_ref[0], v_ref[0]                                 # [M, A]
  for hs in _heads(num_heads, dh):
    qh, kh, vh, doh = q[:, hs], k[:, hs], v[:, hs], do[:, hs]
    p = _softmax(c.mm_nt(qh, kh, cd) * scale)                # [n, M]
    o_sc[:, hs] = c.mm(p, vh, cd)                            # [n, dh]
    dv_ref[0, :, hs] += c.mm_tn(p, doh, cd)                  # [M, dh]
    dp = c.mm_nt(doh, vh, cd)                                # [n, M]
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    dq_sc[:, hs] = c.mm(ds, kh, cd) * scale                  # [n, dh]
    dk_ref[0, :, hs] += c.mm_tn(ds, qh, cd) * scale          # [M, dh]
  dq = dq_sc[...]                                            # [n, A]
  dwo_ref[...] += c.mm_tn(o_sc[...], dy, cd)                 # [A, T]
  dwq_ref[...] += c.mm_tn(h, dq, cd)                         # [T, A]
  dbq_ref[...] += jnp.sum(dq, axis=0, keepdims=True)
  dh_ = c.mm_nt(dq, wq_ref[...], cd)                         # [n, T]
  dx_ln, dg, db = c.layer_norm_bwd(dh_, xhat, rstd, g_ref[...])
  dg_ref[...] += dg
  db_ref[...] += db
  dbo_ref[...] += jnp.sum(dy, axis=0, keepdims=True)
  dx_ref[0] = (dy + dx_ln).astype(dx_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers. x: [B, Np, T] padded; k, v: [B, M, A];
# attn = (g, b, wq [T, A], bq [1, A], wo [A, T], bo); mlp = (g2, b2, w1, b1, w2, bb2).
# The backward grids are (partial, batch in partial, tile), batch element p * per + b;
# their inputs arrive with the batch padded to partials * per.
# ----------------------------------------------------------------------------

def _fwd_call(x, k, v, attn, mlp, st: _Static, save_y: bool):
  b, n_pad, t = x.shape
  bn = st.block_n
  tile = pl.BlockSpec((1, bn, t), lambda b_, i: (b_, i, 0))
  kvspec = pl.BlockSpec((1,) + k.shape[1:], lambda b_, i: (b_, 0, 0))
  params = list(attn) + list(mlp)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if save_y:
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  kernel = functools.partial(_fwd_kernel, num_heads=st.num_heads, dh=st.head_dim,
                             scale=st.scale, has_mlp=st.has_mlp, save_y=save_y)
  outs = pl.pallas_call(
      kernel, grid=(b, n_pad // bn),
      in_specs=[tile, kvspec, kvspec] + [_full(a.shape) for a in params],
      out_specs=[tile] * len(out_shape), out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bn, k.shape[2]), f32)],
      compiler_params=c.compiler_params("parallel", "parallel"),
      interpret=st.interpret, name="rin_write_block_fwd",
  )(x, k, v, *params)
  return outs


def _bwd_tile(per, bn, t):
  return pl.BlockSpec((1, bn, t), lambda p, b_, i: (p * per + b_, i, 0))


def _mlp_bwd_call(y, dout, mlp, st: _Static, parts, per):
  b, n_pad, t = y.shape
  bn = st.block_n
  tile = _bwd_tile(per, bn, t)
  ins = mlp[:5]                                   # g2, b2, w1, b1, w2 (bb2 not needed)
  grad_shapes = [a.shape for a in mlp]
  dy, *grads = pl.pallas_call(
      _mlp_bwd_kernel, grid=(parts, per, n_pad // bn),
      in_specs=[tile, tile] + [_full(a.shape) for a in ins],
      out_specs=[tile] + [c.partial_spec(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(y.shape, f32)]
      + [jax.ShapeDtypeStruct((parts,) + s, f32) for s in grad_shapes],
      compiler_params=c.compiler_params("parallel", "arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_write_block_mlp_bwd",
  )(y, dout, *ins)
  return dy, [jnp.sum(g, axis=0) for g in grads]


def _attn_bwd_call(x, dy, k, v, attn, st: _Static, parts, per):
  b, n_pad, t = x.shape
  bn = st.block_n
  a = k.shape[2]
  tile = _bwd_tile(per, bn, t)
  kvspec = pl.BlockSpec((1,) + k.shape[1:], lambda p, b_, i: (p * per + b_, 0, 0))
  ins = attn[:5]                                  # g, b, wq, bq, wo (bo not needed)
  grad_shapes = [a_.shape for a_ in attn]
  kernel = functools.partial(_attn_bwd_kernel, num_heads=st.num_heads, dh=st.head_dim,
                             scale=st.scale)
  dx, dk, dv, *grads = pl.pallas_call(
      kernel, grid=(parts, per, n_pad // bn),
      in_specs=[tile, tile, kvspec, kvspec] + [_full(a_.shape) for a_ in ins],
      out_specs=[tile, kvspec, kvspec] + [c.partial_spec(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(k.shape, f32),
                 jax.ShapeDtypeStruct(v.shape, f32)]
      + [jax.ShapeDtypeStruct((parts,) + s, f32) for s in grad_shapes],
      scratch_shapes=[pltpu.VMEM((bn, a), f32), pltpu.VMEM((bn, a), f32)],
      compiler_params=c.compiler_params("parallel", "arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_write_block_attn_bwd",
  )(x, dy, k, v, *ins)
  return dx, dk, dv, [jnp.sum(g, axis=0) for g in grads]


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
  bsz = x.shape[0]
  # A batch the partials do not divide is zero-padded: a zero dout (and so a zero dy)
  # makes every weight-gradient term of a padded element exactly zero.
  parts, per = c.batch_partials(st.num_partials, bsz)
  pad = lambda a: c.pad_axis(a, 0, parts * per)
  if st.has_mlp:
    dy, dmlp = _mlp_bwd_call(pad(y), pad(dout), mlp, st, parts, per)
  else:
    dy, dmlp = pad(dout.astype(f32)), []
  dx, dk, dv, dattn = _attn_bwd_call(pad(x), dy, pad(k), pad(v), attn, st, parts, per)
  cast = lambda gs, ps: tuple(g.astype(p.dtype) for g, p in zip(gs, ps))
  return (dx[:bsz], dk[:bsz].astype(k.dtype), dv[:bsz].astype(v.dtype), cast(dattn, attn),
          cast(dmlp, mlp))


_write_core.defvjp(_write_core_fwd, _write_core_bwd)


# ----------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------

def _choose_block_n(block_sizes, n, est):
  c.check_num_partials(block_sizes.num_partials, block_sizes)
  if block_sizes.block_n is not None:
    c.check_block("block_n", block_sizes.block_n, 8, block_sizes)
    bn = min(block_sizes.block_n, c.round_up(n, 8))
    c.check_vmem("pallas_tpu.write_block", est(bn), block_sizes)
    return bn
  budget = c.vmem_limit_bytes()     # the budget check_vmem and compiler_params use
  for bn in (512, 256, 128, 64, 32, 16, 8):
    bn = min(bn, c.round_up(n, 8))
    if est(bn) <= budget:
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
  st = _Static(num_heads, dh, float(dh ** -0.5), p.has_mlp, bn, n, block_sizes.num_partials,
               interpret)

  # Latent K/V projection: plain XLA (M tokens), [B, M, A] (heads are lane slices).
  def kv(w, bias):
    y = jnp.einsum("bmd,da->bma", z.astype(f32), w.astype(f32)) + bias.astype(f32)
    return y.astype(cd)

  vec = lambda a: a.reshape(1, -1).astype(f32)
  # The parameters' own layouts, wq [T, A] and wo [A, T], are the lane-dense ones.
  attn = (vec(p.ln_scale), vec(p.ln_bias), p.wq.astype(cd), vec(p.bq), p.wo.astype(cd),
          vec(p.bo))
  mlp = ((vec(p.mlp_ln_scale), vec(p.mlp_ln_bias), p.w1.astype(cd), vec(p.b1),
          p.w2.astype(cd), vec(p.b2)) if p.has_mlp else ())
  xp = c.pad_axis(x, 1, c.round_up(n, bn))
  out = _write_core(xp, kv(p.wk, p.bk), kv(p.wv, p.bv), attn, mlp, st)
  return out[:, :n]
