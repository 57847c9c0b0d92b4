"""Fused latent self-attention block for TPU (Pallas / Mosaic), forward and backward.

    out = OutProj(MHA(q, k, v = QProj(h), KProj(h), VProj(h))),  h = LN(z)   [+ z]

z is the model's latent residual stream [B, M, D]; A = heads * head_dim. All M latents
of a batch element fit in VMEM (M = 128, D = 512/768 in the published configs), so one
grid step takes `block_b` whole batch elements and holds their whole sequence: the
softmax is a plain one over all keys (no online softmax, nothing streamed), and q, k, v
never leave VMEM.

Every projection is one lane-dense [rows, D] x [D, A] (or [rows, A] x [A, D]) matmul over
all heads and the `block_b * M` rows of the step, with wq, wk, wv and wo whole in VMEM in
the parameters' own layouts, and so are the weight-gradient products of the backward.
Only QK^T, P.V and their backward products are per head: batched over the step's
batch elements on static lane slices of the [block_b, M, A] q/k/v scratch. Their MXU use
is capped at head_dim / 128 (the contraction of QK^T and dP = dO V^T, the output width
of P.V, dQ and dK): 25% at head_dim 32, 37.5% at 48; packing heads block-diagonally in
one tile does not lift it (the zeros take the same MXU passes).

Forward: one kernel, grid (batch block,), "parallel"; it saves nothing (the backward
recomputes LN, q/k/v and the probabilities from z).

Backward: one kernel. Per batch block it recomputes h, q, k, v and P head by head, takes
dO = dout Wo^T, and forms delta = rowsum(dP * P) (= rowsum(dO * O) of the head) in VMEM,
then dV, dS, dQ, dK per head, and the weight gradients dWq|dWk|dWv = h^T dQ|dK|dV,
dWo = O^T dout, the biases' column sums, the LN backward and dz. The weight gradients
accumulate across the grid in VMEM-resident output blocks, so the grid is sequential
except for a leading "parallel" axis of `num_partials` per-core partial accumulators
(the TensorCores of a megacore chip, v4/v5p), summed by XLA over that small leading axis
after the call; with one partial (the default on single-core v5e/v6e) that sum is a
reshape.

Any length: M is zero-padded to a multiple of 8 (sublanes) and padded keys masked; a
zero latent row has finite LN statistics and a zero cotangent, so padded rows and a
zero-padded batch add exact zeros to every gradient.
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
# Rows (block_b * M) per grid step the default aims for: a 512-row step's projections are
# four [512, D] x [D, A] matmuls, ~1 GFLOP at D = A = 512, far above the per-step cost.
ROWS_TARGET = 512
# Generations with one TensorCore per chip, where one partial accumulator is the default.
SINGLE_CORE = ("v5e", "v6e")


@dataclasses.dataclass(frozen=True)
class LatentBlockSizes:
  """Tiling of latent_attention_block. None fields take the per-shape default.

  block_b: batch elements per grid step (each with all its M latents); a positive int
    (default: the most, up to ROWS_TARGET rows a step, that fit the VMEM budget, leaving
    >= 2 forward steps when the batch allows). A batch it does not divide is zero-padded.
  num_partials: per-core partial weight-gradient accumulators of the backward kernel
    (its leading "parallel" grid axis), positive; default 1 on single-core chips (v5e,
    v6e) and 2 elsewhere (megacore v4/v5p, or generation unknown).
  """
  block_b: int | None = None
  num_partials: int | None = None

  def resolve(self, batch: int, m_pad: int, fits=lambda bb: True) -> "LatentBlockSizes":
    parts = self.num_partials
    if parts is None:
      parts = 1 if c.tpu_generation() in SINGLE_CORE else c.DEFAULT_NUM_PARTIALS
    c.check_num_partials(parts, self)
    bb = self.block_b
    if bb is not None:
      if not isinstance(bb, int) or isinstance(bb, bool) or bb < 1:
        raise ValueError(f"block_sizes.block_b={bb!r} must be a positive int (batch "
                         f"elements per grid step); got {self}")
      bb = min(bb, batch)
    else:
      cands = [b for b in range(1, batch + 1)
               if b * m_pad <= max(ROWS_TARGET, m_pad) and (-(-batch // b) >= 2 or batch < 2)
               and fits(b)]
      # Prefer divisors of the batch (no padded elements), then the largest.
      bb = max(cands or [1], key=lambda b: (batch % b == 0, b))
    return LatentBlockSizes(bb, parts)


@dataclasses.dataclass(frozen=True)
class _Static:
  num_heads: int
  head_dim: int
  scale: float
  m: int            # true latent count (keys beyond it are masked)
  residual: bool
  bs: LatentBlockSizes
  interpret: object


def vmem_estimate(bb, m_pad, d, h, dh, dtype, num_partials=1) -> int:
  """Largest VMEM need of the two kernels (blocks double-buffered, scratch, temporaries)."""
  v = c.vmem_bytes
  a = h * dh
  r = bb * m_pad
  zt, zt32 = v((bb, m_pad, d), dtype), v((r, d), f32)
  rows, rows32 = v((bb, m_pad, a), dtype), v((r, a), f32)
  w = 3 * v((d, a), dtype) + v((a, d), dtype) + 3 * v((1, d), f32) + 3 * v((1, a), f32)
  scores = v((bb, m_pad, m_pad), f32)
  fwd = 2 * (2 * zt + w) + 3 * rows + rows32 + 4 * zt32 + 3 * rows32 + 4 * scores
  grads = 3 * v((d, a), f32) + v((a, d), f32) + 3 * v((1, d), f32) + 3 * v((1, a), f32)
  bwd = (2 * (3 * zt + w + grads) + 4 * rows + 4 * rows32 + 5 * zt32 + 4 * rows32
         + 6 * scores)
  return max(fwd, bwd)


# ----------------------------------------------------------------------------
# Kernels. Heads are static lane slices: head i of a [.., A] array is [.., i*dh:(i+1)*dh].
# Parameter refs: g, b [1, D]; wq, wk, wv [D, A]; bq, bk, bv [1, A]; wo [A, D]; bo [1, D].
# ----------------------------------------------------------------------------

def _heads(num_heads, dh):
  return [slice(i * dh, (i + 1) * dh) for i in range(num_heads)]


def _rows(x):
  """[bb, Mp, C] -> [bb * Mp, C] (a free reshape: Mp is a multiple of 8, x is fp32)."""
  return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def _unrows(x, bb):
  return x.reshape(bb, x.shape[0] // bb, x.shape[1])


def _probs(q, k, *, scale, m, cd):
  """Softmax over all keys of one head: q, k [bb, Mp, dh] -> P [bb, Mp, Mp] fp32."""
  s = c.bmm_nt(q, k, cd) * scale
  if m != s.shape[2]:
    col = jax.lax.broadcasted_iota(jnp.int32, s.shape, 2)
    s = jnp.where(col < m, s, c.NEG)
  mx = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - mx)
  return p * (1.0 / jnp.sum(p, axis=-1, keepdims=True))


def _project_qkv(z_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref, bv_ref,
                 q_sc, k_sc, v_sc, cd):
  """LN and the three projections of one step into the [bb, Mp, A] scratch; returns the
  LN output h [R, D] and the LN backward's (xhat, rstd)."""
  bb = z_ref.shape[0]
  z = _rows(z_ref[...].astype(f32))
  h, xhat, rstd = c.layer_norm_fwd(z, g_ref[...], b_ref[...])
  for sc, w_ref, bias_ref in ((q_sc, wq_ref, bq_ref), (k_sc, wk_ref, bk_ref),
                              (v_sc, wv_ref, bv_ref)):
    sc[...] = _unrows(c.mm(h, w_ref[...], cd) + bias_ref[...], bb).astype(sc.dtype)
  return h, xhat, rstd, z


def _fwd_kernel(z_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref, bv_ref,
                wo_ref, bo_ref, out_ref, q_sc, k_sc, v_sc, o_sc, *,
                num_heads, dh, scale, m, residual):
  cd = z_ref.dtype
  bb = z_ref.shape[0]
  _, _, _, z = _project_qkv(z_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref,
                            bv_ref, q_sc, k_sc, v_sc, cd)
  for hs in _heads(num_heads, dh):
    p = _probs(q_sc[:, :, hs], k_sc[:, :, hs], scale=scale, m=m, cd=cd)
    o_sc[:, :, hs] = c.bmm(p, v_sc[:, :, hs], cd)                    # [bb, Mp, dh]
  y = c.mm(_rows(o_sc[...]), wo_ref[...], cd) + bo_ref[...]          # [R, D]
  if residual:
    y = y + z
  out_ref[...] = _unrows(y, bb).astype(out_ref.dtype)


def _bwd_kernel(z_ref, dout_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref,
                bv_ref, wo_ref,
                dz_ref, dg_ref, db_ref, dwq_ref, dbq_ref, dwk_ref, dbk_ref, dwv_ref, dbv_ref,
                dwo_ref, dbo_ref,
                q_sc, k_sc, v_sc, do_sc, o_sc, dq_sc, dk_sc, dv_sc, *,
                num_heads, dh, scale, m, residual):
  """Grid (partial, batch block in partial)."""
  cd = z_ref.dtype
  bb = z_ref.shape[0]
  grads = (dg_ref, db_ref, dwq_ref, dbq_ref, dwk_ref, dbk_ref, dwv_ref, dbv_ref, dwo_ref,
           dbo_ref)

  @pl.when(pl.program_id(1) == 0)          # first step of this partial
  def _init():
    for r in grads:
      r[...] = jnp.zeros(r.shape, r.dtype)

  h, xhat, rstd, _ = _project_qkv(z_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref,
                                  wv_ref, bv_ref, q_sc, k_sc, v_sc, cd)
  dout = _rows(dout_ref[...].astype(f32))                             # [R, D]
  do_sc[...] = _unrows(c.mm_nt(dout, wo_ref[...], cd), bb).astype(do_sc.dtype)  # dO [R, A]
  for hs in _heads(num_heads, dh):
    qh, kh, vh, doh = q_sc[:, :, hs], k_sc[:, :, hs], v_sc[:, :, hs], do_sc[:, :, hs]
    p = _probs(qh, kh, scale=scale, m=m, cd=cd)                       # [bb, Mp, Mp]
    o_sc[:, :, hs] = c.bmm(p, vh, cd)                                 # O (for dWo)
    dv_sc[:, :, hs] = c.bmm_tn(p, doh, cd)                            # P^T dO
    dp = c.bmm_nt(doh, vh, cd)                                        # dO V^T
    # delta = rowsum(dO * O) of this head, as rowsum(dP * P) (the same sum, in VMEM).
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    dq_sc[:, :, hs] = c.bmm(ds, kh, cd) * scale
    dk_sc[:, :, hs] = c.bmm_tn(ds, qh, cd) * scale
  dwo_ref[...] += c.mm_tn(_rows(o_sc[...]), dout, cd)                 # [A, D]
  dbo_ref[...] += jnp.sum(dout, axis=0, keepdims=True)
  dh_ = None
  for sc, w_ref, dw_ref, dbias_ref in ((dq_sc, wq_ref, dwq_ref, dbq_ref),
                                       (dk_sc, wk_ref, dwk_ref, dbk_ref),
                                       (dv_sc, wv_ref, dwv_ref, dbv_ref)):
    d_ = _rows(sc[...])                                               # [R, A]
    dw_ref[...] += c.mm_tn(h, d_, cd)                                 # [D, A]
    dbias_ref[...] += jnp.sum(d_, axis=0, keepdims=True)
    t = c.mm_nt(d_, w_ref[...], cd)                                   # [R, D]
    dh_ = t if dh_ is None else dh_ + t
  dz, dg, db = c.layer_norm_bwd(dh_, xhat, rstd, g_ref[...])
  dg_ref[...] += dg
  db_ref[...] += db
  if residual:
    dz = dz + dout
  dz_ref[...] = _unrows(dz, bb).astype(dz_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on z [Bp, Mp, D] (padded); params as the kernels take them.
# ----------------------------------------------------------------------------

def _full(shape):
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _kw(st: _Static):
  return dict(num_heads=st.num_heads, dh=st.head_dim, scale=st.scale, m=st.m,
              residual=st.residual)


def _scratch(bb, m_pad, a, cd, n_cd, n_f32):
  return ([pltpu.VMEM((bb, m_pad, a), cd) for _ in range(n_cd)]
          + [pltpu.VMEM((bb, m_pad, a), f32) for _ in range(n_f32)])


def _fwd_call(z, params, st: _Static):
  bsz, m_pad, d = z.shape
  bb = st.bs.block_b
  a = st.num_heads * st.head_dim
  zspec = pl.BlockSpec((bb, m_pad, d), lambda i: (i, 0, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, **_kw(st)), grid=(bsz // bb,),
      in_specs=[zspec] + [_full(p.shape) for p in params],
      out_specs=zspec, out_shape=jax.ShapeDtypeStruct(z.shape, z.dtype),
      scratch_shapes=_scratch(bb, m_pad, a, z.dtype, 3, 1),
      compiler_params=c.compiler_params("parallel"),
      interpret=st.interpret, name="rin_latent_attn_fwd",
  )(z, *params)


def _bwd_call(z, dout, params, st: _Static):
  """z, dout [Bp, Mp, D] with Bp = parts * per * block_b."""
  bsz, m_pad, d = z.shape
  bb, parts = st.bs.block_b, st.bs.num_partials
  per = bsz // (bb * parts)
  a = st.num_heads * st.head_dim
  zspec = pl.BlockSpec((bb, m_pad, d), lambda p, i: (p * per + i, 0, 0))
  ins = params[:-1]                                   # bo is not needed
  grad_shapes = [p.shape for p in params]
  dz, *grads = pl.pallas_call(
      functools.partial(_bwd_kernel, **_kw(st)), grid=(parts, per),
      in_specs=[zspec, zspec] + [_full(p.shape) for p in ins],
      out_specs=[zspec] + [c.partial_spec(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype)]
      + [jax.ShapeDtypeStruct((parts,) + s, f32) for s in grad_shapes],
      scratch_shapes=_scratch(bb, m_pad, a, z.dtype, 4, 4),
      compiler_params=c.compiler_params("parallel", "arbitrary"),
      interpret=st.interpret, name="rin_latent_attn_bwd",
  )(z, dout, *ins)
  # Per-partial sums over the small leading axis (a reshape when there is one partial).
  return dz, [g[0] if parts == 1 else jnp.sum(g, axis=0) for g in grads]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _latent_core(z, params, st: _Static):
  return _fwd_call(z, params, st)


def _latent_core_fwd(z, params, st: _Static):
  return _fwd_call(z, params, st), (z, params)


def _latent_core_bwd(st: _Static, res, dout):
  z, params = res
  bsz = z.shape[0]
  bb, parts = st.bs.block_b, st.bs.num_partials
  nblocks = -(-bsz // bb)
  parts = min(parts, nblocks)
  per = -(-nblocks // parts)
  st = dataclasses.replace(st, bs=LatentBlockSizes(bb, parts))
  # A batch the partials and blocks do not divide is zero-padded: a zero z and a zero
  # cotangent add exact zeros to every weight gradient.
  pad = lambda x: c.pad_axis(x, 0, parts * per * bb)
  dz, grads = _bwd_call(pad(z), pad(dout.astype(z.dtype)), params, st)
  return dz[:bsz], tuple(g.astype(p.dtype) for g, p in zip(grads, params))


_latent_core.defvjp(_latent_core_fwd, _latent_core_bwd)


def latent_attention_block(z, p, *, num_heads, residual=False, interpret=False,
                           block_sizes=None):
  """Fused latent self-attention (see module doc). z [B, M, D] -> [B, M, D]."""
  block_sizes = c.op_block_sizes(block_sizes, "latent", LatentBlockSizes)
  bsz, m, d = z.shape
  width = p.wq.shape[1]
  dh = width // num_heads
  cd = z.dtype
  m_pad = c.round_up(m, 8)
  budget = c.vmem_limit_bytes()
  est = lambda bb, parts=1: vmem_estimate(bb, m_pad, d, num_heads, dh, cd, parts)
  bs = block_sizes.resolve(bsz, m_pad, fits=lambda bb: est(bb) <= budget)
  c.check_vmem("pallas_tpu.latent_attention_block", est(bs.block_b), bs)
  st = _Static(num_heads, dh, float(dh ** -0.5), m, bool(residual), bs, interpret)
  vec = lambda a: a.reshape(1, -1).astype(f32)
  # The parameters' own [D, A] / [A, D] layouts are the lane-dense ones: no joining.
  params = (vec(p.ln_scale), vec(p.ln_bias), p.wq.astype(cd), vec(p.bq), p.wk.astype(cd),
            vec(p.bk), p.wv.astype(cd), vec(p.bv), p.wo.astype(cd), vec(p.bo))
  nblocks = -(-bsz // bs.block_b)
  zp = c.pad_axis(c.pad_axis(z, 1, m_pad), 0, nblocks * bs.block_b)
  out = _latent_core(zp, params, st)
  return out[:bsz, :m]
