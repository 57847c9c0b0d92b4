"""Flash cross-attention for TPU (Pallas / Mosaic), forward and backward.

Public layout [batch, seq, heads, head_dim]; the kernels run on [batch, heads,
seq, head_dim] (one transpose each way in XLA). One forward kernel serves both
directions of RIN, the direction being a choice of key block:

* read (latents <- interface: few queries, many keys): the keys are streamed in
  `block_k` blocks over the innermost, "arbitrary" grid axis with the running
  max / sum / output in VMEM scratch (fp32 online softmax);
* write (interface <- latents: many queries, few keys): `block_k` covers all the
  keys, so the whole K/V of a head sits in VMEM and the queries are visited once.

Each grid step handles `block_h` heads of one batch element at once (batched
matmuls over the head block): with head_dim 32 and 128 latents one head is a few
MFLOP, and a grid of one (batch, head) per step is dominated by per-step overhead.

The backward is two kernels (a dK/dV pass that streams query blocks and a dQ
pass that streams key blocks) using the log-sum-exp saved by the forward.
Any lengths: sequences are zero-padded to whole blocks and padded keys masked.
Head dims <= 128 are used as is; larger ones are zero-padded to 128k.
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
# Default cap on one grid step's fp32 scores (block_h x block_q x block_k elements): 4 MiB,
# a few such temporaries fit the VMEM budget of every generation.
SCORES_PER_STEP = 1 << 20


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tiling of cross_attention. None fields take the per-shape default.

  block_q: query rows per grid step, a multiple of 8.
  block_k: keys per grid step, a multiple of 128 (the scores' lane axis). When it
    covers all keys the kernel is single-pass (write direction).
  block_h: heads per grid step, a divisor of the head count (default: the largest whose
    [block_h, block_q, block_k] fp32 scores stay within SCORES_PER_STEP elements).
  """
  block_q: int | None = None
  block_k: int | None = None
  block_h: int | None = None

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
    bq = self.block_q or d.block_q
    bk = self.block_k or d.block_k
    return AttentionBlockSizes(min(bq, c.round_up(q_len, 8)), min(bk, c.round_up(kv_len, 128)),
                               self.block_h)

  def with_heads(self, num_heads: int) -> "AttentionBlockSizes":
    """Resolved block_h for `num_heads` heads (after resolve)."""
    if self.block_h is not None:
      if not isinstance(self.block_h, int) or self.block_h < 1 or num_heads % self.block_h:
        raise ValueError(f"block_sizes.block_h={self.block_h!r} must be a positive divisor of "
                         f"the number of heads {num_heads}; got {self}")
      return self
    per_head = self.block_q * self.block_k
    hb = max([h for h in range(1, num_heads + 1)
              if num_heads % h == 0 and h * per_head <= SCORES_PER_STEP] or [1])
    return dataclasses.replace(self, block_h=hb)


def vmem_estimate(bs: AttentionBlockSizes, head_dim: int, dtype) -> int:
  bq, bk, d, hb = bs.block_q, bs.block_k, head_dim, bs.block_h or 1
  v = lambda shape, dt: hb * c.vmem_bytes(shape, dt)
  f32 = jnp.float32
  scores = 4 * v((bq, bk), f32)
  fwd = (2 * (2 * v((bq, d), dtype) + 2 * v((bk, d), dtype) + v((bq, 1), f32))
         + v((bq, d), f32) + 2 * v((bq, 1), f32) + scores)
  dkv = (2 * (2 * v((bq, d), dtype) + 2 * v((bk, d), dtype) + 2 * v((bq, 1), f32)
              + 2 * v((bk, d), dtype)) + 2 * v((bk, d), f32) + scores)
  dq = (2 * (2 * v((bq, d), dtype) + 2 * v((bk, d), dtype) + 2 * v((bq, 1), f32)
             + v((bq, d), dtype)) + v((bq, d), f32) + scores)
  return max(fwd, dkv, dq)


# ----------------------------------------------------------------------------
# Kernels. Refs carry a leading batch block dim of 1, then block_h heads.
# ----------------------------------------------------------------------------

def _key_mask(s, kv_step, block_k, kv_len):
  col = kv_step * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
  return col < kv_len


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                scale, kv_len, block_k, mask_keys):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, c.NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  q, k, v = q_ref[0], k_ref[0], v_ref[0]
  s = c.bmm_nt(q, k, q.dtype) * scale                      # [bq, bk] fp32
  if mask_keys:
    s = jnp.where(_key_mask(s, j, block_k, kv_len), s, c.NEG)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  alpha = jnp.exp(m_prev - m_new)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + c.bmm(p, v, v.dtype)
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[0] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[0] = m_sc[...] + jnp.log(l)


def _probs(q, k, lse, kv_step, *, scale, kv_len, block_k, mask_keys):
  s = c.bmm_nt(q, k, q.dtype) * scale
  p = jnp.exp(s - lse)
  if mask_keys:
    p = jnp.where(_key_mask(s, kv_step, block_k, kv_len), p, 0.0)
  return p


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale, kv_len, block_k, mask_keys):
  j, i = pl.program_id(2), pl.program_id(3)   # key block, query block (streamed)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]
  p = _probs(q, k, lse_ref[0], j, scale=scale, kv_len=kv_len, block_k=block_k,
             mask_keys=mask_keys)
  dv_sc[...] += c.bmm_tn(p, do, do.dtype)                  # [bk, d]
  dp = c.bmm_nt(do, v, do.dtype)                           # [bq, bk]
  ds = p * (dp - delta_ref[0])
  dk_sc[...] += c.bmm_tn(ds, q, q.dtype) * scale

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[0] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               scale, kv_len, block_k, mask_keys):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]
  p = _probs(q, k, lse_ref[0], j, scale=scale, kv_len=kv_len, block_k=block_k,
             mask_keys=mask_keys)
  dp = c.bmm_nt(do, v, do.dtype)
  ds = p * (dp - delta_ref[0])
  dq_sc[...] += c.bmm(ds, k, k.dtype) * scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[0] = dq_sc[...].astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded [B, H, L, D] arrays.
# ----------------------------------------------------------------------------

def _specs(bs, d, order):
  """q-, k- and lse-block specs; order "qk": grid (b, head block, q block, k block),
  "kq": (b, head block, k block, q block)."""
  bq, bk, hb = bs.block_q, bs.block_k, bs.block_h
  if order == "qk":
    qi = lambda b_, h_, i, j: (b_, h_, i, 0)
    ki = lambda b_, h_, i, j: (b_, h_, j, 0)
  else:
    qi = lambda b_, h_, j, i: (b_, h_, i, 0)
    ki = lambda b_, h_, j, i: (b_, h_, j, 0)
  return (pl.BlockSpec((1, hb, bq, d), qi), pl.BlockSpec((1, hb, bk, d), ki),
          pl.BlockSpec((1, hb, bq, 1), qi))


def _fwd_call(q, k, v, *, scale, kv_len, bs, interpret):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, hb = bs.block_q, bs.block_k, bs.block_h
  qspec, kspec, lspec = _specs(bs, d, "qk")
  kernel = functools.partial(_fwd_kernel, scale=scale, kv_len=kv_len, block_k=bk,
                             mask_keys=kv_len != lk)
  return pl.pallas_call(
      kernel,
      grid=(b, h // hb, lq // bq, lk // bk),
      in_specs=[qspec, kspec, kspec],
      out_specs=[qspec, lspec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
      scratch_shapes=[c.pltpu.VMEM((hb, bq, 1), jnp.float32),
                      c.pltpu.VMEM((hb, bq, 1), jnp.float32),
                      c.pltpu.VMEM((hb, bq, d), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_fwd",
  )(q, k, v)


def _bwd_call(q, k, v, do, lse, delta, *, scale, kv_len, bs, interpret):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  bq, bk, hb = bs.block_q, bs.block_k, bs.block_h
  kw = dict(scale=scale, kv_len=kv_len, block_k=bk, mask_keys=kv_len != lk)
  # dK/dV: grid (b, head block, key block, query block), query blocks streamed.
  qspec, kspec, lspec = _specs(bs, d, "kq")
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kw),
      grid=(b, h // hb, lk // bk, lq // bq),
      in_specs=[qspec, kspec, kspec, qspec, lspec, lspec],
      out_specs=[kspec, kspec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[c.pltpu.VMEM((hb, bk, d), jnp.float32),
                      c.pltpu.VMEM((hb, bk, d), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_dkv",
  )(q, k, v, do, lse, delta)
  # dQ: grid (b, head block, query block, key block), key blocks streamed.
  qspec, kspec, lspec = _specs(bs, d, "qk")
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw),
      grid=(b, h // hb, lq // bq, lk // bk),
      in_specs=[qspec, kspec, kspec, qspec, lspec, lspec],
      out_specs=qspec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[c.pltpu.VMEM((hb, bq, d), jnp.float32)],
      compiler_params=c.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="rin_attention_dq",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp over the public layout.
# ----------------------------------------------------------------------------

def _to_kernel_layout(x, length, dim):
  x = jnp.swapaxes(x, 1, 2)                       # [B, H, L, D]
  return c.pad_axis(c.pad_axis(x, 2, length), 3, dim)


def _from_kernel_layout(x, length, dim):
  return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


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
  o, lse = _fwd_call(qk, kk, vk, scale=st.scale, kv_len=st.kv_len, bs=st.bs,
                     interpret=st.interpret)
  return _from_kernel_layout(o, st.q_len, st.head_dim), (qk, kk, vk, o, lse)


def _attention_bwd(st: _Static, res, g):
  qk, kk, vk, o, lse = res
  lq_p, _, d_p = st.shapes
  do = _to_kernel_layout(g, lq_p, d_p).astype(qk.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = _bwd_call(qk, kk, vk, do, lse, delta, scale=st.scale, kv_len=st.kv_len,
                         bs=st.bs, interpret=st.interpret)
  return (_from_kernel_layout(dq, st.q_len, st.head_dim),
          _from_kernel_layout(dk, st.kv_len, st.head_dim),
          _from_kernel_layout(dv, st.kv_len, st.head_dim))


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention(q, k, v, *, scale=None, interpret=False, block_sizes=None):
  """softmax(q k^T * scale) v on [batch, seq, heads, head_dim] (see module doc)."""
  block_sizes = c.op_block_sizes(block_sizes, "attention", AttentionBlockSizes)
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
  bs = block_sizes.resolve(q_len, kv_len).with_heads(q.shape[2])
  c.check_vmem("pallas_tpu.cross_attention", vmem_estimate(bs, c.padded_head_dim(head_dim),
                                                           q.dtype), bs)
  scale = float(head_dim ** -0.5 if scale is None else scale)
  st = _Static(scale, bs, interpret, q_len, kv_len, head_dim)
  return _attention(q, k, v, st)
