"""Fused RIN read block for TPU (Pallas / Mosaic), forward and backward.

    out = z + OutProj(MHA(q=QProj(LN(z)), kv=KVProj(x)))

z is the latents [B, M, D] (few queries), x the interface [B, N, T] (many keys);
A = heads * head_dim is the attention width.

Every projection is ONE lane-dense matmul over all heads: LN(z) @ Wq [D, A],
x @ [Wk|Wv] [T, 2A] and concat_h(o_h) @ Wo [A, D], and so are the weight gradients
(one [T, 2A] accumulator for dWk|dWv). Only QK^T and P.V are per head, on static
lane slices of those [rows, A] arrays (head_dim 32 fills a quarter of a 128-wide MXU
pass, so per-head projections, ~75% of the FLOPs, were the kernel's bottleneck).
[Wk|Wv] is concatenated in XLA outside the kernels (a [T, 2A] copy per call); the
public parameter layout (kernels/params.py) is unchanged.

The forward is one kernel, grid (batch, latent block, interface block) with the
interface streamed over the last ("arbitrary") axis: at the first interface block it
computes LN(z) and the queries into VMEM scratch; at every interface block it
projects that tile of x to K|V in VMEM (the interface K/V never touch HBM) and
updates an fp32 online softmax per head; at the last block it applies the output
projection, bias and residual.

Backward:
  * latent side in XLA (M tokens: small): out-projection grads, do = dout Wo^T,
    delta = rowsum_h(do * o), and the LN / q-projection backward from dq;
  * dQ kernel: streams the interface, recomputes K|V per tile, accumulates dq;
  * dK/dV kernel: per interface tile, recomputes K|V, accumulates dK|dV over the
    latent blocks, then back-projects them into dx and the K|V weight gradients.
    Those accumulate across the grid, so the grid is sequential except for a leading
    "parallel" axis of `num_partials` per-core partial accumulators (both TensorCores
    of a megacore chip) over the batch, summed in XLA after the call.
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
  num_partials: per-core partial weight-gradient accumulators of the dK/dV kernel (its
    leading "parallel" grid axis, over the batch), positive; default 2 (the TensorCores
    of a megacore chip). At most the batch is used; a batch they do not divide is
    zero-padded in that kernel.
  """
  block_m: int | None = None
  block_n: int | None = None
  num_partials: int = c.DEFAULT_NUM_PARTIALS

  def resolve(self, m: int, n: int) -> "ReadBlockSizes":
    c.check_block("block_m", self.block_m, 8, self)
    c.check_block("block_n", self.block_n, 128, self)
    c.check_num_partials(self.num_partials, self)
    bm = min(self.block_m or 512, c.round_up(m, 8))
    bn = min(self.block_n or 512, c.round_up(n, 128))
    return ReadBlockSizes(bm, bn, self.num_partials)


@dataclasses.dataclass(frozen=True)
class _Static:
  num_heads: int
  head_dim: int
  scale: float
  bs: ReadBlockSizes
  n: int            # true interface length (keys beyond it are masked)
  interpret: object


def _full(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def vmem_estimate(bs: ReadBlockSizes, d, t, h, dh, dtype) -> int:
  v = c.vmem_bytes
  a = h * dh
  bm, bn = bs.block_m, bs.block_n
  zt, xt = v((bm, d), dtype), v((bn, t), dtype)
  qw = v((d, a), dtype) + v((a, d), dtype) + v((1, d), f32) * 3 + v((1, a), f32)
  kvw = v((t, 2 * a), dtype) + v((1, 2 * a), f32)
  rows = v((bm, a), f32)             # q, do, dq, o, acc: [bm, A]
  hl = v((h, bm, 1), f32)
  temps = (4 * v((bm, bn), f32) + 2 * v((bn, 2 * a), f32) + 3 * v((bm, d), f32)
           + 2 * v((bn, t), f32) + 2 * rows)
  fwd = 2 * (2 * zt + xt + qw + kvw + rows + hl) + 2 * rows + 2 * hl + temps
  dq = 2 * (xt + kvw + 3 * rows + 2 * hl) + temps
  dkv = (2 * (2 * xt + kvw + 2 * rows + 2 * hl + v((t, 2 * a), f32) + v((1, 2 * a), f32))
         + v((bn, 2 * a), f32) + temps)
  return max(fwd, dq, dkv)


# ----------------------------------------------------------------------------
# Kernels. kv = (wkv [T, 2A] = [Wk|Wv], bkv [1, 2A] f32). Heads are static lane
# slices: head i of a [rows, A] array is [:, i*dh:(i+1)*dh], its V part of K|V at +A.
# ----------------------------------------------------------------------------

def _heads(num_heads, dh):
  return [slice(i * dh, (i + 1) * dh) for i in range(num_heads)]


def _project_kv(x, wkv_ref, bkv_ref, cd):
  """x [bn, T] -> K|V [bn, 2A] in the compute dtype: one matmul for every head."""
  return (c.mm(x, wkv_ref[...], cd) + bkv_ref[...]).astype(cd)


def _key_mask(shape, kv_step, block_n, n):
  col = kv_step * block_n + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return col < n


def _fwd_kernel(z_ref, x_ref, g_ref, b_ref, wq_ref, bq_ref, wkv_ref, bkv_ref,
                wo_ref, bo_ref, *rest, num_heads, dh, scale, n, block_n, mask_keys, save_res):
  outs, (q_sc, m_sc, l_sc, acc_sc) = rest[:-4], rest[-4:]
  cd = z_ref.dtype
  a = num_heads * dh
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    h, _, _ = c.layer_norm_fwd(z_ref[0].astype(f32), g_ref[...], b_ref[...])
    q_sc[...] = (c.mm(h, wq_ref[...], cd) + bq_ref[...]).astype(q_sc.dtype)   # [bm, A]
    m_sc[...] = jnp.full(m_sc.shape, c.NEG, f32)
    l_sc[...] = jnp.zeros(l_sc.shape, f32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, f32)

  kv = _project_kv(x_ref[0], wkv_ref, bkv_ref, cd)                  # [bn, 2A]
  q = q_sc[...]
  for i, hs in enumerate(_heads(num_heads, dh)):
    vs = slice(a + hs.start, a + hs.stop)
    s = c.mm_nt(q[:, hs], kv[:, hs], cd) * scale                     # [bm, bn]
    if mask_keys:
      s = jnp.where(_key_mask(s.shape, j, block_n, n), s, c.NEG)
    m_prev = m_sc[i]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[i] = alpha * l_sc[i] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[:, hs] = alpha * acc_sc[:, hs] + c.mm(p, kv[:, vs], cd)
    m_sc[i] = m_new

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    out_ref = outs[0]
    for i, hs in enumerate(_heads(num_heads, dh)):
      acc_sc[:, hs] = acc_sc[:, hs] / l_sc[i]                        # o, head by head
      if save_res:
        outs[2][0, i] = m_sc[i] + jnp.log(l_sc[i])
    o = acc_sc[...]                                                  # [bm, A]
    if save_res:
      outs[1][0] = o
    a_out = c.mm(o, wo_ref[...], cd)                                 # [bm, D]
    out_ref[0] = (z_ref[0].astype(f32) + a_out + bo_ref[...]).astype(out_ref.dtype)


def _dq_kernel(x_ref, q_ref, do_ref, lse_ref, delta_ref, wkv_ref, bkv_ref, dq_ref, *,
               num_heads, dh, scale, n, block_n, mask_keys):
  cd = x_ref.dtype
  a = num_heads * dh
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    dq_ref[...] = jnp.zeros(dq_ref.shape, f32)

  kv = _project_kv(x_ref[0], wkv_ref, bkv_ref, cd)
  q, do = q_ref[0], do_ref[0]                                        # [bm, A]
  for i, hs in enumerate(_heads(num_heads, dh)):
    k, v = kv[:, hs], kv[:, a + hs.start:a + hs.stop]
    p = jnp.exp(c.mm_nt(q[:, hs], k, cd) * scale - lse_ref[0, i])
    if mask_keys:
      p = jnp.where(_key_mask(p.shape, j, block_n, n), p, 0.0)
    ds = p * (c.mm_nt(do[:, hs], v, cd) - delta_ref[0, i])
    dq_ref[0, :, hs] += c.mm(ds, k, cd) * scale


def _dkv_kernel(x_ref, q_ref, do_ref, lse_ref, delta_ref, wkv_ref, bkv_ref,
                dx_ref, dwkv_ref, dbkv_ref, dkv_sc, *, num_heads, dh, scale, n, block_n,
                mask_keys):
  """Grid (partial, batch in partial, interface block, latent block (streamed))."""
  cd = x_ref.dtype
  a = num_heads * dh
  bi, j, mi = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when((bi == 0) & (j == 0) & (mi == 0))      # first step of this partial
  def _init_weights():
    dwkv_ref[...] = jnp.zeros(dwkv_ref.shape, f32)
    dbkv_ref[...] = jnp.zeros(dbkv_ref.shape, f32)

  @pl.when(mi == 0)
  def _init_kv():
    dkv_sc[...] = jnp.zeros(dkv_sc.shape, f32)

  x = x_ref[0]
  kv = _project_kv(x, wkv_ref, bkv_ref, cd)
  q, do = q_ref[0], do_ref[0]
  for i, hs in enumerate(_heads(num_heads, dh)):
    vs = slice(a + hs.start, a + hs.stop)
    k, v, qh, doh = kv[:, hs], kv[:, vs], q[:, hs], do[:, hs]
    p = jnp.exp(c.mm_nt(qh, k, cd) * scale - lse_ref[0, i])          # [bm, bn]
    if mask_keys:
      p = jnp.where(_key_mask(p.shape, j, block_n, n), p, 0.0)
    dkv_sc[:, vs] += c.mm_tn(p, doh, cd)                              # dV [bn, dh]
    ds = p * (c.mm_nt(doh, v, cd) - delta_ref[0, i])
    dkv_sc[:, hs] += c.mm_tn(ds, qh, cd) * scale                      # dK [bn, dh]

  @pl.when(mi == pl.num_programs(3) - 1)
  def _finish():
    dkv = dkv_sc[...]                                                 # [bn, 2A]
    dwkv_ref[...] += c.mm_tn(x, dkv, cd)                              # [T, 2A]
    dbkv_ref[...] += jnp.sum(dkv, axis=0, keepdims=True)
    dx_ref[0] = c.mm_nt(dkv, wkv_ref[...], cd).astype(dx_ref.dtype)   # [bn, T]


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded z [B, Mp, D], x [B, Np, T].
# ----------------------------------------------------------------------------

def _fwd_call(z, x, qp, kvp, op, st: _Static, save_res: bool):
  bsz, m_pad, d = z.shape
  n_pad, t = x.shape[1:]
  bm, bn = st.bs.block_m, st.bs.block_n
  h, dh = st.num_heads, st.head_dim
  a = h * dh
  zspec = pl.BlockSpec((1, bm, d), lambda b, i, j: (b, i, 0))
  xspec = pl.BlockSpec((1, bn, t), lambda b, i, j: (b, j, 0))
  params = list(qp) + list(kvp) + list(op)
  out_shape = [jax.ShapeDtypeStruct(z.shape, z.dtype)]
  out_specs = [zspec]
  if save_res:
    out_shape += [jax.ShapeDtypeStruct((bsz, m_pad, a), f32),
                  jax.ShapeDtypeStruct((bsz, h, m_pad, 1), f32)]
    out_specs += [pl.BlockSpec((1, bm, a), lambda b, i, j: (b, i, 0)),
                  pl.BlockSpec((1, h, bm, 1), lambda b, i, j: (b, 0, i, 0))]
  kernel = functools.partial(_fwd_kernel, num_heads=h, dh=dh, scale=st.scale, n=st.n,
                             block_n=bn, mask_keys=st.n != n_pad, save_res=save_res)
  return pl.pallas_call(
      kernel, grid=(bsz, m_pad // bm, n_pad // bn),
      in_specs=[zspec, xspec] + [_full(a_.shape) for a_ in params],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bm, a), z.dtype), pltpu.VMEM((h, bm, 1), f32),
                      pltpu.VMEM((h, bm, 1), f32), pltpu.VMEM((bm, a), f32)],
      compiler_params=c.compiler_params("parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_fwd",
  )(z, x, *params)


def _bwd_calls(x, q, do, lse, delta, kvp, st: _Static):
  bsz, n_pad, t = x.shape
  m_pad, a = q.shape[1:]
  h, dh = st.num_heads, st.head_dim
  bm, bn = st.bs.block_m, st.bs.block_n
  kw = dict(num_heads=h, dh=dh, scale=st.scale, n=st.n, block_n=bn, mask_keys=st.n != n_pad)
  # dQ: grid (b, latent block, interface block), interface streamed.
  xspec = pl.BlockSpec((1, bn, t), lambda b, i, j: (b, j, 0))
  rspec = pl.BlockSpec((1, bm, a), lambda b, i, j: (b, i, 0))
  lspec = pl.BlockSpec((1, h, bm, 1), lambda b, i, j: (b, 0, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw), grid=(bsz, m_pad // bm, n_pad // bn),
      in_specs=[xspec, rspec, rspec, lspec, lspec] + [_full(a_.shape) for a_ in kvp],
      out_specs=rspec, out_shape=jax.ShapeDtypeStruct(q.shape, f32),
      compiler_params=c.compiler_params("parallel", "parallel", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_dq",
  )(x, q, do, lse, delta, *kvp)
  # dK/dV -> dx, dW: grid (partial, batch in partial, interface block, latent block),
  # latents streamed; batch element p * per + bi. A batch the partials do not divide is
  # zero-padded: a zero q and do give p^T do = 0 and ds = 0, so the padding adds exact
  # zeros to dW and db.
  parts, per = c.batch_partials(st.bs.num_partials, bsz)
  xd, qd, dod, lsed, deltad = (c.pad_axis(r, 0, parts * per) for r in (x, q, do, lse, delta))
  xspec = pl.BlockSpec((1, bn, t), lambda p, b, j, i: (p * per + b, j, 0))
  rspec = pl.BlockSpec((1, bm, a), lambda p, b, j, i: (p * per + b, i, 0))
  lspec = pl.BlockSpec((1, h, bm, 1), lambda p, b, j, i: (p * per + b, 0, i, 0))
  dx, dwkv, dbkv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kw), grid=(parts, per, n_pad // bn, m_pad // bm),
      in_specs=[xspec, rspec, rspec, lspec, lspec] + [_full(a_.shape) for a_ in kvp],
      out_specs=[xspec] + [c.partial_spec(a_.shape) for a_ in kvp],
      out_shape=[jax.ShapeDtypeStruct(xd.shape, x.dtype)]
      + [jax.ShapeDtypeStruct((parts,) + a_.shape, f32) for a_ in kvp],
      scratch_shapes=[pltpu.VMEM((bn, 2 * a), f32)],
      compiler_params=c.compiler_params("parallel", "arbitrary", "arbitrary", "arbitrary"),
      interpret=st.interpret, name="rin_read_block_dkv",
  )(xd, qd, dod, lsed, deltad, *kvp)
  return dq, dx[:bsz], (jnp.sum(dwkv, axis=0), jnp.sum(dbkv, axis=0))


def _queries(z, g, b, wq, bq):
  """XLA twin of the kernel's LN + q-projection: [B, Mp, D] -> [B, Mp, A] fp32."""
  h, _, _ = c.layer_norm_fwd(z.astype(f32), g, b)
  return jnp.einsum("bmd,da->bma", h.astype(wq.dtype), wq, preferred_element_type=f32) + bq


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
  bsz, m_pad, a = o.shape
  dout = dout.astype(f32)
  dwo = jnp.einsum("bma,bmd->ad", o, dout)
  dbo = jnp.sum(dout, axis=(0, 1))[None]
  do = jnp.einsum("bmd,ad->bma", dout, wo.astype(f32))
  delta = jnp.sum((do * o).reshape(bsz, m_pad, st.num_heads, st.head_dim), axis=-1)
  delta = delta.transpose(0, 2, 1)[..., None]                         # [B, H, Mp, 1]
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
  st = _Static(num_heads, dh, float(dh ** -0.5), bs, n, interpret)
  vec = lambda a: a.reshape(1, -1).astype(f32)
  # The parameters' own [in, A] / [A, out] layouts are the lane-dense ones; only K and V
  # are joined, so that the interface tile is projected by one [T, 2A] matmul.
  qp = (vec(p.ln_scale), vec(p.ln_bias), p.wq.astype(cd), vec(p.bq))
  kvp = (jnp.concatenate([p.wk, p.wv], axis=1).astype(cd),
         vec(jnp.concatenate([p.bk, p.bv])))
  op = (p.wo.astype(cd), vec(p.bo))
  zp = c.pad_axis(z, 1, c.round_up(m, bs.block_m))
  xp = c.pad_axis(x, 1, c.round_up(n, bs.block_n))
  out = _read_core(zp, xp, qp, kvp, op, st)
  return out[:, :m]
