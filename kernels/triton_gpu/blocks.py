"""The read and write blocks on the Triton backend: Triton where fusion wins, XLA GEMMs
for the plain projections and the MLP.

read_block (latents z [B, M, D] <- interface x [B, N, T]):
  q   = LN(z) @ wq + bq                  XLA (LN fusion + cuBLAS GEMM)
  o   = kv_attention(q, x, wk, bk, wv, bv) Triton: K/V projected inside split-K attention
                                         (read_block_kernel.py); fallback (logged once):
                                         XLA K/V GEMMs + the Triton attention kernels
  out = z + o @ wo + bo                  XLA GEMM, fp32 residual
write_block (interface x [B, N, T] <- latents z [B, M, D]):
  q   = LN(x) @ wq + bq;  k, v = z @ wk + bk, z @ wv + bv     XLA
  o   = attention(q, k, v)               Triton: one pass (the M = 128 latent keys are one
                                         tile: no running max or rescale)
  y   = x + o @ wo + bo                  XLA, kept in fp32 (residual stream)
  out = y + gelu(LN(y) @ w1 + b1) @ w2 + b2    XLA (cuBLASLt bias/GELU epilogues)

Why the GEMMs are XLA's (bench/results/triton_estimate.md, an ESTIMATE): the projections
and the MLP are ~80% of the kernel-backed FLOPs. The former Triton GEMM (`fused_linear`:
fixed 64x64x32 tiles, 2 stages, no TMA, no warp specialisation, 16-32 CTAs for the weight
gradients on a 132-SM chip) could at best tie cuBLAS on the forward and lost on the
weight gradients; a Hopper GEMM that reliably matches cuBLAS (TMA, warp-specialised
persistent schedule, stream-K for dW) is not something that can be validated without a
GPU. LN fused into the GEMM prologue would save one bf16 round trip of the activations;
that is the first thing to try once a GPU measurement exists. The one-kernel write
forward (LN -> q-proj -> attention -> out-proj -> LN -> MLP per interface tile) was
dropped: at the published shapes it tiled 16-32 rows (below wgmma's 64, so mma.sync),
held 152 KB of shared memory (1 CTA/SM) and re-streamed every weight per tile, about
0.8 MB per 32 rows for CIFAR-10: ~37 FLOP per L2 byte, L2-bound well below the GEMMs'
rate.

Precision (kernels/precision.py): fp32 params are cast to the operand dtype once per call
(one XLA convert per weight); every dot has operand-dtype inputs and fp32 accumulation;
LN statistics, biases, GELU and the residual stream are fp32.
"""
from __future__ import annotations

import logging

import jax.numpy as jnp

from kernels import precision as _precision
from kernels import reference as ref
from kernels.params import ReadBlockParams, WriteBlockParams
from kernels.triton_gpu import config
from kernels.triton_gpu import read_block_kernel as rbk
from kernels.triton_gpu.attention import cross_attention

_LOGGED: set = set()


def _log_once(key, msg, *args):
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.warning(msg, *args)


def _cast_weights(p, op_dtype):
  """Matrices to the operand dtype once (vectors stay: they enter fp32 epilogues)."""
  return type(p)(*[None if a is None else (a.astype(op_dtype) if a.ndim == 2 else a)
                   for a in p])


def _split(a, heads):
  return a.reshape(*a.shape[:-1], heads, a.shape[-1] // heads)


def _attention_block(q_src, kv_src, p, num_heads, interpret, block_sizes, precision):
  """q_src + MHA(LN(q_src), kv_src) in fp32, attention core on the Triton kernels."""
  op = q_src.dtype
  pr = dict(precision=precision)
  h = ref.layer_norm(q_src, p.ln_scale, p.ln_bias)
  q = ref.dense(h, p.wq, p.bq, op, **pr).astype(op)
  k = ref.dense(kv_src, p.wk, p.bk, op, **pr).astype(op)
  v = ref.dense(kv_src, p.wv, p.bv, op, **pr).astype(op)
  o = cross_attention(_split(q, num_heads), _split(k, num_heads), _split(v, num_heads),
                      interpret=interpret, block_sizes=block_sizes, precision=precision)
  o = o.reshape(q.shape)
  return q_src.astype(jnp.float32) + ref.dense(o, p.wo, p.bo, op, **pr)


def read_block(z, x, p: ReadBlockParams, *, num_heads, interpret=False, block_sizes=None,
               precision=None, fused=None):
  """fused: None uses the fused K/V attention when its plan fits (else the composed path,
  logged once), True demands it, False forces the composed path."""
  precision = _precision.check(precision)
  p = _cast_weights(p, z.dtype)
  bsz, m, _ = z.shape
  n, t = x.shape[1:]
  width = p.wq.shape[1]
  pl = None
  if fused is not False:
    pl = rbk.plan(bsz, m, n, t, width, num_heads, jnp.dtype(z.dtype).name, precision)
  if fused and pl is None:
    raise ValueError(f"read_block: the fused K/V attention does not fit M={m}, "
                     f"head_dim={width // num_heads}, dtype {jnp.dtype(z.dtype)}")
  if pl is None:
    if fused is None:
      _log_once(("read", m, width // num_heads), "triton read_block: M=%d, head_dim=%d "
                "is outside the fused K/V attention's plan (head_dim <= 128, M <= 256); "
                "running XLA K/V projections + the Triton attention kernels", m,
                width // num_heads)
    y = _attention_block(z, x, p, num_heads, interpret, block_sizes, precision)
    return y.astype(z.dtype)
  cfg = rbk.ReadCfg(int(num_heads), bool(interpret), config.as_block_sizes(block_sizes), pl,
                    precision)
  op = z.dtype
  pr = dict(precision=precision)
  h = ref.layer_norm(z, p.ln_scale, p.ln_bias)
  q = ref.dense(h, p.wq, p.bq, op, **pr).astype(op)
  o = rbk.kv_attention(q, x.astype(op), p.wk, p.bk, p.wv, p.bv, cfg)
  y = z.astype(jnp.float32) + ref.dense(o, p.wo, p.bo, op, **pr)
  return y.astype(z.dtype)


def write_block(x, z, p: WriteBlockParams, *, num_heads, interpret=False, block_sizes=None,
                precision=None):
  precision = _precision.check(precision)
  p = _cast_weights(p, x.dtype)
  y = _attention_block(x, z, p, num_heads, interpret, block_sizes, precision)
  if p.w1 is not None:
    y = ref.interface_mlp(y, p, x.dtype, precision)
  return y.astype(x.dtype)
