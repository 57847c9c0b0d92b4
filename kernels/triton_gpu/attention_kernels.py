"""Triton kernels for multi-head cross-attention, layout [batch, seq, heads, head_dim].

All sizes are `tl.constexpr`: every call site has static shapes (JAX traces them), and
static strides let Triton prove alignment and vectorise loads. Head dims are padded to
`D_PAD` (a power of two >= 16) and masked; sequence lengths are masked, so callers never
pad.

Kernels (grid axes in brackets):
  _attn_fwd_kernel       [q blocks, batch*heads, kv splits]  softmax over one key range:
                         one pass (no running max / rescale) when the range fits one key
                         tile (ONE_PASS: the write direction, M = 128 latents), else
                         online. Writes the final output (1 split) or fp32 partials.
  _attn_combine_kernel   [q blocks, batch*heads]  merges the kv-split partials:
                         o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s.
  _attn_bwd_delta_kernel [q blocks, batch*heads]  delta = rowsum(dO * O).
  _attn_bwd_dkdv_kernel  [k blocks, batch*heads, q splits]  dK, dV for one key block.
  _attn_bwd_dq_kernel    [q blocks, batch*heads, kv splits]  dQ for one query block.
  _attn_bwd_fused_kernel [1, batch*heads, q splits]  the whole backward (delta, dQ, dK, dV)
                         in one pass when the keys are one tile (latent and write attention:
                         128 keys); the three kernels above otherwise (the read direction).

Numerics: scores are formed in base 2, s2 = (q k^T) * (SCALE * log2 e), so each
exponential is one exp2 with the scale folded into a single multiply; the stored
log-sum-exp `lse` stays in natural-log units (lse = ln 2 * (m2 + log2 l)), which the
combine kernel and the backward use. Dots take PREC as tl.dot's input_precision ("tf32"
or "ieee" for fp32 operands; bf16/fp16 operands are exact either way,
kernels/precision.py), accumulate in fp32.

Addressing: every per-(batch, head, split) base offset is computed in int64, so arrays
beyond 2^31 elements address correctly; the in-tile offsets stay int32 (one batch
element's [L, H*Dh] slab must stay below 2^31 elements, checked in config.attention_plan).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# The forward's softmax steps, shared with the fused read kernel (read_block_kernel.py).

@triton.jit
def masked_scores(q, k, n_mask, SCALE: tl.constexpr, PREC: tl.constexpr):
  """Scores of one [BLOCK_M, BLOCK_N] tile in base 2, s2 = (q k^T) * (SCALE * log2 e),
  -inf on the keys outside n_mask."""
  qk_scale: tl.constexpr = SCALE * LOG2E
  s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
  return tl.where(n_mask[None, :], s, float("-inf"))


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
  """One key tile of the online softmax: the running row max m_i, row sum l_i and
  unnormalised output acc (fp32) rescaled to the new max, then this tile's p v added
  (p in v's dtype, as the tensor-core dot takes it)."""
  m_new = tl.maximum(m_i, tl.max(s, 1))
  p = tl.math.exp2(s - m_new[:, None])
  alpha = tl.math.exp2(m_i - m_new)
  l_i = l_i * alpha + tl.sum(p, 1)
  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
  return m_new, l_i, acc


@triton.jit
def softmax_finish(acc, m_i, l_i):
  """(o, lse): the normalised output and the log-sum-exp in natural-log units."""
  return acc / l_i[:, None], (m_i + tl.math.log2(l_i)) * LN2


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, ONE_PASS: tl.constexpr,
    PREC: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  pid_s = tl.program_id(2).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  d_mask = offs_d < DH
  row: tl.constexpr = H * DH  # stride of the sequence axis
  q_base = q_ptr + b * (LQ * row) + h * DH
  k_base = k_ptr + b * (LK * row) + h * DH
  v_base = v_ptr + b * (LK * row) + h * DH
  q = tl.load(q_base + offs_m[:, None] * row + offs_d[None, :],
              mask=m_mask[:, None] & d_mask[None, :], other=0.0)
  start = (pid_s * SPLIT_LEN).to(tl.int32)
  stop = tl.minimum(start + SPLIT_LEN, LK)

  if ONE_PASS:
    # The whole key range is one tile: exact softmax, no running max or rescale.
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < stop
    kv_idx = offs_n[:, None] * row + offs_d[None, :]
    kv_m = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + kv_idx, mask=kv_m, other=0.0)
    v = tl.load(v_base + kv_idx, mask=kv_m, other=0.0)
    s = masked_scores(q, k, n_mask, SCALE, PREC)
    m_i = tl.max(s, 1)
    p = tl.math.exp2(s - m_i[:, None])
    l_i = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)
  else:
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
      offs_n = n0 + tl.arange(0, BLOCK_N)
      n_mask = offs_n < stop
      kv_idx = offs_n[:, None] * row + offs_d[None, :]
      kv_m = n_mask[:, None] & d_mask[None, :]
      k = tl.load(k_base + kv_idx, mask=kv_m, other=0.0)
      v = tl.load(v_base + kv_idx, mask=kv_m, other=0.0)
      s = masked_scores(q, k, n_mask, SCALE, PREC)
      m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PREC)

  acc, lse = softmax_finish(acc, m_i, l_i)
  # o: [splits, B, LQ, H, DH]; lse: [splits, B, H, LQ] (splits = 1 for the final output).
  o_base = o_ptr + (pid_s * B + b) * (LQ * row) + h * DH
  tl.store(o_base + offs_m[:, None] * row + offs_d[None, :],
           acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
  lse_base = lse_ptr + (pid_s * (B * H) + pid_bh) * LQ
  tl.store(lse_base + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_combine_kernel(
    o_part_ptr, lse_part_ptr, o_ptr, lse_ptr,
    SPLITS: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  md_mask = m_mask[:, None] & (offs_d < DH)[None, :]
  row: tl.constexpr = H * DH
  tile = offs_m[:, None] * row + offs_d[None, :]
  m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
  for s in range(SPLITS):
    lse_s = tl.load(lse_part_ptr + (s * (B * H) + pid_bh) * LQ + offs_m, mask=m_mask,
                    other=0.0)
    m = tl.maximum(m, lse_s)
  denom = tl.zeros([BLOCK_M], dtype=tl.float32)
  acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  for s in range(SPLITS):
    lse_s = tl.load(lse_part_ptr + (s * (B * H) + pid_bh) * LQ + offs_m, mask=m_mask,
                    other=0.0)
    w = tl.math.exp2((lse_s - m) * LOG2E)
    o_s = tl.load(o_part_ptr + (s * B + b) * (LQ * row) + h * DH + tile, mask=md_mask,
                  other=0.0)
    acc += w[:, None] * o_s
    denom += w
  acc = acc / denom[:, None]
  tl.store(o_ptr + b * (LQ * row) + h * DH + tile, acc.to(o_ptr.dtype.element_ty),
           mask=md_mask)
  tl.store(lse_ptr + pid_bh * LQ + offs_m, m + tl.log(denom), mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    H: tl.constexpr, LQ: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  md_mask = m_mask[:, None] & (offs_d < DH)[None, :]
  row: tl.constexpr = H * DH
  base = b * (LQ * row) + h * DH
  idx = offs_m[:, None] * row + offs_d[None, :]
  o = tl.load(o_ptr + base + idx, mask=md_mask, other=0.0).to(tl.float32)
  do = tl.load(do_ptr + base + idx, mask=md_mask, other=0.0).to(tl.float32)
  tl.store(delta_ptr + pid_bh * LQ + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE: tl.constexpr, PREC: tl.constexpr):
  """Recomputed probabilities of one [BLOCK_M, BLOCK_N] tile for the backward kernels:
  p = exp(q k^T * SCALE - lse) as one exp2, 0 outside the valid rows and columns."""
  qk_scale: tl.constexpr = SCALE * LOG2E
  s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
  p = tl.math.exp2(s - (lse * LOG2E)[:, None])
  return tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)


@triton.jit
def _attn_bwd_ds(p, do, v, delta, PREC: tl.constexpr):
  """ds = p * (dO v^T - delta): the gradient w.r.t. the scaled scores of one tile
  (the kernels apply SCALE once, to the accumulated dK / dQ)."""
  dp = tl.dot(do, tl.trans(v), input_precision=PREC)
  return p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, PREC: tl.constexpr,
):
  pid_n = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  pid_s = tl.program_id(2).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  row: tl.constexpr = H * DH
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D_PAD)
  n_mask = offs_n < LK
  d_mask = offs_d < DH
  nd_mask = n_mask[:, None] & d_mask[None, :]
  kv_base = b * (LK * row) + h * DH
  kv_idx = offs_n[:, None] * row + offs_d[None, :]
  k = tl.load(k_ptr + kv_base + kv_idx, mask=nd_mask, other=0.0)
  v = tl.load(v_ptr + kv_base + kv_idx, mask=nd_mask, other=0.0)
  dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  q_base = b * (LQ * row) + h * DH
  stat_base = pid_bh * LQ
  start = (pid_s * SPLIT_LEN).to(tl.int32)
  stop = tl.minimum(start + SPLIT_LEN, LQ)
  for m0 in range(start, stop, BLOCK_M):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < stop
    md_mask = m_mask[:, None] & d_mask[None, :]
    q_idx = offs_m[:, None] * row + offs_d[None, :]
    q = tl.load(q_ptr + q_base + q_idx, mask=md_mask, other=0.0)
    do = tl.load(do_ptr + q_base + q_idx, mask=md_mask, other=0.0)
    lse = tl.load(lse_ptr + stat_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + stat_base + offs_m, mask=m_mask, other=0.0)
    p = _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE, PREC)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = _attn_bwd_ds(p, do, v, delta, PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
  # dk, dv: [splits, B, LK, H, DH]
  out = (pid_s * B + b) * (LK * row) + h * DH + kv_idx
  tl.store(dk_ptr + out, (dk * SCALE).to(dk_ptr.dtype.element_ty), mask=nd_mask)
  tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, PREC: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  pid_s = tl.program_id(2).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  row: tl.constexpr = H * DH
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < LQ
  d_mask = offs_d < DH
  md_mask = m_mask[:, None] & d_mask[None, :]
  q_base = b * (LQ * row) + h * DH
  q_idx = offs_m[:, None] * row + offs_d[None, :]
  q = tl.load(q_ptr + q_base + q_idx, mask=md_mask, other=0.0)
  do = tl.load(do_ptr + q_base + q_idx, mask=md_mask, other=0.0)
  lse = tl.load(lse_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
  delta = tl.load(delta_ptr + pid_bh * LQ + offs_m, mask=m_mask, other=0.0)
  dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  kv_base = b * (LK * row) + h * DH
  start = (pid_s * SPLIT_LEN).to(tl.int32)
  stop = tl.minimum(start + SPLIT_LEN, LK)
  for n0 in range(start, stop, BLOCK_N):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < stop
    kv_m = n_mask[:, None] & d_mask[None, :]
    kv_idx = offs_n[:, None] * row + offs_d[None, :]
    k = tl.load(k_ptr + kv_base + kv_idx, mask=kv_m, other=0.0)
    v = tl.load(v_ptr + kv_base + kv_idx, mask=kv_m, other=0.0)
    p = _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE, PREC)
    ds = _attn_bwd_ds(p, do, v, delta, PREC)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
  # dq: [splits, B, LQ, H, DH]
  out = (pid_s * B + b) * (LQ * row) + h * DH + q_idx
  tl.store(dq_ptr + out, (dq * SCALE).to(dq_ptr.dtype.element_ty), mask=md_mask)


@triton.jit
def _attn_bwd_fused_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, LQ: tl.constexpr,
    LK: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, PREC: tl.constexpr,
):
  """The whole backward of a key range that is one tile (LK <= BLOCK_N: latent and write
  attention, 128 latent keys): per (batch*head, query split) one program keeps K, V and the
  dK, dV accumulators on chip, walks its queries once and computes delta = rowsum(dO * O),
  dQ (complete: every key is in the tile), dK and dV from one load of q, o, dO each. The
  three-kernel path (delta, dK/dV, dQ) reads q, k, v and dO twice and o once more."""
  pid_bh = tl.program_id(1).to(tl.int64)
  pid_s = tl.program_id(2).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  row: tl.constexpr = H * DH
  offs_n = tl.arange(0, BLOCK_N)
  offs_d = tl.arange(0, D_PAD)
  n_mask = offs_n < LK
  d_mask = offs_d < DH
  nd_mask = n_mask[:, None] & d_mask[None, :]
  kv_base = b * (LK * row) + h * DH
  kv_idx = offs_n[:, None] * row + offs_d[None, :]
  k = tl.load(k_ptr + kv_base + kv_idx, mask=nd_mask, other=0.0)
  v = tl.load(v_ptr + kv_base + kv_idx, mask=nd_mask, other=0.0)
  dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
  q_base = b * (LQ * row) + h * DH
  stat_base = pid_bh * LQ
  start = (pid_s * SPLIT_LEN).to(tl.int32)
  stop = tl.minimum(start + SPLIT_LEN, LQ)
  for m0 in range(start, stop, BLOCK_M):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < stop
    md_mask = m_mask[:, None] & d_mask[None, :]
    q_idx = offs_m[:, None] * row + offs_d[None, :]
    q = tl.load(q_ptr + q_base + q_idx, mask=md_mask, other=0.0)
    do = tl.load(do_ptr + q_base + q_idx, mask=md_mask, other=0.0)
    o = tl.load(o_ptr + q_base + q_idx, mask=md_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(lse_ptr + stat_base + offs_m, mask=m_mask, other=0.0)
    p = _attn_bwd_p(q, k, lse, m_mask, n_mask, SCALE, PREC)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = _attn_bwd_ds(p, do, v, delta, PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(dq_ptr + q_base + q_idx, (dq * SCALE).to(dq_ptr.dtype.element_ty), mask=md_mask)
  # dk, dv: [splits, B, LK, H, DH]
  out = (pid_s * B + b) * (LK * row) + h * DH + kv_idx
  tl.store(dk_ptr + out, (dk * SCALE).to(dk_ptr.dtype.element_ty), mask=nd_mask)
  tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)
