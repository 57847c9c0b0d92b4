"""Fused latent self-attention block for TPU (Pallas / Mosaic), forward and backward.

    out = OutProj(MHA(q, k, v = QProj(h), KProj(h), VProj(h))),  h = LN(z)   [+ z]

z is the model's latent residual stream [B, M, D]; A = heads * head_dim. All M latents
of a batch element fit in VMEM (M = 128, D = 512/768 in the published configs), so one
grid step takes `block_b` whole batch elements and holds their whole sequence: the
softmax is a plain one over all keys (no online softmax, nothing streamed).

Every projection is one lane-dense [rows, D] x [D, A] (or [rows, A] x [A, D]) matmul over
all heads and the `block_b * M` rows of the step, with wq, wk, wv and wo whole in VMEM in
the parameters' own layouts, and so are the weight-gradient products of the backward.
Only QK^T, P.V and their backward products are per head, batched over the step's
batch elements (see Heads below). Their MXU use is capped at head_dim / 128 (the
contraction of QK^T and dP = dO V^T, the output width of P.V, dQ and dK): 25% at
head_dim 32, 37.5% at 48; packing heads block-diagonally in one tile does not lift it
(the zeros take the same MXU passes).

Forward: one kernel, grid (batch block,), "parallel". Under autodiff it also writes what
the backward reads instead of recomputing: q, k, v and the attention output o ([B, M, A]
each) and the probabilities P ([B, H, M, M]), all in the compute dtype (P is rounded to
it anyway as the P.V operand). Their HBM traffic overlaps with MXU work; recomputing them
added the three projections and the whole softmax to the backward, which the TPU cost
model priced higher (figures: bench/results/README.md, the fused latent block).

Backward: one kernel. Per batch block it recomputes LN(z) (vector work only), takes
dO = dout Wo^T, and per head dP = dO V^T, delta = rowsum(dP * P) (= rowsum(dO * O) of
the head) in VMEM, dS, dV, dQ, dK; then the weight gradients dWq|dWk|dWv = h^T dQ|dK|dV,
dWo = O^T dout, the biases' column sums, the LN backward and dz. The weight gradients
accumulate across the grid in VMEM-resident output blocks, so the grid is sequential
except for a leading "parallel" axis of `num_partials` per-core partial accumulators
(the TensorCores of a megacore chip, v4/v5p), summed by XLA over that small leading axis
after the call; with one partial (the default on single-core v5e/v6e) that sum is a
reshape.

Heads: each head's matmuls run on the lane-aligned window of the [.., A] arrays that
covers it (four heads of 32 share a 128-lane window), with the other heads' lanes zeroed
in one operand, instead of slicing the head's 32 lanes out (lane shifts and masked
stores); the sums over a window's heads are exact (disjoint lanes).

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
# Rows (block_b * M) per grid step the default aims for, VMEM permitting: the best of the
# TPU cost model's static profile of the CIFAR-10 layer over 256..2048 rows (the sweep is
# in bench/results/README.md).
ROWS_TARGET = 1024
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


def vmem_estimate(bb, m_pad, d, h, dh, dtype) -> int:
  """Largest VMEM need of the two kernels (blocks double-buffered, scratch, temporaries)."""
  v = c.vmem_bytes
  a = h * dh
  r = bb * m_pad
  zt, zt32 = v((bb, m_pad, d), dtype), v((r, d), f32)
  rows, rows32 = v((bb, m_pad, a), dtype), v((r, a), f32)
  w = 3 * v((d, a), dtype) + v((a, d), dtype) + 3 * v((1, d), f32) + 3 * v((1, a), f32)
  scores = v((bb, m_pad, m_pad), f32)
  probs = v((bb, h, m_pad, m_pad), dtype)
  # The weights (whole-array blocks) and the weight-gradient accumulators are single-
  # buffered (_single); the batch blocks double-buffered.
  fwd = (2 * (2 * zt + 4 * rows + probs) + w + 3 * rows + rows32 + 4 * zt32 + 3 * rows32
         + 4 * scores)
  grads = 3 * v((d, a), f32) + v((a, d), f32) + 3 * v((1, d), f32) + 3 * v((1, a), f32)
  bwd = (2 * (3 * zt + 4 * rows + probs) + w + grads + rows + 3 * rows32 + 5 * zt32
         + 4 * rows32 + 6 * scores)
  return max(fwd, bwd)


# ----------------------------------------------------------------------------
# Kernels. Heads are static lane slices: head i of a [.., A] array is [.., i*dh:(i+1)*dh].
# Parameter refs: g, b [1, D]; wq, wk, wv [D, A]; bq, bk, bv [1, A]; wo [A, D]; bo [1, D].
# ----------------------------------------------------------------------------

def _head_groups(num_heads, dh, a):
  """Heads grouped by the lane-aligned window that covers them: [((w0, w1), [(lo, hi),
  ...])], w0 a multiple of 128 and w1 one too (or A). With head_dim 32, four heads share
  each 128-lane window; a head that straddles a 128-lane boundary (head_dim 48, 72) gets
  a window of its own."""
  groups = []
  for i in range(num_heads):
    lo, hi = i * dh, (i + 1) * dh
    win = (lo // 128 * 128, min(c.round_up(hi, 128), a))
    if groups and groups[-1][0] == win:
      groups[-1][1].append((lo, hi))
    else:
      groups.append((win, [(lo, hi)]))
  return groups


def _windows_overlap(groups):
  wins = [w for w, _ in groups]
  return any(a[1] > b[0] for a, b in zip(wins, wins[1:]))


def _only_head(x, w0, lo, hi):
  """x [.., w] (lanes w0.. of a [.., A] array) with every lane outside head [lo, hi)
  zeroed: a head's matmuls run on whole aligned windows (no lane shifts), the zeros
  dropping the other heads' terms (a contraction of 32 takes the MXU pass that 128 does)."""
  if lo == w0 and hi == w0 + x.shape[-1]:
    return x
  lane = w0 + jax.lax.broadcasted_iota(jnp.int32, (1, 1, x.shape[-1]), 2)
  return jnp.where((lane >= lo) & (lane < hi), x, jnp.zeros((), x.dtype))


def _store(ref, win, x, accumulate):
  if accumulate:
    ref[:, :, win] += x.astype(ref.dtype)
  else:
    ref[:, :, win] = x.astype(ref.dtype)


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
                wo_ref, bo_ref, out_ref, *rest, num_heads, dh, scale, m, residual):
  """rest: (q, k, v, o outputs when saving them for the backward,) then the q, k, v
  (compute dtype) and o (fp32) scratch."""
  saved, (q_sc, k_sc, v_sc, o_sc) = rest[:-4], rest[-4:]
  if saved:
    q_sc, k_sc, v_sc = saved[:3]           # q, k, v go straight to their output blocks
  p_ref = saved[4] if saved else None
  cd = z_ref.dtype
  bb = z_ref.shape[0]
  _, _, _, z = _project_qkv(z_ref, g_ref, b_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref,
                            bv_ref, q_sc, k_sc, v_sc, cd)
  groups = _head_groups(num_heads, dh, o_sc.shape[2])
  acc = _windows_overlap(groups)
  if acc:
    o_sc[...] = jnp.zeros(o_sc.shape, f32)
  for (w0, w1), heads in groups:
    win = slice(w0, w1)
    q, k, v = q_sc[:, :, win], k_sc[:, :, win], v_sc[:, :, win]
    o = None
    for lo, hi in heads:
      p = _probs(q, _only_head(k, w0, lo, hi), scale=scale, m=m, cd=cd).astype(cd)
      if p_ref is not None:
        p_ref[:, lo // dh] = p.astype(p_ref.dtype)
      t = c.bmm(p, _only_head(v, w0, lo, hi), cd)                    # head's lanes only
      o = t if o is None else o + t
    _store(o_sc, win, o, acc)
  o = o_sc[...]
  if saved:
    saved[3][...] = o.astype(saved[3].dtype)
  y = c.mm(_rows(o), wo_ref[...], cd) + bo_ref[...]                  # [R, D]
  if residual:
    y = y + z
  out_ref[...] = _unrows(y, bb).astype(out_ref.dtype)


def _bwd_kernel(z_ref, dout_ref, q_ref, k_ref, v_ref, o_ref, p_ref, g_ref, b_ref, wq_ref, wk_ref,
                wv_ref, wo_ref,
                dz_ref, dg_ref, db_ref, dwq_ref, dbq_ref, dwk_ref, dbk_ref, dwv_ref, dbv_ref,
                dwo_ref, dbo_ref,
                do_sc, dq_sc, dk_sc, dv_sc, *, num_heads, dh, scale, m, residual):
  """Grid (partial, batch block in partial); q, k, v, o saved by the forward."""
  cd = z_ref.dtype
  bb = z_ref.shape[0]
  grads = (dg_ref, db_ref, dwq_ref, dbq_ref, dwk_ref, dbk_ref, dwv_ref, dbv_ref, dwo_ref,
           dbo_ref)

  @pl.when(pl.program_id(1) == 0)          # first step of this partial
  def _init():
    for r in grads:
      r[...] = jnp.zeros(r.shape, r.dtype)

  z = _rows(z_ref[...].astype(f32))
  h, xhat, rstd = c.layer_norm_fwd(z, g_ref[...], b_ref[...])
  dout = _rows(dout_ref[...].astype(f32))                             # [R, D]
  do_sc[...] = _unrows(c.mm_nt(dout, wo_ref[...], cd), bb).astype(do_sc.dtype)  # dO [R, A]
  groups = _head_groups(num_heads, dh, dq_sc.shape[2])
  acc = _windows_overlap(groups)
  if acc:
    for r in (dq_sc, dk_sc, dv_sc):
      r[...] = jnp.zeros(r.shape, f32)
  for (w0, w1), heads in groups:
    win = slice(w0, w1)
    q, k, v, do = q_ref[:, :, win], k_ref[:, :, win], v_ref[:, :, win], do_sc[:, :, win]
    dq = dk = dv = None
    for lo, hi in heads:
      kh, vh = _only_head(k, w0, lo, hi), _only_head(v, w0, lo, hi)
      p = p_ref[:, lo // dh].astype(f32)                              # [bb, Mp, Mp]
      t_dv = c.bmm_tn(p, _only_head(do, w0, lo, hi), cd)              # P^T dO
      dp = c.bmm_nt(do, vh, cd)                                       # dO V^T
      # delta = rowsum(dO * O) of this head, as rowsum(dP * P) (the same sum, in VMEM).
      ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
      t_dq = c.bmm(ds, kh, cd) * scale
      t_dk = c.bmm_tn(ds, _only_head(q, w0, lo, hi), cd) * scale
      dq, dk, dv = ((t_dq, t_dk, t_dv) if dq is None else
                    (dq + t_dq, dk + t_dk, dv + t_dv))
    for r, x in ((dq_sc, dq), (dk_sc, dk), (dv_sc, dv)):
      _store(r, win, x, acc)
  dwo_ref[...] += c.mm_tn(_rows(o_ref[...]), dout, cd)                # [A, D]
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
  """A whole array every step: Pallas single-buffers such a block (its window is trivial)."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _partial_accumulator(shape):
  """One per-core partial accumulator [parts, *shape] (see common.partial_spec), single-
  buffered: it is written back only when the partial changes, and two fp32 copies of
  the four weight gradients (9 MiB at D = A = 768) do not fit v5p's budget in fp32."""
  shape = tuple(shape)
  return pl.BlockSpec((pl.Squeezed(),) + shape, lambda p, *_: (p,) + (0,) * len(shape),
                      pipeline_mode=pl.Buffered(1))


def _kw(st: _Static):
  return dict(num_heads=st.num_heads, dh=st.head_dim, scale=st.scale, m=st.m,
              residual=st.residual)


def _scratch(bb, m_pad, a, cd, n_cd, n_f32):
  return ([pltpu.VMEM((bb, m_pad, a), cd) for _ in range(n_cd)]
          + [pltpu.VMEM((bb, m_pad, a), f32) for _ in range(n_f32)])


def _fwd_call(z, params, st: _Static, save: bool):
  """out [Bp, Mp, D]; with `save` also q, k, v (compute dtype) and o for the backward."""
  bsz, m_pad, d = z.shape
  bb = st.bs.block_b
  a = st.num_heads * st.head_dim
  zspec = pl.BlockSpec((bb, m_pad, d), lambda i: (i, 0, 0))
  h = st.num_heads
  rspec = pl.BlockSpec((bb, m_pad, a), lambda i: (i, 0, 0))
  pspec = pl.BlockSpec((bb, h, m_pad, m_pad), lambda i: (i, 0, 0, 0))
  rows = jax.ShapeDtypeStruct((bsz, m_pad, a), z.dtype)
  probs = jax.ShapeDtypeStruct((bsz, h, m_pad, m_pad), z.dtype)
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, **_kw(st)), grid=(bsz // bb,),
      in_specs=[zspec] + [_full(p.shape) for p in params],
      out_specs=[zspec] + ([rspec] * 4 + [pspec]) * save,
      out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype)] + ([rows] * 4 + [probs]) * save,
      scratch_shapes=_scratch(bb, m_pad, a, z.dtype, 3, 1),
      compiler_params=c.compiler_params("parallel"),
      interpret=st.interpret, name="rin_latent_attn_fwd",
  )(z, *params)
  return outs if save else outs[0]


def _bwd_call(z, dout, saved, params, st: _Static):
  """z, dout, saved q/k/v/o with the batch padded to parts * per * block_b."""
  bsz, m_pad, d = z.shape
  bb, parts = st.bs.block_b, st.bs.num_partials
  per = bsz // (bb * parts)
  a = st.num_heads * st.head_dim
  zspec = pl.BlockSpec((bb, m_pad, d), lambda p, i: (p * per + i, 0, 0))
  rspec = pl.BlockSpec((bb, m_pad, a), lambda p, i: (p * per + i, 0, 0))
  pspec = pl.BlockSpec((bb, st.num_heads, m_pad, m_pad), lambda p, i: (p * per + i, 0, 0, 0))
  g, b, wq, _, wk, _, wv, _, wo, _ = params        # the biases are in q, k, v already
  ins = (g, b, wq, wk, wv, wo)
  grad_shapes = [p.shape for p in params]
  dz, *grads = pl.pallas_call(
      functools.partial(_bwd_kernel, **_kw(st)), grid=(parts, per),
      in_specs=[zspec, zspec] + [rspec] * 4 + [pspec] + [_full(p.shape) for p in ins],
      out_specs=[zspec] + [_partial_accumulator(s) for s in grad_shapes],
      out_shape=[jax.ShapeDtypeStruct(z.shape, z.dtype)]
      + [jax.ShapeDtypeStruct((parts,) + s, f32) for s in grad_shapes],
      scratch_shapes=_scratch(bb, m_pad, a, z.dtype, 1, 3),
      compiler_params=c.compiler_params("parallel", "arbitrary"),
      interpret=st.interpret, name="rin_latent_attn_bwd",
  )(z, dout, *saved, *ins)
  # Per-partial sums over the small leading axis (a reshape when there is one partial).
  return dz, [g_[0] if parts == 1 else jnp.sum(g_, axis=0) for g_ in grads]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _latent_core(z, params, st: _Static):
  return _fwd_call(z, params, st, save=False)


def _latent_core_fwd(z, params, st: _Static):
  out, *saved = _fwd_call(z, params, st, save=True)
  return out, (z, tuple(saved), params)


def _latent_core_bwd(st: _Static, res, dout):
  z, saved, params = res
  bsz = z.shape[0]
  bb, parts = st.bs.block_b, st.bs.num_partials
  nblocks = -(-bsz // bb)
  parts = min(parts, nblocks)
  per = -(-nblocks // parts)
  st = dataclasses.replace(st, bs=LatentBlockSizes(bb, parts))
  # A batch the partials and blocks do not divide is zero-padded: a zero cotangent (and
  # so zero dO, dS, dQ, dK, dV) adds exact zeros to every weight gradient.
  pad = lambda x: c.pad_axis(x, 0, parts * per * bb)
  dz, grads = _bwd_call(pad(z), pad(dout.astype(z.dtype)), tuple(pad(x) for x in saved),
                        params, st)
  return dz[:bsz], tuple(g_.astype(p.dtype) for g_, p in zip(grads, params))


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
  est = lambda bb: vmem_estimate(bb, m_pad, d, num_heads, dh, cd)
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
