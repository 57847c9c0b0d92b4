"""The whole write-block forward as one Triton kernel per interface tile.

    y   = x + MHA(q = LN(x) Wq + bq, k = z Wk + bk, v = z Wv + bv) Wo + bo
    out = y + W2 gelu(LN2(y) W1 + b1) + b2          (the MLP only when HAS_MLP)

K and V (M = 32..512 latent rows, tiny) are projected beforehand by two
`fused_linear` launches (blocks.py); `_write_block_fwd_kernel` then runs on a grid
(cdiv(N, BLOCK_N), B). Each program

  1. loads its [BLOCK_N, T_PAD] interface tile once; acc = x + bo (fp32) and
     xn = LN(x) (operand dtype);
  2. for each head h: q_h = xn @ Wq[:, h] + bq[h]; online softmax over the latents
     in BLOCK_M chunks (fp32, latents past M masked); o_h = p @ v_h / l;
     acc += o_h @ Wo[h, :];
  3. (HAS_MLP) yn = LN2(acc); for each BLOCK_F chunk of the hidden width:
     acc += gelu(yn @ W1[:, f] + b1[f]) @ W2[f, :]; acc += b2;
  4. stores the tile once.

Every matmul accumulates in fp32; fp16/bf16 inputs are fp16/bf16 dot operands (q,
p, o and the GELU output are rounded to the input dtype before their dots, as the
composed path and the reference do); fp32 inputs use IEEE fp32 dots. T, the head
dim, M and the hidden width are padded to powers of two (>= 16, tl.dot's minimum)
and masked; N is masked.

Selection rule (`plan`, used by blocks.write_block): the one-kernel forward is used
when its per-program tile fits on chip, otherwise the composed 5+-launch path runs:
  * registers: the fp32 residual accumulator and the LN(x)/LN2(y) operand tile are
    both [BLOCK_N, T_PAD] and live for the whole program. BLOCK_N =
    clamp(REG_TILE // T_PAD, 16, 64) (also <= next_pow2(N)), with REG_TILE = 8192
    elements for fp16/bf16 (acc 32 KiB + operand 16 KiB per program: <= 64 + 32
    registers per thread at 4 warps, spread over 8 warps here) and 4096 for fp32
    (the fp32 operand tile is twice as wide). Hence T_PAD <= REG_TILE // 16:
    T <= 512 for fp16/bf16; larger T falls back.
  * fp32 inputs always fall back (unless forced: write_block(..., fused=True), which the
    interpreter tests use for fp32 numerics): fp32 IEEE dots run on FMA units, not
    tensor cores, and the kernel spilled at every tile tried (sm_90 and sm_80, BLOCK_N
    16, 4 or 8 warps, T = 64, 128 and 256: 560..4600 spilled bytes).
  * head dim padded to <= 128 (the [BLOCK_N, D_PAD] q/o tiles), else fall back.
  * shared memory: the streamed weight tiles (Wq/Wo head slices [T_PAD, D_PAD],
    W1/W2 chunks [T_PAD, BLOCK_F], K/V chunks [BLOCK_M, D_PAD]) times num_stages
    must stay under the sm_80 per-block limit (163 KiB); BLOCK_F is halved (down to
    16) until they do, else fall back.
The compile test (tests/kernels/test_triton_write_block.py) builds the kernel for
sm_90 and sm_80 at the published write-block shapes and fails on spills or
over-limit shared memory for every configuration this rule selects.
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from kernels.triton_gpu import config
from kernels.triton_gpu.tl_helpers import mm

_SQRT1_2 = tl.constexpr(0.7071067811865476)

REG_TILE = {"low": 8192, "float32": 4096}
MAX_D_PAD = 128
SMEM_BUDGET = min(config.SMEM_LIMIT_BYTES.values())


@dataclasses.dataclass(frozen=True)
class WriteBlockPlan:
  block_n: int
  block_m: int
  block_f: int
  t_pad: int
  d_pad: int
  num_warps: int
  num_stages: int


def _smem_need(t_pad, d_pad, block_m, block_f, itemsize, stages):
  per_stage = max(2 * t_pad * d_pad, 2 * block_m * d_pad, 2 * t_pad * block_f)
  return stages * per_stage * itemsize


def plan(n: int, t: int, m: int, width: int, heads: int, hidden: int,
         dtype_name: str, force_fp32: bool = False) -> WriteBlockPlan | None:
  """Launch parameters of the one-kernel forward, or None when it does not fit.
  fp32 is never selected unless force_fp32 (see the module docstring)."""
  del m  # the latents are streamed in BLOCK_M chunks: any M fits.
  if dtype_name == "float32" and not force_fp32:
    return None
  t_pad = max(16, config.next_pow2(t))
  d_pad = max(16, config.next_pow2(width // heads))
  if d_pad > MAX_D_PAD:
    return None
  reg_tile = REG_TILE["float32" if dtype_name == "float32" else "low"]
  block_n = max(16, min(64, reg_tile // t_pad, config.next_pow2(n)))
  if block_n * t_pad > reg_tile:
    return None
  itemsize = 4 if dtype_name == "float32" else 2
  block_m = 64 if dtype_name != "float32" else 32
  block_f = max(16, min(64, config.next_pow2(max(hidden, 1))))
  num_stages = 2
  while (_smem_need(t_pad, d_pad, block_m, block_f, itemsize, num_stages) > SMEM_BUDGET
         and block_f > 16):
    block_f //= 2
  if _smem_need(t_pad, d_pad, block_m, block_f, itemsize, num_stages) > SMEM_BUDGET:
    return None
  return WriteBlockPlan(block_n, block_m, block_f, t_pad, d_pad, num_warps=8,
                        num_stages=num_stages)


@triton.jit
def _write_block_fwd_kernel(
    x_ptr, k_ptr, v_ptr, lns_ptr, lnb_ptr, wq_ptr, bq_ptr, wo_ptr, bo_ptr,
    mlns_ptr, mlnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    N: tl.constexpr, T: tl.constexpr, T_PAD: tl.constexpr, M: tl.constexpr,
    H: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, F: tl.constexpr,
    SCALE: tl.constexpr, LN_EPS: tl.constexpr, HAS_MLP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
    IEEE: tl.constexpr,
):
  pid_n = tl.program_id(0)
  b = tl.program_id(1)
  W = H * DH
  op_ty = x_ptr.dtype.element_ty  # fp32 inputs: fp32 operands, IEEE dots
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_t = tl.arange(0, T_PAD)
  offs_d = tl.arange(0, D_PAD)
  n_mask = offs_n < N
  t_mask = offs_t < T
  d_mask = offs_d < DH
  nt_mask = n_mask[:, None] & t_mask[None, :]
  x_idx = b * N * T + offs_n[:, None] * T + offs_t[None, :]

  # 1. The interface tile, its LayerNorm and the residual (+ out-proj bias).
  x = tl.load(x_ptr + x_idx, mask=nt_mask, other=0.0).to(tl.float32)
  mean = tl.sum(x, 1) / T
  xc = tl.where(nt_mask, x - mean[:, None], 0.0)
  rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / T + LN_EPS)
  g = tl.load(lns_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)
  beta = tl.load(lnb_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)
  xn = (xc * rstd[:, None] * g[None, :] + beta[None, :]).to(op_ty)
  acc = x + tl.load(bo_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)[None, :]

  # 2. Attention, one head at a time; its output projected straight into acc.
  td_mask = t_mask[:, None] & d_mask[None, :]
  kv_base = b * M * W
  for h in range(H):
    col = h * DH + offs_d
    wq = tl.load(wq_ptr + offs_t[:, None] * W + col[None, :], mask=td_mask, other=0.0)
    bq = tl.load(bq_ptr + col, mask=d_mask, other=0.0).to(tl.float32)
    q = (mm(xn, wq.to(op_ty), IEEE) + bq[None, :]).to(op_ty)
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    o = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
      offs_m = m0 + tl.arange(0, BLOCK_M)
      m_mask = offs_m < M
      kv_idx = kv_base + offs_m[:, None] * W + col[None, :]
      kv_m = m_mask[:, None] & d_mask[None, :]
      k = tl.load(k_ptr + kv_idx, mask=kv_m, other=0.0).to(op_ty)
      v = tl.load(v_ptr + kv_idx, mask=kv_m, other=0.0).to(op_ty)
      s = mm(q, tl.trans(k), IEEE)
      s = tl.where(m_mask[None, :], s * SCALE, float("-inf"))
      m_new = tl.maximum(m_i, tl.max(s, 1))
      p = tl.exp(s - m_new[:, None])
      alpha = tl.exp(m_i - m_new)
      l_i = l_i * alpha + tl.sum(p, 1)
      o = o * alpha[:, None] + mm(p.to(op_ty), v, IEEE)
      m_i = m_new
    o = (o / l_i[:, None]).to(op_ty)
    wo = tl.load(wo_ptr + col[:, None] * T + offs_t[None, :],
                 mask=d_mask[:, None] & t_mask[None, :], other=0.0)
    acc += mm(o, wo.to(op_ty), IEEE)

  # 3. The MLP on LN2(y), chunked over the hidden width; y stays in acc (fp32).
  if HAS_MLP:
    mean2 = tl.sum(acc, 1) / T
    yc = tl.where(nt_mask, acc - mean2[:, None], 0.0)
    rstd2 = 1.0 / tl.sqrt(tl.sum(yc * yc, 1) / T + LN_EPS)
    g2 = tl.load(mlns_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)
    beta2 = tl.load(mlnb_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)
    yn = (yc * rstd2[:, None] * g2[None, :] + beta2[None, :]).to(op_ty)
    for f0 in range(0, F, BLOCK_F):
      offs_f = f0 + tl.arange(0, BLOCK_F)
      f_mask = offs_f < F
      w1 = tl.load(w1_ptr + offs_t[:, None] * F + offs_f[None, :],
                   mask=t_mask[:, None] & f_mask[None, :], other=0.0)
      b1 = tl.load(b1_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)
      a = mm(yn, w1.to(op_ty), IEEE) + b1[None, :]
      a = 0.5 * a * (1.0 + tl.math.erf(a * _SQRT1_2))
      w2 = tl.load(w2_ptr + offs_f[:, None] * T + offs_t[None, :],
                   mask=f_mask[:, None] & t_mask[None, :], other=0.0)
      acc += mm(a.to(op_ty), w2.to(op_ty), IEEE)
    acc += tl.load(b2_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)[None, :]

  # 4. One store of the tile.
  tl.store(out_ptr + x_idx, acc.to(out_ptr.dtype.element_ty), mask=nt_mask)
