"""Read-block forward with the interface K/V projection fused into split-K attention.

    z_out = z + MHA(q = LN(z) Wq + bq, k = x Wk + bk, v = x Wv + bv) Wo + bo
    (latents z [B, M, D] read from the interface x [B, N, T]; no LayerNorm on x)

Forward (`fused_read_block`), 3 or 4 launches, none of which writes K or V:
  q     = fused_linear(LN(z)) @ Wq + bq                    (linear.py, LN prologue)
  o     = _read_attn_kernel, grid (cdiv(M, BLOCK_M), B*H, kv_splits)
  o     = _attn_combine_kernel (attention_kernels.py, reused as is; only when
          kv_splits > 1)
  z_out = fused_linear(o) @ Wo + bo + z                   (residual epilogue)
`_read_attn_kernel`: each program holds its head's query block [BLOCK_M, D_PAD] and
walks its key range in BLOCK_N tiles. Per tile it streams x[tile, :] in BLOCK_T
column chunks (each element of x loaded once per tile) together with the matching
rows of the head's weight slices Wk[:, h], Wv[:, h] ([BLOCK_T, D_PAD] each) and
accumulates k = x Wk, v = x Wv in fp32; adds the biases, rounds k, v to the operand
dtype (as the composed path, which stores them in that dtype, does), then does the
online-softmax update (fp32). It writes the normalised output (1 split) or fp32
partials (o, lse) per split in the layout _attn_combine_kernel reads:
o [splits, B, M, H, DH], lse [splits, B, H, M]. fp32 inputs use IEEE fp32 dots;
fp16/bf16 inputs are fp16/bf16 dot operands with fp32 accumulation. M, N, T and the
head dim are padded to powers of two (>= 16, tl.dot's minimum) and masked.

Selection rule (`plan`; blocks.read_block uses the fused forward when it returns a
plan, else the composed 5-launch path: q, k, v projections, attention + combine,
out-projection):
  * fp16/bf16 only. fp32 is used only when forced (read_block(..., fused=True), as the
    interpreter tests do): fp32 IEEE dots run on FMA units, and at the published shapes
    the fp32 variant (BLOCK_M 64, 8 warps) spilled on sm_80 (76 B for CIFAR-10, 628 B
    for ImageNet-64 with N = 4096; none on sm_90).
  * head dim padded D_PAD <= 128: the program holds q, the output accumulator
    ([BLOCK_M, D_PAD], fp32), k and v (2 x [BLOCK_N, D_PAD] fp32 accumulators) and the
    scores ([BLOCK_M, BLOCK_N] fp32) in registers.
  * BLOCK_M = next_pow2(M) clamped to [16, 128] (to [16, 64] when D_PAD = 128 or for
    fp32); at most MAX_Q_BLOCKS = 2 query blocks (M <= 256; M <= 128 when D_PAD = 128):
    every query block re-projects its key range (the projection costs T / BLOCK_M times
    the attention's flops), so more query blocks fall back to the composed path, which
    projects K/V once.
  * T is not bounded: x and the weight slices are streamed in BLOCK_T = 64 column
    chunks; shared memory per pipeline stage is (BLOCK_N + 2 D_PAD) * BLOCK_T elements
    (x chunk + Wk, Wv chunks), times num_stages, plus the q tile; it must stay within
    the sm_80 per-block limit (163 KiB), else fall back. For fp16/bf16 the estimate is
    at most 88 KiB (D_PAD 128), so this only triggers for forced fp32 with D_PAD 128.
  * BLOCK_N = 64 (32 when D_PAD = 128; down to 16 for tiny N); the key axis is split
    like the composed attention's (config.TARGET_PROGRAMS programs in all). At D_PAD 128
    the sm_80 build uses 240..255 registers per thread but does not spill.
tests/kernels/test_triton_read_block.py compiles the kernel for sm_90 and sm_80 at the
published read-block shapes (bf16 and fp16) and fails on spills or over-limit shared
memory for every configuration this rule selects.

Backward: `read_block` is a jax.custom_vjp. An undifferentiated call (sampling,
evaluation) runs the fused forward; a differentiated call runs the composed read block
forward, keeping its residuals for the composed backward (its ops carry the Triton
backward kernels), so training never computes the forward twice.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.triton_gpu import attention_kernels as ak
from kernels.triton_gpu import config
from kernels.triton_gpu.launch import launch, vmappable
from kernels.triton_gpu.linear import fused_linear
from kernels.triton_gpu.tl_helpers import mm

MAX_D_PAD = 128
MAX_BLOCK_M = 128
MAX_Q_BLOCKS = 2
BLOCK_N_MAX = 64
BLOCK_T_MAX = 64
SMEM_BUDGET = min(config.SMEM_LIMIT_BYTES.values())


@dataclasses.dataclass(frozen=True)
class ReadBlockPlan:
  block_m: int
  block_n: int
  block_t: int
  d_pad: int
  kv_splits: int
  split_len: int
  num_warps: int
  num_stages: int


def smem_need(block_m, block_n, block_t, d_pad, itemsize, stages):
  return (stages * (block_n + 2 * d_pad) * block_t + block_m * d_pad) * itemsize


def plan(b: int, m: int, n: int, t: int, width: int, heads: int, dtype_name: str,
         force_fp32: bool = False, *, block_m: int | None = None, block_n: int | None = None,
         block_t: int | None = None, kv_splits: int | None = None) -> ReadBlockPlan | None:
  """Launch parameters of the fused forward, or None (composed path). The keyword
  overrides are for tests (forcing several query blocks, T chunks or splits)."""
  fp32 = dtype_name == "float32"
  if fp32 and not force_fp32:
    return None
  if width % heads:
    return None
  d_pad = max(16, config.next_pow2(width // heads))
  if d_pad > MAX_D_PAD:
    return None
  cap_m = 64 if (fp32 or d_pad > 64) else MAX_BLOCK_M
  block_m = block_m or max(16, min(cap_m, config.next_pow2(m)))
  q_blocks = config.cdiv(m, block_m)
  if q_blocks > MAX_Q_BLOCKS:
    return None
  block_n = block_n or max(16, min(BLOCK_N_MAX if d_pad <= 64 else 32, config.next_pow2(n)))
  block_t = block_t or max(16, min(BLOCK_T_MAX, config.next_pow2(t)))
  splits, split_len = config._split_axis(kv_splits, {}, "kv_splits", n, block_n,
                                         q_blocks * b * heads)
  num_stages = 2
  itemsize = 4 if fp32 else 2
  if smem_need(block_m, block_n, block_t, d_pad, itemsize, num_stages) > SMEM_BUDGET:
    return None
  num_warps = 8 if (fp32 or block_m * d_pad >= 4096) else 4
  return ReadBlockPlan(block_m, block_n, block_t, d_pad, splits, split_len, num_warps,
                       num_stages)


@triton.jit
def _read_attn_kernel(
    q_ptr, x_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, o_ptr, lse_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, M: tl.constexpr,
    N: tl.constexpr, T: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT_LEN: tl.constexpr, IEEE: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1)
  pid_s = tl.program_id(2)
  b = pid_bh // H
  h = pid_bh % H
  W = H * DH  # row stride of q, o and the weights
  op_ty = x_ptr.dtype.element_ty
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < M
  d_mask = offs_d < DH
  md_mask = m_mask[:, None] & d_mask[None, :]
  col = h * DH + offs_d
  q = tl.load(q_ptr + b * M * W + offs_m[:, None] * W + col[None, :], mask=md_mask,
              other=0.0).to(op_ty)
  bk = tl.load(bk_ptr + col, mask=d_mask, other=0.0).to(tl.float32)
  bv = tl.load(bv_ptr + col, mask=d_mask, other=0.0).to(tl.float32)

  m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
  l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
  acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  x_base = x_ptr + b * N * T
  start = pid_s * SPLIT_LEN
  stop = tl.minimum(start + SPLIT_LEN, N)
  for n0 in range(start, stop, BLOCK_N):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < stop
    # K/V of this key tile, projected on chip: x[tile] streamed once, in T chunks.
    k = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    v = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
      offs_t = t0 + tl.arange(0, BLOCK_T)
      t_mask = offs_t < T
      xt = tl.load(x_base + offs_n[:, None] * T + offs_t[None, :],
                   mask=n_mask[:, None] & t_mask[None, :], other=0.0).to(op_ty)
      w_idx = offs_t[:, None] * W + col[None, :]
      td_mask = t_mask[:, None] & d_mask[None, :]
      wk = tl.load(wk_ptr + w_idx, mask=td_mask, other=0.0).to(op_ty)
      wv = tl.load(wv_ptr + w_idx, mask=td_mask, other=0.0).to(op_ty)
      k += mm(xt, wk, IEEE)
      v += mm(xt, wv, IEEE)
    k = (k + bk[None, :]).to(op_ty)
    v = (v + bv[None, :]).to(op_ty)
    # Online softmax over the tile (fp32), as _attn_fwd_kernel.
    s = mm(q, tl.trans(k), IEEE)
    s = tl.where(n_mask[None, :], s * SCALE, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p.to(op_ty), v, IEEE)
    m_i = m_new

  acc = acc / l_i[:, None]
  lse = m_i + tl.log(l_i)
  # o: [splits, B, M, H, DH]; lse: [splits, B, H, M] (splits = 1: the final output).
  o_off = (pid_s * B + b) * M * W
  tl.store(o_ptr + o_off + offs_m[:, None] * W + col[None, :],
           acc.to(o_ptr.dtype.element_ty), mask=md_mask)
  tl.store(lse_ptr + (pid_s * B * H + pid_bh) * M + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------

class ReadCfg(NamedTuple):
  num_heads: int
  interpret: bool
  block_sizes: config.BlockSizes
  plan: ReadBlockPlan


def _attn_impl(q, x, wk, bk, wv, bv, *, cfg: ReadCfg):
  """o [B, M, W] = attention(q, x Wk + bk, x Wv + bv), K/V never in memory."""
  bsz, m, width = q.shape
  n, t = x.shape[1:]
  h = cfg.num_heads
  dh = width // h
  pl = cfg.plan
  q_blocks = config.cdiv(m, pl.block_m)
  s = pl.kv_splits
  common = dict(B=bsz, H=h, DH=dh, D_PAD=pl.d_pad, BLOCK_M=pl.block_m)
  part_dt = q.dtype if s == 1 else jnp.float32
  o_part, lse_part = launch(
      _read_attn_kernel, (q_blocks, bsz * h, s), (q, x, wk, bk, wv, bv),
      (jax.ShapeDtypeStruct((s, bsz, m, width), part_dt),
       jax.ShapeDtypeStruct((s, bsz, h, m), jnp.float32)),
      interpret=cfg.interpret, num_warps=pl.num_warps, num_stages=pl.num_stages,
      SCALE=float(dh ** -0.5), M=m, N=n, T=t, BLOCK_N=pl.block_n, BLOCK_T=pl.block_t,
      SPLIT_LEN=pl.split_len, IEEE=jnp.dtype(x.dtype) == jnp.float32, **common)
  if s == 1:
    return (o_part[0],)
  o, _ = launch(
      ak._attn_combine_kernel, (q_blocks, bsz * h),
      (o_part.reshape(s, bsz, m, h, dh), lse_part),
      (jax.ShapeDtypeStruct((bsz, m, h, dh), q.dtype),
       jax.ShapeDtypeStruct((bsz, h, m), jnp.float32)),
      interpret=cfg.interpret, num_warps=pl.num_warps, num_stages=1, SPLITS=s, LQ=m,
      **common)
  return (o.reshape(bsz, m, width),)


@functools.lru_cache(maxsize=None)
def _unit(cfg: ReadCfg):
  # q and x carry the batch axis (a vmapped axis folds into it); the weights do not.
  return vmappable(functools.partial(_attn_impl, cfg=cfg), (True, True) + (False,) * 4)


def fused_forward(z, x, p, cfg: ReadCfg):
  """The fused read-block forward (no autodiff rule: use `read_block`)."""
  bsz, m, d = z.shape
  width = p.wq.shape[1]
  kw = dict(interpret=cfg.interpret, block_sizes=cfg.block_sizes)
  z2 = z.reshape(bsz * m, d)
  q = fused_linear(z2, p.wq, p.bq, ln=(p.ln_scale, p.ln_bias), **kw)
  (o,) = _unit(cfg)(q.reshape(bsz, m, width), x, p.wk, p.bk, p.wv, p.bv)
  y = fused_linear(o.reshape(bsz * m, width), p.wo, p.bo, residual=z2, out_dtype=z.dtype,
                   **kw)
  return y.reshape(z.shape)


def _composed(z, x, p, cfg: ReadCfg):
  from kernels.triton_gpu import blocks  # blocks imports this module
  y = blocks._attend(z, x, p, cfg.num_heads, cfg.interpret, cfg.block_sizes, z.dtype)
  return y.reshape(z.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def read_block(z, x, p, cfg: ReadCfg):
  return fused_forward(z, x, p, cfg)


def _rb_fwd(z, x, p, cfg):
  # A differentiated call runs the composed forward and keeps its residuals for the
  # composed backward: fused forward + composed re-run would compute the forward twice.
  out, vjp = jax.vjp(functools.partial(_composed, cfg=cfg), z, x, p)
  return out, vjp


def _rb_bwd(cfg, vjp, dy):
  del cfg
  return vjp(dy)


read_block.defvjp(_rb_fwd, _rb_bwd)
