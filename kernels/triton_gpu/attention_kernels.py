"""Triton kernels for multi-head cross-attention, layout [batch, seq, heads, head_dim].

All sizes and strides are `tl.constexpr`: every call site has static shapes (JAX
traces them), and static strides let Triton prove alignment and vectorise loads.
Head dims are padded to `D_PAD` (a power of two >= 16) and masked; sequence
lengths are masked, so callers never pad.

Kernels (grid axes in brackets):
  _attn_fwd_kernel       [q blocks, batch*heads, kv splits]  online softmax over one key
                         range; writes the final output (1 split) or fp32 partials (o, lse).
  _attn_combine_kernel   [q blocks, batch*heads]  merges the kv-split partials:
                         o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s.
  _attn_bwd_delta_kernel [q blocks, batch*heads]  delta = rowsum(dO * O).
  _attn_bwd_dkdv_kernel  [k blocks, batch*heads, q splits]  dK, dV for one key block,
                         summed over one range of query blocks.
  _attn_bwd_dq_kernel    [q blocks, batch*heads, kv splits]  dQ for one query block,
                         summed over one range of key blocks.
Split partials (forward, dK/dV, dQ) make few-query (read) or few-key (write)
problems still fill all SMs. Both backward kernels recompute a tile's probabilities
with one `@triton.jit` helper, `_attn_bwd_p`, and its dS with `_attn_bwd_ds` (inlined
by Triton; interpreted alongside the kernels on CPU, see launch.interpreted).
"""
import triton
import triton.language as tl


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, IEEE: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  pid_s = tl.program_id(2)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  d_mask = offs_d < DH
  row = H * DH  # stride of the sequence axis
  q_base = q_ptr + b * LQ * row + h * DH
  kv_off = b * LK * row + h * DH
  q = tl.load(q_base + offs_m[:, None] * row + offs_d[None, :],
              mask=m_mask[:, None] & d_mask[None, :], other=0.0)

  m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
  l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
  acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  start = pid_s * SPLIT_LEN
  stop = tl.minimum(start + SPLIT_LEN, LK)
  for n0 in range(start, stop, BLOCK_N):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < stop
    kv_idx = offs_n[:, None] * row + offs_d[None, :]
    kv_m = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_off + kv_idx, mask=kv_m, other=0.0)
    v = tl.load(v_ptr + kv_off + kv_idx, mask=kv_m, other=0.0)
    if IEEE:
      s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
      s = tl.dot(q, tl.trans(k))
    s = tl.where(n_mask[None, :], s * SCALE, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
      pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
      pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    m_i = m_new

  acc = acc / l_i[:, None]
  lse = m_i + tl.log(l_i)
  # o: [splits, B, LQ, H, DH]; lse: [splits, B, H, LQ] (splits = 1 for the final output).
  o_off = (pid_s * B + b) * LQ * row + h * DH
  tl.store(o_ptr + o_off + offs_m[:, None] * row + offs_d[None, :],
           acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
  lse_off = (pid_s * B * H + pid_bh) * LQ
  tl.store(lse_ptr + lse_off + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_combine_kernel(
    o_part_ptr, lse_part_ptr, o_ptr, lse_ptr,
    SPLITS: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  md_mask = m_mask[:, None] & (offs_d < DH)[None, :]
  row = H * DH
  m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
  for s in range(SPLITS):
    lse_s = tl.load(lse_part_ptr + (s * B * H + pid_bh) * LQ + offs_m, mask=m_mask, other=0.0)
    m = tl.maximum(m, lse_s)
  denom = tl.zeros([BLOCK_M], dtype=tl.float32)
  acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  for s in range(SPLITS):
    lse_s = tl.load(lse_part_ptr + (s * B * H + pid_bh) * LQ + offs_m, mask=m_mask, other=0.0)
    w = tl.exp(lse_s - m)
    o_s = tl.load(o_part_ptr + (s * B + b) * LQ * row + h * DH
                  + offs_m[:, None] * row + offs_d[None, :], mask=md_mask, other=0.0)
    acc += w[:, None] * o_s
    denom += w
  acc = acc / denom[:, None]
  tl.store(o_ptr + b * LQ * row + h * DH + offs_m[:, None] * row + offs_d[None, :],
           acc.to(o_ptr.dtype.element_ty), mask=md_mask)
  tl.store(lse_ptr + pid_bh * LQ + offs_m, m + tl.log(denom), mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    H: tl.constexpr, LQ: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  md_mask = m_mask[:, None] & (offs_d < DH)[None, :]
  row = H * DH
  idx = b * LQ * row + h * DH + offs_m[:, None] * row + offs_d[None, :]
  o = tl.load(o_ptr + idx, mask=md_mask, other=0.0).to(tl.float32)
  do = tl.load(do_ptr + idx, mask=md_mask, other=0.0).to(tl.float32)
  tl.store(delta_ptr + pid_bh * LQ + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE: tl.constexpr, IEEE: tl.constexpr):
  """Recomputed probabilities of one [BLOCK_M, BLOCK_N] tile for the backward kernels:
  p = exp(q k^T * SCALE - lse), 0 outside the valid rows m_mask and columns n_mask."""
  if IEEE:
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
  else:
    s = tl.dot(q, tl.trans(k)) * SCALE
  p = tl.exp(s - lse[:, None])
  return tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)


@triton.jit
def _attn_bwd_ds(p, do, v, delta, IEEE: tl.constexpr):
  """ds = p * (dO v^T - delta): the gradient w.r.t. the scaled scores of one tile
  (the kernels apply SCALE once, to the accumulated dK / dQ)."""
  if IEEE:
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
  else:
    dp = tl.dot(do, tl.trans(v))
  return p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, IEEE: tl.constexpr,
):
  pid_n = tl.program_id(0)
  pid_bh = tl.program_id(1)
  pid_s = tl.program_id(2)
  b = pid_bh // H
  h = pid_bh % H
  row = H * DH
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D_PAD)
  n_mask = offs_n < LK
  d_mask = offs_d < DH
  nd_mask = n_mask[:, None] & d_mask[None, :]
  kv_idx = b * LK * row + h * DH + offs_n[:, None] * row + offs_d[None, :]
  k = tl.load(k_ptr + kv_idx, mask=nd_mask, other=0.0)
  v = tl.load(v_ptr + kv_idx, mask=nd_mask, other=0.0)
  dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  q_base = b * LQ * row + h * DH
  start = pid_s * SPLIT_LEN
  stop = tl.minimum(start + SPLIT_LEN, LQ)
  for m0 in range(start, stop, BLOCK_M):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < stop
    md_mask = m_mask[:, None] & d_mask[None, :]
    q_idx = q_base + offs_m[:, None] * row + offs_d[None, :]
    q = tl.load(q_ptr + q_idx, mask=md_mask, other=0.0)
    do = tl.load(do_ptr + q_idx, mask=md_mask, other=0.0)
    lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
    p = _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE, IEEE)
    if IEEE:
      dv += tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee")
    else:
      dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = _attn_bwd_ds(p, do, v, delta, IEEE)
    if IEEE:
      dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee")
    else:
      dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
  # dk, dv: [splits, B, LK, H, DH]
  out_idx = (pid_s * B + b) * LK * row + h * DH + offs_n[:, None] * row + offs_d[None, :]
  tl.store(dk_ptr + out_idx, (dk * SCALE).to(dk_ptr.dtype.element_ty), mask=nd_mask)
  tl.store(dv_ptr + out_idx, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, IEEE: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  pid_s = tl.program_id(2)
  b = pid_bh // H
  h = pid_bh % H
  row = H * DH
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  d_mask = offs_d < DH
  md_mask = m_mask[:, None] & d_mask[None, :]
  q_idx = b * LQ * row + h * DH + offs_m[:, None] * row + offs_d[None, :]
  q = tl.load(q_ptr + q_idx, mask=md_mask, other=0.0)
  do = tl.load(do_ptr + q_idx, mask=md_mask, other=0.0)
  lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
  delta = tl.load(delta_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
  dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  kv_base = b * LK * row + h * DH
  start = pid_s * SPLIT_LEN
  stop = tl.minimum(start + SPLIT_LEN, LK)
  for n0 in range(start, stop, BLOCK_N):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < stop
    kv_m = n_mask[:, None] & d_mask[None, :]
    kv_idx = kv_base + offs_n[:, None] * row + offs_d[None, :]
    k = tl.load(k_ptr + kv_idx, mask=kv_m, other=0.0)
    v = tl.load(v_ptr + kv_idx, mask=kv_m, other=0.0)
    p = _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE, IEEE)
    ds = _attn_bwd_ds(p, do, v, delta, IEEE)
    if IEEE:
      dq += tl.dot(ds, k.to(tl.float32), input_precision="ieee")
    else:
      dq += tl.dot(ds.to(k.dtype), k)
  # dq: [splits, B, LQ, H, DH]
  out_idx = (pid_s * B + b) * LQ * row + h * DH + offs_m[:, None] * row + offs_d[None, :]
  tl.store(dq_ptr + out_idx, (dq * SCALE).to(dq_ptr.dtype.element_ty), mask=md_mask)
