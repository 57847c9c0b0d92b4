"""The fused read and write blocks, composed of the Triton ops.

read_block (latents z [B, M, D] <- interface x [B, N, T]):
  q   = LN(z) @ wq + bq                   fused_linear: LN prologue       (1 kernel)
  k,v = x @ wk + bk, x @ wv + bv          fused_linear                     (2 kernels)
  o   = attention(q, k, v)                split-K flash-decoding + combine (2 kernels)
  out = z + o @ wo + bo                   fused_linear: residual epilogue  (1 kernel)
write_block (interface x [B, N, T] <- latents z [B, M, D]):
  q   = LN(x) @ wq + bq;  k, v = z @ wk + bk, z @ wv + bv (tiny: M = 128 rows)
  o   = attention(q, k, v)                one pass, K/V of a head on chip
  y   = x + o @ wo + bo                   kept in float32 (residual stream)
  h   = gelu(LN(y) @ w1 + b1)             LN prologue + exact-GELU epilogue
  out = y + h @ w2 + b2
Every intermediate is token-wise and laid out [B*L, features] so the head split
[B, L, H, Dh] is a free reshape. Gradients come from the ops' custom_vjp rules
(Triton backward kernels); nothing here is differentiated by XLA.

Not (yet) fused: the interface K/V projection is not fused into the attention
kernel (it is its own kernel, writing K/V once), and the write block's
LN->q-proj->attention->out-proj->MLP chain is 5 launches, not one per tile.
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels.params import ReadBlockParams, WriteBlockParams
from kernels.triton_gpu.attention import cross_attention
from kernels.triton_gpu.linear import fused_linear


def _attend(q_src, kv_src, p, num_heads, interpret, block_sizes, res_dtype):
  bsz, lq, cq = q_src.shape
  lk, ckv = kv_src.shape[1:]
  width = p.wq.shape[1]
  dh = width // num_heads
  kw = dict(interpret=interpret, block_sizes=block_sizes)
  q = fused_linear(q_src.reshape(bsz * lq, cq), p.wq, p.bq, ln=(p.ln_scale, p.ln_bias), **kw)
  kv2 = kv_src.reshape(bsz * lk, ckv)
  k = fused_linear(kv2, p.wk, p.bk, **kw)
  v = fused_linear(kv2, p.wv, p.bv, **kw)
  o = cross_attention(q.reshape(bsz, lq, num_heads, dh), k.reshape(bsz, lk, num_heads, dh),
                      v.reshape(bsz, lk, num_heads, dh), **kw)
  y = fused_linear(o.reshape(bsz * lq, width), p.wo, p.bo,
                   residual=q_src.reshape(bsz * lq, cq), out_dtype=res_dtype, **kw)
  return y  # [B*Lq, Cq]


def read_block(z, x, p: ReadBlockParams, *, num_heads, interpret=False, block_sizes=None):
  y = _attend(z, x, p, num_heads, interpret, block_sizes, z.dtype)
  return y.reshape(z.shape)


def write_block(x, z, p: WriteBlockParams, *, num_heads, interpret=False, block_sizes=None):
  if p.w1 is None:
    return _attend(x, z, p, num_heads, interpret, block_sizes, x.dtype).reshape(x.shape)
  y = _attend(x, z, p, num_heads, interpret, block_sizes, jnp.float32)
  kw = dict(interpret=interpret, block_sizes=block_sizes)
  h = fused_linear(y, p.w1, p.b1, ln=(p.mlp_ln_scale, p.mlp_ln_bias), gelu=True,
                   out_dtype=x.dtype, **kw)
  out = fused_linear(h, p.w2, p.b2, residual=y, out_dtype=x.dtype, **kw)
  return out.reshape(x.shape)
