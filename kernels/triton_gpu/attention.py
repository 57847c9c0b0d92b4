"""Cross-attention op on the Triton kernels: forward, backward, vmap.

    o = cross_attention(q, k, v, scale=..., interpret=False, block_sizes=None)

q: [B, Lq, H, Dh], k, v: [B, Lk, H, Dh]. `jax.custom_vjp` saves (q, k, v, o, lse)
and runs the one-pass backward kernel where the keys are one tile (plan.fused_bwd: it reads
q, k, v, o, dO once, where the delta, dK/dV and dQ kernels read q, k, v, dO twice), else
those three; both directions are `vmappable` units (vmap folds into the batch axis).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import precision as _precision
from kernels.triton_gpu import attention_kernels as ak
from kernels.triton_gpu import config
from kernels.tiling import cdiv
from kernels.triton_gpu.launch import cached, launch, vmappable


def _check_dtype(dtype):
  if jnp.dtype(dtype) not in (jnp.float32, jnp.float16, jnp.bfloat16):
    raise TypeError(f"triton cross_attention supports float32, float16 and bfloat16, "
                    f"got {jnp.dtype(dtype)}")


def _plan(q, k, block_sizes, precision):
  b, lq, h, dh = q.shape
  return config.attention_plan(b, lq, k.shape[1], h, dh, jnp.dtype(q.dtype).name,
                               block_sizes, precision)


def _fwd_impl(q, k, v, *, scale, interpret, block_sizes, precision):
  b, lq, h, dh = q.shape
  lk = k.shape[1]
  plan = _plan(q, k, block_sizes, precision)
  common = dict(B=b, H=h, LQ=lq, DH=dh, D_PAD=plan.d_pad, BLOCK_M=plan.block_q)
  grid = (cdiv(lq, plan.block_q), b * h, plan.kv_splits)
  fwd = dict(kernel=ak._attn_fwd_kernel, grid=grid, interpret=interpret,
             num_warps=plan.num_warps, num_stages=plan.num_stages, SCALE=float(scale),
             LK=lk, BLOCK_N=plan.block_kv, SPLIT_LEN=plan.split_len,
             ONE_PASS=plan.split_len <= plan.block_kv,
             PREC=_precision.triton_input_precision(precision), **common)
  if plan.kv_splits == 1:
    o, lse = launch(inputs=(q, k, v), out_shapes=(
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((1, b, h, lq), jnp.float32)), **fwd)
    return o, lse[0]
  s = plan.kv_splits
  o_part, lse_part = launch(inputs=(q, k, v), out_shapes=(
      jax.ShapeDtypeStruct((s,) + q.shape, jnp.float32),
      jax.ShapeDtypeStruct((s, b, h, lq), jnp.float32)), **fwd)
  return combine_splits(o_part, lse_part, q.dtype, block_m=plan.block_q, d_pad=plan.d_pad,
                        interpret=interpret, num_warps=plan.num_warps)


def combine_splits(o_part, lse_part, dtype, *, block_m, d_pad, interpret, num_warps):
  """Merges kv-split partials o_part [S, B, Lq, H, Dh] (fp32), lse_part [S, B, H, Lq] into
  (o [B, Lq, H, Dh] in dtype, lse [B, H, Lq]). Also used by the fused read kernel."""
  s, b, lq, h, dh = o_part.shape
  return launch(
      ak._attn_combine_kernel, (cdiv(lq, block_m), b * h), (o_part, lse_part),
      (jax.ShapeDtypeStruct((b, lq, h, dh), dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)),
      interpret=interpret, num_warps=num_warps, num_stages=1, SPLITS=s, B=b, H=h, LQ=lq, DH=dh,
      D_PAD=d_pad, BLOCK_M=block_m)


def _bwd_impl(q, k, v, o, lse, do, *, scale, interpret, block_sizes, precision):
  b, lq, h, dh = q.shape
  lk = k.shape[1]
  plan = _plan(q, k, block_sizes, precision)
  run = dict(interpret=interpret, num_warps=plan.num_warps)
  if plan.fused_bwd:
    # One pass (attention_kernels._attn_bwd_fused_kernel): the keys are one tile.
    qs = plan.q_splits_bwd
    part_dt = jnp.float32 if qs > 1 else q.dtype
    dq, dk, dv = launch(
        ak._attn_bwd_fused_kernel, (1, b * h, qs), (q, k, v, o, do, lse),
        (jax.ShapeDtypeStruct(q.shape, q.dtype),) + (
            jax.ShapeDtypeStruct((qs,) + k.shape, part_dt),) * 2,
        interpret=interpret, num_warps=plan.num_warps_fused_bwd, num_stages=plan.num_stages,
        SCALE=float(scale), B=b, H=h, LQ=lq, LK=lk, DH=dh, D_PAD=plan.d_pad,
        BLOCK_M=plan.block_q_bwd, BLOCK_N=plan.block_kv, SPLIT_LEN=plan.q_split_len_bwd,
        PREC=_precision.triton_input_precision(precision))
    if qs > 1:
      dk = jnp.sum(dk, axis=0, dtype=jnp.float32).astype(k.dtype)
      dv = jnp.sum(dv, axis=0, dtype=jnp.float32).astype(v.dtype)
    else:
      dk, dv = dk[0], dv[0]
    return dq, dk, dv
  (delta,) = launch(ak._attn_bwd_delta_kernel, (cdiv(lq, plan.block_q), b * h),
                    (o, do), (jax.ShapeDtypeStruct((b, h, lq), jnp.float32),),
                    num_stages=1, H=h, LQ=lq, DH=dh, D_PAD=plan.d_pad,
                    BLOCK_M=plan.block_q, **run)
  common = dict(SCALE=float(scale), B=b, H=h, LQ=lq, LK=lk, DH=dh, D_PAD=plan.d_pad,
                PREC=_precision.triton_input_precision(precision),
                num_stages=plan.num_stages, **run)
  qs = plan.q_splits_bwd
  part_dt = jnp.float32 if qs > 1 else q.dtype
  dk, dv = launch(ak._attn_bwd_dkdv_kernel, (cdiv(lk, plan.block_kv_bwd), b * h, qs),
                  (q, k, v, do, lse, delta),
                  (jax.ShapeDtypeStruct((qs,) + k.shape, part_dt),) * 2,
                  BLOCK_M=plan.block_q_bwd, BLOCK_N=plan.block_kv_bwd,
                  SPLIT_LEN=plan.q_split_len_bwd, **common)
  ks = plan.kv_splits
  part_dt = jnp.float32 if ks > 1 else q.dtype
  (dq,) = launch(ak._attn_bwd_dq_kernel, (cdiv(lq, plan.block_q), b * h, ks),
                 (q, k, v, do, lse, delta),
                 (jax.ShapeDtypeStruct((ks,) + q.shape, part_dt),),
                 BLOCK_M=plan.block_q, BLOCK_N=plan.block_kv, SPLIT_LEN=plan.split_len,
                 **common)
  # Sum the split partials (a no-op reshape when there is one split).
  dq = jnp.sum(dq, axis=0, dtype=jnp.float32).astype(q.dtype) if ks > 1 else dq[0]
  dk = jnp.sum(dk, axis=0, dtype=jnp.float32).astype(k.dtype) if qs > 1 else dk[0]
  dv = jnp.sum(dv, axis=0, dtype=jnp.float32).astype(v.dtype) if qs > 1 else dv[0]
  return dq, dk, dv


@cached
def units(scale, interpret, block_sizes, precision):
  """(forward, backward) vmappable units: forward(q, k, v) -> (o, lse),
  backward(q, k, v, o, lse, do) -> (dq, dk, dv). Also used by the fused read block."""
  kw = dict(scale=scale, interpret=interpret, block_sizes=block_sizes, precision=precision)
  fwd = vmappable(functools.partial(_fwd_impl, **kw), (True, True, True))
  bwd = vmappable(functools.partial(_bwd_impl, **kw), (True,) * 6)
  return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, scale, interpret, block_sizes, precision):
  return units(scale, interpret, block_sizes, precision)[0](q, k, v)[0]


def _attention_fwd(q, k, v, scale, interpret, block_sizes, precision):
  o, lse = units(scale, interpret, block_sizes, precision)[0](q, k, v)
  return o, (q, k, v, o, lse)


def _attention_bwd(scale, interpret, block_sizes, precision, res, do):
  q, k, v, o, lse = res
  return units(scale, interpret, block_sizes, precision)[1](q, k, v, o, lse,
                                                           do.astype(q.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)


def cross_attention(q, k, v, *, scale=None, interpret=False, block_sizes=None,
                    precision=None):
  """softmax(q k^T * scale) v on the Triton kernels; [B, L, H, Dh] layout."""
  _check_dtype(q.dtype)
  precision = _precision.check(precision)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  bs = config.as_block_sizes(block_sizes)
  # Validate block sizes and budgets eagerly, with the caller's shapes.
  _plan(q, k, bs, precision)
  return _attention(q, k, v, scale, bool(interpret), bs, precision)
