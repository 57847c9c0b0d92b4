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

write_block forward, one kernel per tile (write_block_kernel.py): when the tile fits
(`write_block_kernel.plan`: fp16/bf16 with T <= 512, head dim <= 128,
weight tiles within the sm_80 shared-memory limit; see that module's docstring), the
forward is K, V = two fused_linear launches on the latents, then ONE kernel with grid
(cdiv(N, BLOCK_N), B) doing LN -> q-proj -> attention -> out-proj -> residual -> LN ->
MLP -> residual on a tile read once and written once. It is a jax.custom_vjp: an
undifferentiated call (sampling, evaluation) runs the one kernel; a differentiated call
runs the composed forward and keeps its residuals for the composed backward (whose ops
carry the Triton backward kernels), so training never computes the forward twice. Otherwise (or with fused=False) the composed path
runs forwards too. `block_sizes` applies to the composed ops (K/V projections, backward).

read_block forward (read_block_kernel.py): for fp16/bf16 within its plan, the interface
K/V projection is fused into the split-K attention kernel (K/V never written); same
custom_vjp rule as the write block (undifferentiated calls only).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.params import ReadBlockParams, WriteBlockParams
from kernels.triton_gpu import config
from kernels.triton_gpu import write_block_kernel as wbk
from kernels.triton_gpu.attention import cross_attention
from kernels.triton_gpu.launch import dummy, launch, vmappable
from kernels.triton_gpu.linear import LN_EPS, fused_linear


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


def read_block(z, x, p: ReadBlockParams, *, num_heads, interpret=False, block_sizes=None,
               fused=None):
  """fused: None picks the fused K/V-projection forward (read_block_kernel.py) when its
  plan fits, True demands it (fp32 included), False forces the composed path."""
  from kernels.triton_gpu import read_block_kernel as rbk  # (it imports this module lazily)
  pl = None
  if fused is not False:
    pl = rbk.plan(z.shape[0], z.shape[1], x.shape[1], x.shape[2], p.wq.shape[1], num_heads,
                  jnp.dtype(z.dtype).name, force_fp32=bool(fused))
  if fused and pl is None:
    raise ValueError(f"read_block: the fused forward does not fit M={z.shape[1]}, "
                     f"head_dim={p.wq.shape[1] // num_heads}, dtype {jnp.dtype(z.dtype)}")
  if pl is None:
    y = _attend(z, x, p, num_heads, interpret, block_sizes, z.dtype)
    return y.reshape(z.shape)
  cfg = rbk.ReadCfg(int(num_heads), bool(interpret), config.as_block_sizes(block_sizes), pl)
  return rbk.read_block(z, x, p, cfg)


def _composed_write_block(x, z, p: WriteBlockParams, *, num_heads, interpret=False,
                          block_sizes=None):
  """The write block as a chain of fused_linear / cross_attention ops (5+ launches)."""
  if p.w1 is None:
    return _attend(x, z, p, num_heads, interpret, block_sizes, x.dtype).reshape(x.shape)
  y = _attend(x, z, p, num_heads, interpret, block_sizes, jnp.float32)
  kw = dict(interpret=interpret, block_sizes=block_sizes)
  h = fused_linear(y, p.w1, p.b1, ln=(p.mlp_ln_scale, p.mlp_ln_bias), gelu=True,
                   out_dtype=x.dtype, **kw)
  out = fused_linear(h, p.w2, p.b2, residual=y, out_dtype=x.dtype, **kw)
  return out.reshape(x.shape)


# ----------------------------------------------------------------------------
# One-kernel-per-tile write-block forward (write_block_kernel.py).
# ----------------------------------------------------------------------------

class _WCfg(NamedTuple):
  num_heads: int
  interpret: bool
  block_sizes: config.BlockSizes
  plan: wbk.WriteBlockPlan


def _one_kernel_impl(x, k, v, lns, lnb, wq, bq, wo, bo, mlns, mlnb, w1, b1, w2, b2, *,
                     cfg: _WCfg, has_mlp: bool):
  bsz, n, t = x.shape
  m, width = k.shape[1:]
  h = cfg.num_heads
  dh = width // h
  pl = cfg.plan
  (out,) = launch(
      wbk._write_block_fwd_kernel, (config.cdiv(n, pl.block_n), bsz),
      (x, k, v, lns, lnb, wq, bq, wo, bo, mlns, mlnb, w1, b1, w2, b2),
      (jax.ShapeDtypeStruct(x.shape, x.dtype),), interpret=cfg.interpret,
      num_warps=pl.num_warps, num_stages=pl.num_stages,
      N=n, T=t, T_PAD=pl.t_pad, M=m, H=h, DH=dh, D_PAD=pl.d_pad,
      F=w1.shape[1] if has_mlp else 0, SCALE=float(dh ** -0.5), LN_EPS=LN_EPS,
      HAS_MLP=has_mlp, BLOCK_N=pl.block_n, BLOCK_M=pl.block_m, BLOCK_F=pl.block_f,
      IEEE=jnp.dtype(x.dtype) == jnp.float32)
  return (out,)


@functools.lru_cache(maxsize=None)
def _one_kernel_unit(cfg: _WCfg, has_mlp: bool):
  # x, k, v carry the batch axis (a vmapped axis folds into it); weights do not.
  return vmappable(functools.partial(_one_kernel_impl, cfg=cfg, has_mlp=has_mlp),
                   (True, True, True) + (False,) * 12)


def _one_kernel_forward(x, z, p: WriteBlockParams, cfg: _WCfg):
  bsz, m, d = z.shape
  width = p.wq.shape[1]
  kw = dict(interpret=cfg.interpret, block_sizes=cfg.block_sizes)
  z2 = z.reshape(bsz * m, d)
  k = fused_linear(z2, p.wk, p.bk, **kw).reshape(bsz, m, width)
  v = fused_linear(z2, p.wv, p.bv, **kw).reshape(bsz, m, width)
  if p.has_mlp:
    mlp = (p.mlp_ln_scale, p.mlp_ln_bias, p.w1, p.b1, p.w2, p.b2)
  else:
    mlp = (dummy(),) * 6
  (out,) = _one_kernel_unit(cfg, p.has_mlp)(x, k, v, p.ln_scale, p.ln_bias, p.wq, p.bq,
                                            p.wo, p.bo, *mlp)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _write_block_one_kernel(x, z, p, cfg):
  return _one_kernel_forward(x, z, p, cfg)


def _wb_fwd(x, z, p, cfg):
  # Differentiated calls run the composed forward (saving its residuals) instead of the
  # one kernel: a one-kernel forward plus a composed re-run in the backward would do
  # the forward twice. The one kernel serves the undifferentiated (sampling) calls.
  composed = functools.partial(_composed_write_block, num_heads=cfg.num_heads,
                               interpret=cfg.interpret, block_sizes=cfg.block_sizes)
  out, vjp = jax.vjp(composed, x, z, p)
  return out, vjp


def _wb_bwd(cfg, vjp, dy):
  del cfg
  return vjp(dy)


_write_block_one_kernel.defvjp(_wb_fwd, _wb_bwd)


def write_plan(x, z, p: WriteBlockParams, num_heads, force_fp32=False):
  """The one-kernel forward's launch plan for these shapes, or None (composed path)."""
  hidden = p.w1.shape[1] if p.has_mlp else 0
  return wbk.plan(x.shape[1], x.shape[2], z.shape[1], p.wq.shape[1], num_heads, hidden,
                  jnp.dtype(x.dtype).name, force_fp32)


def write_block(x, z, p: WriteBlockParams, *, num_heads, interpret=False, block_sizes=None,
                fused=None):
  """fused: None picks the one-kernel forward when write_plan fits, True demands it
  (fp32 included, which the automatic rule never picks), False forces the composed path."""
  pl = write_plan(x, z, p, num_heads, force_fp32=bool(fused)) if fused is not False else None
  if fused and pl is None:
    raise ValueError(f"write_block: the one-kernel forward does not fit T={x.shape[2]}, "
                     f"head_dim={p.wq.shape[1] // num_heads}, dtype {jnp.dtype(x.dtype)}")
  if pl is None:
    return _composed_write_block(x, z, p, num_heads=num_heads, interpret=interpret,
                                 block_sizes=block_sizes)
  cfg = _WCfg(int(num_heads), bool(interpret), config.as_block_sizes(block_sizes), pl)
  return _write_block_one_kernel(x, z, p, cfg)
