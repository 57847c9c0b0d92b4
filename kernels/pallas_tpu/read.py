"""Fused RIN read block for TPU (Pallas / Mosaic), forward and backward.

    out = z + OutProj(MHA(q=QProj(LN(z)), kv=KVProj(x)))

z is the latents [B, M, D] (few queries), x the interface [B, N, T] (many keys).
The forward is one kernel, grid (batch, latent block, interface block) with the
interface streamed over the last ("arbitrary") axis: at the first interface
block it computes LN(z) and the per-head queries into VMEM scratch; at every
interface block it projects that tile of x to K and V for each head in VMEM
(the interface K/V never touch HBM) and updates an fp32 online softmax; at the
last block it applies the output projection, bias and residual.

Backward:
  * latent side in XLA (M tokens: small): out-projection grads, do = dout Wo^T,
    delta = rowsum(do * o), and the LN / q-projection backward from dq;
  * dQ kernel: streams the interface, recomputes K/V per tile, accumulates dq;
  * dK/dV kernel: per interface tile, recomputes K/V, accumulates dK/dV over the
    latent blocks, then back-projects them into dx and the K/V weight gradients
    (accumulated across the grid, hence an all-"arbitrary" grid).
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
class ReadBlockSizes:
  """Tiling of read_block. None fields take the per-shape default.

  block_m: latent (query) rows per grid step, multiple of 8 (default: all of M up to 512).
  block_n: interface (key) rows per grid step, multiple of 128 (default 512, or all
    of N when smaller).
  """
  block_m: int | None = None
  block_n: int | None = None

  def resolve(self, m: int, n: int) -> "ReadBlockSizes":
    c.check_block("block_m", self.block_m, 8, self)
    c.check_block("block_n", self.block_n, 128, self)
    bm = min(self.block_m or 512, c.round_up(m, 8))
    bn = min(self.block_n or 512, c.round_up(n, 128))
    return ReadBlockSizes(bm, bn)


@dataclasses.dataclass(frozen=True)
class _Static:
  num_heads: int
  scale: float
  bs: ReadBlockSizes
  n: int            # true interface length (keys beyond it are masked)
  interpret: object


def _full(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def vmem_estimate(bs: ReadBlockSizes, d, t, h, dh, dtype) -> int:
  v = c.vmem_bytes
  bm, bn = bs.block_m, bs.block_n
  zt, xt = v((bm, d), dtype), v((bn, t), dtype)
  qw = v((h, dh, d), dtype) * 2 + v((1, d), f32) * 3 + v((h, 1, dh), f32)
  kvw = 2 * v((h, dh, t), dtype) + 2 * v((h, 1, dh), f32)
  hq = v((h, bm, dh), f32)
  hl = v((h, bm, 1), f32)
  temps = 4 * v((bm, bn), f32) + 4 * v((bn, dh), f32) + 3 * v((bm, d), f32) + 2 * v((bn, t), f32)
  fwd = 2 * (2 * zt + xt + qw + kvw + hq + hl) + 3 * hq + 2 * hl + temps
  dq = 2 * (xt + kvw + 3 * hq + 2 * hl) + temps
  dkv = (2 * (2 * xt + kvw + 2 * hq + 2 * hl + 2 * v((h, dh, t), f32) + 2 * v((h, 1, dh), f32))
         + 2 * v((h, bn, dh), f32) + temps)
  return max(fwd, dq, dkv)


# ----------------------------------------------------------------------------
# Kernels. kv = (wkT [H,dh,T], bk [H,1,dh], wvT [H,dh,T], bv [H,1,dh]).
# ----------------------------------------------------------------------------

def _project_kv(x, wk_ref, bk_ref, wv_ref, bv_ref, i, cd):
  return (c.mm_nt(x, wk_ref[i], cd) + bk_ref[i], c.mm_nt(x, wv_ref[i], cd) + bv_ref[i])


def _key_mask(shape, kv_step, block_n, n):
  col = kv_step * block_n + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return col < n


def _fwd_kernel(z_ref, x_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref, bv_ref,
                wo_ref, bo_ref, *rest, num_heads, scale, n, block_n, mask_keys, save_res):
  outs, (q_sc, m_sc, l_sc, acc_sc) = rest[:-4], rest[-4:]
  cd = z_ref.dtype
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    h, _, _ = c.layer_norm_fwd(z_ref[0].astype(f32), g_ref[...], b_ref[...])

    def head(i, carry):
      q_sc[i] = (c.mm_nt(h, wq_ref[i], cd) + bq_ref[i]).astype(q_sc.dtype)
      return carry

    jax.lax.fori_loop(0, num_heads, head, 0)
    m_sc[...] = jnp.full(m_sc.shape, c.NEG, f32)
    l_sc[...] = jnp.zeros(l_sc.shape, f32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, f32)

  x = x_ref[0]

  def head(i, carry):
    k, v = _project_kv(x, wk_ref, bk_ref, wv_ref, bv_ref, i, cd)   # [bn, dh] each
    s = c.mm_nt(q_sc[i], k, cd) * scale                              # [bm, bn]
    if mask_keys:
      s = jnp.where(_key_mask(s.shape, j, block_n, n), s, c.NEG)
    m_prev = m_sc[i]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[i] = alpha * l_sc[i] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[i] = alpha * acc_sc[i] + c.mm(p, v, cd)
    m_sc[i] = m_new
    return carry

  jax.lax.fori_loop(0, num_heads, head, 0)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    out_ref = outs[0]

    def head(i, acc):
      o = acc_sc[i] / l_sc[i]
      if save_res:
        outs[1][0, i] = o
        outs[2][0, i] = m_sc[i] + jnp.log(l_sc[i])
      return acc + c.mm(o, wo_ref[i], cd)

    a = jax.lax.fori_loop(0, num_heads, head, jnp.zeros(out_ref.shape[1:], f32))
    out_ref[0] = (z_ref[0].astype(f32) + a + bo_ref[...]).astype(out_ref.dtype)


def _dq_kernel(x_ref, q_ref, do_ref, lse_ref, delta_ref, wk_ref, bk_ref, wv_ref, bv_ref,
               dq_ref, *, num_heads, scale, n, block_n, mask_keys):
  cd = x_ref.dtype
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    dq_ref[...] = jnp.zeros(dq_ref.shape, f32)

  x = x_ref[0]

  def head(i, carry):
    k, v = _project_kv(x, wk_ref, bk_ref, wv_ref, bv_ref, i, cd)
    p = jnp.exp(c.mm_nt(q_ref[0, i], k, cd) * scale - lse_ref[0, i])
    if mask_keys:
      p = jnp.where(_key_mask(p.shape, j, block_n, n), p, 0.0)
    ds = p * (c.mm_nt(do_ref[0, i], v, cd) - delta_ref[0, i])
    dq_ref[0, i] += c.mm(ds, k, cd) * scale
    return carry

  jax.lax.fori_loop(0, num_heads, head, 0)


def _dkv_kernel(x_ref, q_ref, do_ref, lse_ref, delta_ref, wk_ref, bk_ref, wv_ref, bv_ref,
                dx_ref, dwk_ref, dbk_ref, dwv_ref, dbv_ref, dk_sc, dv_sc, *,
                num_heads, scale, n, block_n, mask_keys):
  cd = x_ref.dtype
  j, mi = pl.program_id(1), pl.program_id(2)     # interface block, latent block (streamed)

  @pl.when((pl.program_id(0) == 0) & (j == 0) & (mi == 0))
  def _init_weights():
    for r in (dwk_ref, dbk_ref, dwv_ref, dbv_ref):
      r[...] = jnp.zeros(r.shape, f32)

  @pl.when(mi == 0)
  def _init_kv():
    dk_sc[...] = jnp.zeros(dk_sc.shape, f32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, f32)

  x = x_ref[0]

  def head(i, carry):
    k, v = _project_kv(x, wk_ref, bk_ref, wv_ref, bv_ref, i, cd)
    q, do = q_ref[0, i], do_ref[0, i]
    p = jnp.exp(c.mm_nt(q, k, cd) * scale - lse_ref[0, i])           # [bm, bn]
    if mask_keys:
      p = jnp.where(_key_mask(p.shape, j, block_n, n), p, 0.0)
    dv_sc[i] += c.mm_tn(p, do, cd)                                    # [bn, dh]
    ds = p * (c.mm_nt(do, v, cd) - delta_ref[0, i])
    dk_sc[i] += c.mm_tn(ds, q, cd) * scale
    return carry

  jax.lax.fori_loop(0, num_heads, head, 0)

  @pl.when(mi == pl.num_programs(2) - 1)
  def _finish():
    def head(i, dx):
      dk, dv = dk_sc[i], dv_sc[i]
      dwk_ref[i] += c.mm_tn(dk, x, cd)                               # [dh, T]
      dwv_ref[i] += c.mm_tn(dv, x, cd)
      dbk_ref[i] += jnp.sum(dk, axis=0, keepdims=True)
      dbv_ref[i] += jnp.sum(dv, axis=0, keepdims=True)
      return dx + c.mm(dk, wk_ref[i], cd) + c.mm(dv, wv_ref[i], cd)  # [bn, T]

    dx = jax.lax.fori_loop(0, num_heads, head, jnp.zeros(x.shape, f32))
    dx_ref[0] = dx.astype(dx_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded z [B, Mp, D], x [B, Np, T].
# ----------------------------------------------------------------------------

def _fwd_call(z, x, qp, kvp, op, st: _Static, save_res: bool):
  bsz, m_pad, d = z.shape
  n_pad, t = x.shape[1:]
  bm, bn = st.bs.block_m, st.bs.block_n
  h = st.num_heads
  dh = qp[2].shape[1]
  zspec = pl.BlockSpec((1, bm, d), lambda b, i, j: (b, i, 0))
  xspec = pl.BlockSpec((1, bn, t), lambda b, i, j: (b, j, 0))
  params = list(qp) + list(kvp) + list(op)
  out_shape = [jax.ShapeDtypeStruct(z.shape, z.dtype)]
  out_specs = [zspec]
  if save_res:
    out_shape += [jax.ShapeDtypeStruct((bsz, h, m_pad, dh), f32),
                  jax.ShapeDtypeStruct((bsz, h, m_pad, 1), f32)]
    out_specs += [pl.BlockSpec((1, h, bm, dh), lambda b, i, j: (b, 0, i, 0)),
                  pl.BlockSpec((1, h, bm, 1), lambda b, i, j: (b, 0, i, 0))]
  kernel = functools.partial(_fwd_kernel, num_heads=h, scale=st.scale, n=st.n, block_n=bn,
                             mask_keys=st.n != n_pad, save_res=save_res)
  return pl.pallas_call(
      kernel, grid=(bsz, m_pad // bm, n_pad // bn),
      in_specs=[zspec, xspec] + [_full(a.shape) for a in params],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((h, bm, dh), z.dtype), pltpu.VMEM((h, bm, 1), f32),
                      pltpu.VMEM((h, bm, 1), f32), pltpu.VMEM((h, bm, dh), f32)],
      compiler_params=c.compiler_params("parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_fwd",
  )(z, x, *params)


def _bwd_calls(x, q, do, lse, delta, kvp, st: _Static):
  bsz, n_pad, t = x.shape
  h, m_pad, dh = q.shape[1:]
  bm, bn = st.bs.block_m, st.bs.block_n
  kw = dict(num_heads=h, scale=st.scale, n=st.n, block_n=bn, mask_keys=st.n != n_pad)
  # dQ: grid (b, latent block, interface block), interface streamed.
  xspec = pl.BlockSpec((1, bn, t), lambda b, i, j: (b, j, 0))
  hspec = pl.BlockSpec((1, h, bm, dh), lambda b, i, j: (b, 0, i, 0))
  lspec = pl.BlockSpec((1, h, bm, 1), lambda b, i, j: (b, 0, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw), grid=(bsz, m_pad // bm, n_pad // bn),
      in_specs=[xspec, hspec, hspec, lspec, lspec] + [_full(a.shape) for a in kvp],
      out_specs=hspec, out_shape=jax.ShapeDtypeStruct(q.shape, f32),
      compiler_params=c.compiler_params("parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_dq",
  )(x, q, do, lse, delta, *kvp)
  # dK/dV -> dx, dW: grid (b, interface block, latent block), latents streamed.
  xspec = pl.BlockSpec((1, bn, t), lambda b, j, i: (b, j, 0))
  hspec = pl.BlockSpec((1, h, bm, dh), lambda b, j, i: (b, 0, i, 0))
  lspec = pl.BlockSpec((1, h, bm, 1), lambda b, j, i: (b, 0, i, 0))
  dx, *dkv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kw), grid=(bsz, n_pad // bn, m_pad // bm),
      in_specs=[xspec, hspec, hspec, lspec, lspec] + [_full(a.shape) for a in kvp],
      out_specs=[xspec] + [_full(a.shape) for a in kvp],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)]
      + [jax.ShapeDtypeStruct(a.shape, f32) for a in kvp],
      scratch_shapes=[pltpu.VMEM((h, bn, dh), f32), pltpu.VMEM((h, bn, dh), f32)],
      compiler_params=c.compiler_params("arbitrary", "arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_dkv",
  )(x, q, do, lse, delta, *kvp)
  return dq, dx, dkv


def _queries(z, g, b, wq, bq):
  """XLA twin of the kernel's LN + q-projection: [B, Mp, D] -> [B, H, Mp, dh] fp32."""
  h, _, _ = c.layer_norm_fwd(z.astype(f32), g, b)
  q = jnp.einsum("bmd,hed->bhme", h.astype(wq.dtype), wq, preferred_element_type=f32)
  return q + bq[None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _read_core(z, x, qp, kvp, op, st: _Static):
  return _fwd_call(z, x, qp, kvp, op, st, save_res=False)[0]


def _read_core_fwd(z, x, qp, kvp, op, st: _Static):
  out, o, lse = _fwd_call(z, x, qp, kvp, op, st, save_res=True)
  return out, (z, x, qp, kvp, op, o, lse)


def _read_core_bwd(st: _Static, res, dout):
  z, x, qp, kvp, op, o, lse = res
  wo, bo = op
  cd = z.dtype
  dout = dout.astype(f32)
  dwo = jnp.einsum("bhme,bmd->hed", o, dout)
  dbo = jnp.sum(dout, axis=(0, 1))[None]
  do = jnp.einsum("bmd,hed->bhme", dout, wo.astype(f32))
  delta = jnp.sum(do * o, axis=-1, keepdims=True)
  q, q_vjp = jax.vjp(_queries, z, *qp)
  dq, dx, dkv = _bwd_calls(x, q.astype(cd), do.astype(cd), lse, delta, kvp, st)
  dz, *dqp = q_vjp(dq)
  dz = dz + dout
  cast = lambda gs, ps: tuple(g.astype(p.dtype) for g, p in zip(gs, ps))
  return (dz.astype(z.dtype), dx, cast(dqp, qp), cast(dkv, kvp),
          (dwo.astype(wo.dtype), dbo.astype(bo.dtype)))


_read_core.defvjp(_read_core_fwd, _read_core_bwd)


def read_block(z, x, p, *, num_heads, interpret=False, block_sizes=None):
  """Fused read block (see module doc). z [B, M, D], x [B, N, T] -> [B, M, D]."""
  block_sizes = c.op_block_sizes(block_sizes, "read", ReadBlockSizes)
  _, m, d = z.shape
  n, t = x.shape[1:]
  width = p.wq.shape[1]
  dh = width // num_heads
  cd = z.dtype
  bs = block_sizes.resolve(m, n)
  c.check_vmem("pallas_tpu.read_block", vmem_estimate(bs, d, t, num_heads, dh, cd), bs)
  st = _Static(num_heads, float(dh ** -0.5), bs, n, interpret)
  vec = lambda a: a.reshape(1, -1).astype(f32)
  heads_t = lambda w, cin: w.reshape(cin, num_heads, dh).transpose(1, 2, 0).astype(cd)
  hbias = lambda b: b.reshape(num_heads, 1, dh).astype(f32)
  qp = (vec(p.ln_scale), vec(p.ln_bias), heads_t(p.wq, d), hbias(p.bq))
  kvp = (heads_t(p.wk, t), hbias(p.bk), heads_t(p.wv, t), hbias(p.bv))
  op = (p.wo.reshape(num_heads, dh, d).astype(cd), vec(p.bo))
  zp = c.pad_axis(z, 1, c.round_up(m, bs.block_m))
  xp = c.pad_axis(x, 1, c.round_up(n, bs.block_n))
  out = _read_core(zp, xp, qp, kvp, op, st)
  return out[:, :m]
