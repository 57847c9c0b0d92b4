"""Flash cross-attention for TPU (Pallas / Mosaic), forward and backward.

Public layout [batch, seq, heads, head_dim]; the kernels take q, k, v, dO as [batch,
heads, seq, head_dim] (one transpose each way in XLA). One forward kernel serves both
directions of RIN, the direction being a choice of key block:

* read (latents <- interface: few queries, many keys): the keys are streamed in
  `block_k` blocks over the innermost, "arbitrary" grid axis with the running
  max / sum / output in VMEM scratch (fp32 online softmax);
* write (interface <- latents: many queries, few keys): `block_k` covers all the
  keys, so the whole K/V of a head sits in VMEM and the queries are visited once.

Grid steps: each handles `block_b` batch elements x `block_h` heads at once (batched
matmuls over the G = block_b * block_h pairs). With head_dim 32 and 128 latents one
(batch, head) pair is ~2 MFLOP, far less than the ~600-cycle fixed cost of a grid
step; the default packs pairs until a step holds ~2^19 fp32 scores (see
AttentionBlockSizes).

Scores are held transposed, s^T = k q^T of shape [G, block_k, block_q]: queries lie
on the 128 lanes, keys on the sublanes. Then every per-query row statistic (running
max m, sum l, log-sum-exp, delta = rowsum(dO * O)) is a lane-dense [G, 1, block_q]
row, stored in HBM as [B, H, 1, Lq] (4 bytes a query), the softmax reductions run
over sublanes, and the output accumulates as O^T = V^T P^T [G, head_dim, block_q],
whose matmul has head_dim (32) as its streamed dimension instead of its output width.
O and dQ leave the kernels as [B, H, head_dim, Lq]; XLA's layout transpose back to
[B, Lq, H, D] takes them from there at the cost of the one it replaces.

The backward is two kernels (a dK/dV pass that streams query blocks and a dQ pass
that streams key blocks) using the log-sum-exp saved by the forward. Both TensorCores
of a megacore chip: the only accumulations are dK/dV over the query blocks and dQ
over the key blocks, each into its own output tile, with the batch/head/tile axes
before them "parallel"; no partial sums cross a parallel axis, so none is needed.
Any lengths: sequences are zero-padded to whole blocks and padded keys masked (padded
queries are independent lanes, sliced off). Head dims <= 128 are used as is; larger
ones are zero-padded to 128k.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.pallas_tpu import common as c

# Keys up to this many (after padding to 128) are held whole in VMEM (one pass).
SINGLE_PASS_MAX_KEYS = 2048
# Cap on one grid step's fp32 scores (block_b x block_h x block_q x block_k elements):
# 4 MiB, a few such temporaries fit the VMEM budget of every generation.
SCORES_PER_STEP = 1 << 20
# Default work per grid step, in fp32 scores: the static LLO profile (v5e) puts one
# CIFAR-10 latent self-attention forward step of 16 heads x 128 x 128 (2^18 scores) at
# ~5.4k cycles, of which ~600 are the fixed per-step cost; 2^19 brings that to ~5%.
SCORES_TARGET = 1 << 19


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tiling of cross_attention. None fields take the per-shape default.

  block_q: queries per grid step, a multiple of 8; a multiple of 128 when it does not
    cover all the queries (queries lie on the lanes of the scores and of the O, dQ and
    log-sum-exp blocks).
  block_k: keys per grid step, a multiple of 128. When it covers all keys the kernel is
    single-pass (write direction).
  block_h: heads per grid step, a divisor of the head count (default: the most whose
    [block_h, block_q, block_k] fp32 scores stay within SCORES_PER_STEP elements).
  block_b: batch elements per grid step, a divisor of the batch (default: the most that
    keep the step's scores within SCORES_TARGET, leaving >= 2 parallel grid steps
    whenever the batch allows, one per TensorCore of a megacore chip).
  """
  block_q: int | None = None
  block_k: int | None = None
  block_h: int | None = None
  block_b: int | None = None

  @classmethod
  def default(cls, q_len: int, kv_len: int) -> "AttentionBlockSizes":
    kv_pad = c.round_up(kv_len, 128)
    block_k = kv_pad if kv_pad <= SINGLE_PASS_MAX_KEYS else 512
    block_q = min(c.round_up(q_len, 8), 512 if block_k <= 512 else 256)
    return cls(block_q=block_q, block_k=block_k)

  def resolve(self, q_len: int, kv_len: int) -> "AttentionBlockSizes":
    c.check_block("block_q", self.block_q, 8, self)
    c.check_block("block_k", self.block_k, 128, self)
    d = self.default(q_len, kv_len)
    bq = min(self.block_q or d.block_q, c.round_up(q_len, 8))
    bk = min(self.block_k or d.block_k, c.round_up(kv_len, 128))
    if bq < c.round_up(q_len, 8) and bq % 128:
      raise ValueError(
          f"block_sizes.block_q={self.block_q!r} must be a multiple of 128 when it does not "
          f"cover all {q_len} queries (queries lie on the 128 lanes of the score, output "
          f"and log-sum-exp blocks); got {self}")
    return dataclasses.replace(self, block_q=bq, block_k=bk)

  def with_heads(self, num_heads: int, fits=lambda bs: True) -> "AttentionBlockSizes":
    """Resolved block_h for `num_heads` heads (after resolve); fits(bs): whether a
    candidate (with one batch element a step) fits the VMEM budget."""
    if self.block_h is not None:
      if not isinstance(self.block_h, int) or self.block_h < 1 or num_heads % self.block_h:
        raise ValueError(f"block_sizes.block_h={self.block_h!r} must be a positive divisor of "
                         f"the number of heads {num_heads}; got {self}")
      return self
    per_head = self.block_q * self.block_k
    hb = max([h for h in range(1, num_heads + 1)
              if num_heads % h == 0 and h * per_head <= SCORES_PER_STEP
              and fits(dataclasses.replace(self, block_h=h, block_b=self.block_b or 1))]
             or [1])
    return dataclasses.replace(self, block_h=hb)

  def with_batch(self, batch: int, num_heads: int, q_blocks: int,
                 fits=lambda bs: True) -> "AttentionBlockSizes":
    """Resolved block_b for `batch` (after with_heads); q_blocks: query blocks per head;
    fits(bs): whether a candidate fits the VMEM budget (the default only picks those)."""
    if self.block_b is not None:
      if not isinstance(self.block_b, int) or self.block_b < 1 or batch % self.block_b:
        raise ValueError(f"block_sizes.block_b={self.block_b!r} must be a positive divisor of "
                         f"the batch {batch}; got {self}")
      return self
    # Work per step counted in vregs: queries lie on lanes, so a block of 64 queries
    # costs as much vector work as one of 128.
    per_b = self.block_h * c.round_up(self.block_q, 128) * self.block_k
    other = (num_heads // self.block_h) * q_blocks       # parallel steps per batch block

    def ok(b):
      return (batch % b == 0 and b * per_b <= SCORES_TARGET
              and ((batch // b) * other >= 2 or batch * other < 2)
              and fits(dataclasses.replace(self, block_b=b)))
    return dataclasses.replace(self, block_b=max([b for b in range(1, batch + 1) if ok(b)]
                                                 or [1]))


def vmem_estimate(bs: AttentionBlockSizes, head_dim: int, dtype) -> int:
  bq, bk, d = bs.block_q, bs.block_k, head_dim
  g = (bs.block_h or 1) * (bs.block_b or 1)
  v = lambda shape, dt: g * c.vmem_bytes(shape, dt)
  f32 = jnp.float32
  scores = 4 * v((bk, bq), f32)
  row = v((1, bq), f32)
  # Inputs and outputs double-buffered; then scratch and score temporaries.
  fwd = (2 * (v((bq, d), dtype) + 2 * v((bk, d), dtype) + v((d, bq), dtype) + row)
         + v((d, bq), f32) + 2 * row + scores)
  dkv = (2 * (2 * v((bq, d), dtype) + 2 * v((bk, d), dtype) + 2 * row
              + 2 * v((bk, d), dtype)) + 2 * v((bk, d), f32) + scores)
  dq = (2 * (2 * v((bq, d), dtype) + 2 * v((bk, d), dtype) + 2 * row
             + v((d, bq), dtype)) + v((d, bq), f32) + scores)
  return max(fwd, dkv, dq)


# ----------------------------------------------------------------------------
# Kernels. Refs are [block_b, block_h, ...]; each kernel folds the two into one batch
# axis of G pairs for its batched matmuls (a free reshape: the tiled last two dims stay).
# ----------------------------------------------------------------------------

def _g(ref):
  x = ref[...]
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _put(ref, x):
  ref[...] = x.reshape(ref.shape).astype(ref.dtype)


def _key_mask(kv_step, block_k, block_q, kv_len):
  """[block_k, block_q]: True where the key (sublane) index is a real key."""
  row = kv_step * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
  return row < kv_len


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                scale, kv_len, block_k, mask_keys):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, c.NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  q, k, v = _g(q_ref), _g(k_ref), _g(v_ref)
  st = c.bmm_nt(k, q, q.dtype) * scale                     # [G, bk, bq] fp32
  if mask_keys:
    st = jnp.where(_key_mask(j, block_k, st.shape[2], kv_len)[None], st, c.NEG)
  m_prev = m_sc[...]                                        # [G, 1, bq]
  m_new = jnp.maximum(m_prev, jnp.max(st, axis=1, keepdims=True))
  pt = jnp.exp(st - m_new)
  alpha = jnp.exp(m_prev - m_new)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(pt, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + c.bmm_tn(v, pt, v.dtype)   # O^T += V^T P^T: [G, d, bq]
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    _put(o_ref, acc_sc[...] / l)
    _put(lse_ref, m_sc[...] + jnp.log(l))


def _probs_t(q, k, lse, kv_step, *, scale, kv_len, block_k, mask_keys):
  """P^T [G, bk, bq] from the saved log-sum-exp row [G, 1, bq]."""
  pt = jnp.exp(c.bmm_nt(k, q, q.dtype) * scale - lse)
  if mask_keys:
    pt = jnp.where(_key_mask(kv_step, block_k, pt.shape[2], kv_len)[None], pt, 0.0)
  return pt


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale, kv_len, block_k, mask_keys):
  j, i = pl.program_id(2), pl.program_id(3)   # key block, query block (streamed)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  q, k, v, do = _g(q_ref), _g(k_ref), _g(v_ref), _g(do_ref)
  pt = _probs_t(q, k, _g(lse_ref), j, scale=scale, kv_len=kv_len, block_k=block_k,
                mask_keys=mask_keys)
  dv_sc[...] += c.bmm(pt, do, do.dtype)                    # [G, bk, d]
  dpt = c.bmm_nt(v, do, do.dtype)                          # (dO V^T)^T: [G, bk, bq]
  dst = pt * (dpt - _g(delta_ref))
  dk_sc[...] += c.bmm(dst, q, q.dtype) * scale

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    _put(dk_ref, dk_sc[...])
    _put(dv_ref, dv_sc[...])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               scale, kv_len, block_k, mask_keys):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  q, k, v, do = _g(q_ref), _g(k_ref), _g(v_ref), _g(do_ref)
  pt = _probs_t(q, k, _g(lse_ref), j, scale=scale, kv_len=kv_len, block_k=block_k,
                mask_keys=mask_keys)
  dst = pt * (c.bmm_nt(v, do, do.dtype) - _g(delta_ref))
  dq_sc[...] += c.bmm_tn(k, dst, k.dtype) * scale           # dQ^T = K^T dS^T: [G, d, bq]

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    _put(dq_ref, dq_sc[...])


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: q, k, v, dO [B, H, L, D]; O, dQ [B, H, D, Lq];
# lse, delta [B, H, 1, Lq].
# ----------------------------------------------------------------------------

def _specs(bs, d, order):
  """Block specs (q, k, O^T-like, row); order "qk": grid (batch block, head block,
  q block, k block), "kq": (batch block, head block, k block, q block)."""
  bq, bk, hb, bb = bs.block_q, bs.block_k, bs.block_h, bs.block_b
  if order == "qk":
    qi = lambda b_, h_, i, j: (b_, h_, i, 0)
    ki = lambda b_, h_, i, j: (b_, h_, j, 0)
    ti = lambda b_, h_, i, j: (b_, h_, 0, i)
  else:
    qi = lambda b_, h_, j, i: (b_, h_, i, 0)
    ki = lambda b_, h_, j, i: (b_, h_, j, 0)
    ti = lambda b_, h_, j, i: (b_, h_, 0, i)
  return (pl.BlockSpec((bb, hb, bq, d), qi), pl.BlockSpec((bb, hb, bk, d), ki),
          pl.BlockSpec((bb, hb, d, bq), ti), pl.BlockSpec((bb, hb, 1, bq), ti))


def _fwd_call(q, k, v, *, scale, kv_len, bs, interpret):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, hb, bb = bs.block_q, bs.block_k, bs.block_h, bs.block_b
  g = bb * hb
  qspec, kspec, tspec, rspec = _specs(bs, d, "qk")
  kernel = functools.partial(_fwd_kernel, scale=scale, kv_len=kv_len, block_k=bk,
                             mask_keys=kv_len != lk)
  return pl.pallas_call(
      kernel,
      grid=(b // bb, h // hb, lq // bq, lk // bk),
      in_specs=[qspec, kspec, kspec],
      out_specs=[tspec, rspec],
      out_shape=[jax.ShapeDtypeStruct((b, h, d, lq), q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)],
      scratch_shapes=[c.pltpu.VMEM((g, 1, bq), jnp.float32),
                      c.pltpu.VMEM((g, 1, bq), jnp.float32),
                      c.pltpu.VMEM((g, d, bq), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_fwd",
  )(q, k, v)


def _bwd_call(q, k, v, do, lse, delta, *, scale, kv_len, bs, interpret):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, hb, bb = bs.block_q, bs.block_k, bs.block_h, bs.block_b
  g = bb * hb
  kw = dict(scale=scale, kv_len=kv_len, block_k=bk, mask_keys=kv_len != lk)
  # dK/dV: grid (batch block, head block, key block, query block), query blocks streamed.
  qspec, kspec, _, rspec = _specs(bs, d, "kq")
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kw),
      grid=(b // bb, h // hb, lk // bk, lq // bq),
      in_specs=[qspec, kspec, kspec, qspec, rspec, rspec],
      out_specs=[kspec, kspec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[c.pltpu.VMEM((g, bk, d), jnp.float32),
                      c.pltpu.VMEM((g, bk, d), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_dkv",
  )(q, k, v, do, lse, delta)
  # dQ: grid (batch block, head block, query block, key block), key blocks streamed.
  qspec, kspec, tspec, rspec = _specs(bs, d, "qk")
  dq_t = pl.pallas_call(
      functools.partial(_dq_kernel, **kw),
      grid=(b // bb, h // hb, lq // bq, lk // bk),
      in_specs=[qspec, kspec, kspec, qspec, rspec, rspec],
      out_specs=tspec,
      out_shape=jax.ShapeDtypeStruct((b, h, d, lq), q.dtype),
      scratch_shapes=[c.pltpu.VMEM((g, d, bq), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_dq",
  )(q, k, v, do, lse, delta)
  return dq_t, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp over the public layout.
# ----------------------------------------------------------------------------

def _to_kernel_layout(x, length, dim):
  x = jnp.swapaxes(x, 1, 2)                       # [B, H, L, D]
  return c.pad_axis(c.pad_axis(x, 2, length), 3, dim)


def _from_kernel_layout(x, length, dim):
  return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


def _from_transposed_layout(x, length, dim):
  """[B, H, D, L] (the kernels' O and dQ) -> [B, L, H, D]."""
  return jnp.transpose(x[:, :, :dim, :length], (0, 3, 1, 2))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: it is a custom_vjp nondiff arg)."""
  scale: float
  bs: AttentionBlockSizes
  interpret: object
  q_len: int
  kv_len: int
  head_dim: int

  @property
  def shapes(self):
    return (c.round_up(self.q_len, self.bs.block_q), c.round_up(self.kv_len, self.bs.block_k),
            c.padded_head_dim(self.head_dim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, st: _Static):
  return _attention_fwd(q, k, v, st)[0]


def _attention_fwd(q, k, v, st: _Static):
  lq_p, lk_p, d_p = st.shapes
  qk, kk, vk = (_to_kernel_layout(a, n, d_p) for a, n in ((q, lq_p), (k, lk_p), (v, lk_p)))
  o_t, lse = _fwd_call(qk, kk, vk, scale=st.scale, kv_len=st.kv_len, bs=st.bs,
                       interpret=st.interpret)
  return _from_transposed_layout(o_t, st.q_len, st.head_dim), (qk, kk, vk, o_t, lse)


def _attention_bwd(st: _Static, res, g):
  qk, kk, vk, o_t, lse = res
  lq_p, _, d_p = st.shapes
  do = _to_kernel_layout(g, lq_p, d_p).astype(qk.dtype)
  # delta = rowsum(dO * O), a lane-dense [B, H, 1, Lq] row like the log-sum-exp.
  delta = jnp.einsum("bhqd,bhdq->bhq", do.astype(jnp.float32), o_t.astype(jnp.float32),
                     precision="highest")[:, :, None, :]
  dq_t, dk, dv = _bwd_call(qk, kk, vk, do, lse, delta, scale=st.scale, kv_len=st.kv_len,
                           bs=st.bs, interpret=st.interpret)
  return (_from_transposed_layout(dq_t, st.q_len, st.head_dim),
          _from_kernel_layout(dk, st.kv_len, st.head_dim),
          _from_kernel_layout(dv, st.kv_len, st.head_dim))


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention(q, k, v, *, scale=None, interpret=False, block_sizes=None):
  """softmax(q k^T * scale) v on [batch, seq, heads, head_dim] (see module doc)."""
  block_sizes = c.op_block_sizes(block_sizes, "attention", AttentionBlockSizes)
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
  d_p = c.padded_head_dim(head_dim)
  budget = c.vmem_limit_bytes()
  fits = lambda b: vmem_estimate(b, d_p, q.dtype) <= budget
  bs = block_sizes.resolve(q_len, kv_len).with_heads(q.shape[2], fits)
  bs = bs.with_batch(q.shape[0], q.shape[2], c.round_up(q_len, bs.block_q) // bs.block_q, fits)
  c.check_vmem("pallas_tpu.cross_attention", vmem_estimate(bs, d_p, q.dtype), bs)
  scale = float(head_dim ** -0.5 if scale is None else scale)
  st = _Static(scale, bs, interpret, q_len, kv_len, head_dim)
  return _attention(q, k, v, st)
