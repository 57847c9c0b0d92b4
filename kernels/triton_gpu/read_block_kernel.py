"""Read-block attention with the interface K/V projection inside the kernel.

    z_out = z + MHA(q = LN(z) Wq + bq, k = x Wk + bk, v = x Wv + bv) Wo + bo
    (latents z [B, M, D] read from the interface x [B, N, T]; no LayerNorm on x)

blocks.read_block runs LN, the q projection and the out projection + residual as XLA ops
(cuBLAS GEMMs; blocks.py says why) and the attention with its K/V projection here:

  `kv_attention(q, x, Wk, bk, Wv, bv)`  (jax.custom_vjp)
    forward: `_read_attn_kernel`, grid (cdiv(M, BLOCK_M), B*H, kv_splits), then
             `_attn_combine_kernel` when kv_splits > 1. Undifferentiated calls (sampling)
             never write K or V; differentiated calls (training) run the same kernel with
             STORE_KV, which also writes K and V once (the first query block of each key
             tile), as the backward's residuals.
    backward: the attention backward kernels on (q, K, V, o, lse), then dX = dK Wk^T +
             dV Wv^T and dWk, dWv, dbk, dbv as XLA GEMMs / reductions. Nothing is
             recomputed and the forward runs once.

`_read_attn_kernel`: each program holds its head's query block [BLOCK_M, D_PAD] and walks
its key range in BLOCK_N tiles. Per tile it streams x[tile, :] in BLOCK_T column chunks
together with the rows of the head's weight slices Wk[:, h], Wv[:, h] and accumulates
k = x Wk, v = x Wv in fp32 (tensor-core dots); adds the biases and rounds k, v to the
operand dtype (as an XLA projection stores them), then does the online-softmax update in
base 2 (attention_kernels.online_softmax_step, the forward kernel's own step). M, N, T and the head dim are padded to powers of two
(>= 16) and masked; base offsets are int64 (attention_kernels.py, "Addressing").

Why fuse: the composed alternative (an XLA GEMM writing K/V [B, N, 2W], then the
attention kernel reading them) moves 2 x B*N*2W operand-dtype elements more in the
forward, the largest tensor of the read; the projection's FLOPs are the same (one query
block at M <= 128 with head_dim 32, so no key tile is projected twice).

Selection rule (`plan`; blocks.read_block falls back to XLA K/V GEMMs + the attention
kernels, logged once, when it returns None):
  * head dim padded D_PAD <= 128 (registers: q, the output accumulator, k and v tiles
    and the scores live in registers).
  * at most MAX_Q_BLOCKS = 2 query blocks (M <= 256 at D_PAD <= 64): every query block
    re-projects its key range, so more query blocks would multiply the projection FLOPs.
  * shared memory per pipeline stage (BLOCK_N + 2 D_PAD) * BLOCK_T elements times
    num_stages, plus the q tile, within the sm_80 per-block limit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import precision as _precision
from kernels.tiling import cdiv, next_pow2
from kernels.triton_gpu import attention, config
# Imported by name: launch.interpreted swaps the @triton.jit functions that a kernel's
# module globals hold for interpreted ones; a helper reached as a module attribute
# (ak.masked_scores) would be left out of that swap.
from kernels.triton_gpu.attention_kernels import (masked_scores, online_softmax_step,
                                                  softmax_finish)
from kernels.triton_gpu.launch import cached, launch, vmappable

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
         precision: str = "default", *, block_m: int | None = None,
         block_n: int | None = None, block_t: int | None = None,
         kv_splits: int | None = None) -> ReadBlockPlan | None:
  """Launch parameters of the fused K/V attention, or None (composed path). The keyword
  overrides are for tests (forcing several query blocks, T chunks or splits)."""
  if width % heads:
    return None
  d_pad = max(16, next_pow2(width // heads))
  if d_pad > MAX_D_PAD:
    return None
  ieee = dtype_name == "float32" and precision == "highest"
  cap_m = 64 if (ieee or d_pad > 64) else MAX_BLOCK_M
  block_m = block_m or max(16, min(cap_m, next_pow2(m)))
  q_blocks = cdiv(m, block_m)
  if q_blocks > MAX_Q_BLOCKS:
    return None
  block_n = block_n or max(16, min(BLOCK_N_MAX if d_pad <= 64 else 32, next_pow2(n)))
  block_t = block_t or max(16, min(BLOCK_T_MAX, next_pow2(t)))
  config.check_slab("read_block", n, max(t, width))
  splits, split_len = config.split_axis(kv_splits, {}, "kv_splits", n, block_n,
                                         q_blocks * b * heads)
  num_stages = 2
  itemsize = 4 if dtype_name == "float32" else 2
  if smem_need(block_m, block_n, block_t, d_pad, itemsize, num_stages) > SMEM_BUDGET:
    return None
  num_warps = 8 if (ieee or block_m * d_pad >= 4096) else 4
  return ReadBlockPlan(block_m, block_n, block_t, d_pad, splits, split_len, num_warps,
                       num_stages)


@triton.jit
def _read_attn_kernel(
    q_ptr, x_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, o_ptr, lse_ptr, k_ptr, v_ptr,
    SCALE: tl.constexpr, B: tl.constexpr, H: tl.constexpr, M: tl.constexpr,
    N: tl.constexpr, T: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT_LEN: tl.constexpr, STORE_KV: tl.constexpr, PREC: tl.constexpr,
):
  pid_m = tl.program_id(0)
  pid_bh = tl.program_id(1).to(tl.int64)
  pid_s = tl.program_id(2).to(tl.int64)
  b = pid_bh // H
  h = pid_bh % H
  W: tl.constexpr = H * DH  # row stride of q, o, k, v and the weights
  op_ty = q_ptr.dtype.element_ty
  offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  offs_d = tl.arange(0, D_PAD)
  m_mask = offs_m < M
  d_mask = offs_d < DH
  md_mask = m_mask[:, None] & d_mask[None, :]
  col = h * DH + offs_d
  q = tl.load(q_ptr + b * (M * W) + offs_m[:, None] * W + col[None, :], mask=md_mask,
              other=0.0)
  bk = tl.load(bk_ptr + col, mask=d_mask, other=0.0).to(tl.float32)
  bv = tl.load(bv_ptr + col, mask=d_mask, other=0.0).to(tl.float32)

  m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
  l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
  acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
  x_base = x_ptr + b * (N * T)
  kv_base = b * (N * W)
  start = (pid_s * SPLIT_LEN).to(tl.int32)
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
      wk = tl.load(wk_ptr + w_idx, mask=td_mask, other=0.0)
      wv = tl.load(wv_ptr + w_idx, mask=td_mask, other=0.0)
      k = tl.dot(xt, wk, k, input_precision=PREC)
      v = tl.dot(xt, wv, v, input_precision=PREC)
    # Rounded to the operand dtype, as an XLA projection stores them.
    k = (k + bk[None, :]).to(op_ty)
    v = (v + bv[None, :]).to(op_ty)
    if STORE_KV:
      # Differentiated calls keep K, V for the backward (one program per key tile
      # writes them: the first query block).
      if pid_m == 0:
        kv_idx = kv_base + offs_n[:, None] * W + col[None, :]
        kv_m = n_mask[:, None] & d_mask[None, :]
        tl.store(k_ptr + kv_idx, k, mask=kv_m)
        tl.store(v_ptr + kv_idx, v, mask=kv_m)
    # Online softmax over the tile (fp32, base 2), the steps of _attn_fwd_kernel.
    s = masked_scores(q, k, n_mask, SCALE, PREC)
    m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, PREC)

  acc, lse = softmax_finish(acc, m_i, l_i)
  # o: [splits, B, M, H, DH]; lse: [splits, B, H, M] (splits = 1: the final output).
  o_off = (pid_s * B + b) * (M * W)
  tl.store(o_ptr + o_off + offs_m[:, None] * W + col[None, :],
           acc.to(o_ptr.dtype.element_ty), mask=md_mask)
  tl.store(lse_ptr + (pid_s * (B * H) + pid_bh) * M + offs_m, lse, mask=m_mask)


# ----------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------

class ReadCfg(NamedTuple):
  num_heads: int
  interpret: bool
  block_sizes: config.BlockSizes
  plan: ReadBlockPlan
  precision: str


def _attn_impl(q, x, wk, bk, wv, bv, *, cfg: ReadCfg, store_kv: bool):
  """o [B, M, W] (and lse [B, H, M]; k, v [B, N, W] with store_kv) of
  attention(q, x Wk + bk, x Wv + bv); without store_kv K/V never reach memory."""
  bsz, m, width = q.shape
  n, t = x.shape[1:]
  h = cfg.num_heads
  dh = width // h
  pl = cfg.plan
  q_blocks = cdiv(m, pl.block_m)
  s = pl.kv_splits
  common = dict(B=bsz, H=h, DH=dh, D_PAD=pl.d_pad, BLOCK_M=pl.block_m)
  part_dt = q.dtype if s == 1 else jnp.float32
  kv_shape = (bsz, n, width) if store_kv else (1,)
  o_part, lse_part, k, v = launch(
      _read_attn_kernel, (q_blocks, bsz * h, s), (q, x, wk, bk, wv, bv),
      (jax.ShapeDtypeStruct((s, bsz, m, width), part_dt),
       jax.ShapeDtypeStruct((s, bsz, h, m), jnp.float32),
       jax.ShapeDtypeStruct(kv_shape, q.dtype), jax.ShapeDtypeStruct(kv_shape, q.dtype)),
      interpret=cfg.interpret, num_warps=pl.num_warps, num_stages=pl.num_stages,
      SCALE=float(dh ** -0.5), M=m, N=n, T=t, BLOCK_N=pl.block_n, BLOCK_T=pl.block_t,
      SPLIT_LEN=pl.split_len, STORE_KV=store_kv,
      PREC=_precision.triton_input_precision(cfg.precision), **common)
  if s == 1:
    o, lse = o_part[0], lse_part[0]
  else:
    o, lse = attention.combine_splits(o_part.reshape(s, bsz, m, h, dh), lse_part, q.dtype,
                                      block_m=pl.block_m, d_pad=pl.d_pad,
                                      interpret=cfg.interpret, num_warps=pl.num_warps)
    o = o.reshape(bsz, m, width)
  return (o, lse, k, v) if store_kv else (o,)


@cached
def _unit(cfg: ReadCfg, store_kv: bool):
  # q and x carry the batch axis (a vmapped axis folds into it); the weights do not.
  return vmappable(functools.partial(_attn_impl, cfg=cfg, store_kv=store_kv),
                   (True, True) + (False,) * 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def kv_attention(q, x, wk, bk, wv, bv, cfg: ReadCfg):
  """attention(q, x Wk + bk, x Wv + bv) with the K/V projection inside the kernel.

  q [B, M, W] (operand dtype), x [B, N, T], weights in the operand dtype. Forward:
  one _read_attn_kernel launch (+ combine when split); under differentiation the same
  kernel also stores K, V, which the backward (the attention backward kernels, then
  XLA GEMMs for dX, dWk, dWv) reads instead of recomputing them."""
  return _unit(cfg, False)(q, x, wk, bk, wv, bv)[0]


def _kv_fwd(q, x, wk, bk, wv, bv, cfg):
  o, lse, k, v = _unit(cfg, True)(q, x, wk, bk, wv, bv)
  return o, (q, x, wk, wv, bk, bv, k, v, o, lse)


def _kv_bwd(cfg, res, do):
  q, x, wk, wv, bk, bv, k, v, o, lse = res
  bsz, m, width = q.shape
  n = x.shape[1]
  h = cfg.num_heads
  dh = width // h
  split = lambda a, l: a.reshape(bsz, l, h, dh)
  bwd = attention.units(float(dh ** -0.5), cfg.interpret, cfg.block_sizes, cfg.precision)[1]
  dq, dk, dv = bwd(split(q, m), split(k, n), split(v, n), split(o, m), lse,
                   split(do.astype(q.dtype), m))
  dk, dv = dk.reshape(bsz, n, width), dv.reshape(bsz, n, width)
  prec = _precision.lax_precision(cfg.precision)
  f32 = jnp.float32
  # dX = dK Wk^T + dV Wv^T; dW = X^T dK (XLA GEMMs, fp32 accumulation).
  dx = (jnp.einsum("bnw,tw->bnt", dk, wk, precision=prec, preferred_element_type=f32)
        + jnp.einsum("bnw,tw->bnt", dv, wv, precision=prec, preferred_element_type=f32))
  xo = x.astype(q.dtype)
  dwk = jnp.einsum("bnt,bnw->tw", xo, dk, precision=prec, preferred_element_type=f32)
  dwv = jnp.einsum("bnt,bnw->tw", xo, dv, precision=prec, preferred_element_type=f32)
  dbk = jnp.sum(dk, axis=(0, 1), dtype=f32)
  dbv = jnp.sum(dv, axis=(0, 1), dtype=f32)
  return (dq.reshape(q.shape), dx.astype(x.dtype), dwk.astype(wk.dtype),
          dbk.astype(bk.dtype), dwv.astype(wv.dtype), dbv.astype(bv.dtype))


kv_attention.defvjp(_kv_fwd, _kv_bwd)
