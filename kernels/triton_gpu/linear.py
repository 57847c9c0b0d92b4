"""Token-wise fused linear op on the Triton kernels: forward, backward, vmap.

    y = fused_linear(x, w, b, ln=(scale, bias) | None, gelu=False, residual=None)
      = [residual +] [gelu](LN(x) @ w + b)            x: [R, K], w: [K, N]

Forward is one `_fused_linear_kernel` launch (LN prologue and GELU / residual
epilogue fused). Backward (custom_vjp, recomputing instead of saving activations):
  dpre = dy * gelu'(LN(x) @ w + b)      fused-linear kernel, EPILOGUE=3 (recompute)
  du   = dpre @ w^T                     fused-linear kernel as a strided matmul
  dW   = LN(x)^T @ dpre                 LN-forward kernel, then strided matmul
  dx, d(ln scale), d(ln bias)           LN-backward kernel (+ XLA sum of per-block partials)
  d(b) = sum_rows dpre, d(residual) = dy   (XLA reductions / pass-through)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.triton_gpu import config
from kernels.triton_gpu import linear_kernels as lk
from kernels.triton_gpu.launch import dummy, launch, vmappable

LN_EPS = 1e-6


class _Cfg(NamedTuple):
  has_ln: bool
  gelu: bool
  has_res: bool
  out_dtype: str
  interpret: bool
  block_sizes: config.BlockSizes


def _low(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)


def _matmul_launch(a, a_strides, w, w_strides, r, k, n, out_dtype, cfg, *, bias=None,
                   ln=None, epilogue=0, extra=None):
  """Launches the fused-linear kernel on (strided) operands a [r, k] and w [k, n]."""
  plan = config.linear_plan(r, k, n, jnp.dtype(a.dtype).name, cfg.block_sizes)
  lns, lnb = ln if ln is not None else (dummy(), dummy())
  (y,) = launch(
      lk._fused_linear_kernel,
      (config.cdiv(r, plan.block_rows), config.cdiv(n, plan.block_cols)),
      (a, w, bias if bias is not None else dummy(), lns, lnb,
       extra if extra is not None else dummy()),
      (jax.ShapeDtypeStruct((r, n), out_dtype),), interpret=cfg.interpret,
      num_warps=plan.num_warps, num_stages=plan.num_stages,
      R=r, K=k, N=n, SXR=a_strides[0], SXK=a_strides[1], SWK=w_strides[0],
      SWN=w_strides[1], HAS_BIAS=bias is not None, HAS_LN=ln is not None,
      LN_EPS=LN_EPS, EPILOGUE=epilogue, BLOCK_R=plan.block_rows,
      BLOCK_N=plan.block_cols, BLOCK_K=plan.block_k,
      DOT_F32=not _low(a.dtype))
  return y


def _fwd_impl(x, w, b, lns, lnb, res, *, cfg: _Cfg):
  r, k = x.shape
  n = w.shape[1]
  epi = 1 if cfg.gelu else (2 if cfg.has_res else 0)
  return (_matmul_launch(x, (k, 1), w, (n, 1), r, k, n, jnp.dtype(cfg.out_dtype), cfg,
                         bias=b, ln=(lns, lnb) if cfg.has_ln else None, epilogue=epi,
                         extra=res if cfg.has_res else None),)


def _gelu_grad_impl(x, w, b, lns, lnb, dy, *, cfg: _Cfg):
  r, k = x.shape
  n = w.shape[1]
  return (_matmul_launch(x, (k, 1), w, (n, 1), r, k, n, _grad_dtype(x.dtype), cfg,
                         bias=b, ln=(lns, lnb) if cfg.has_ln else None, epilogue=3,
                         extra=dy),)


def _grad_dtype(dtype):
  return jnp.dtype(dtype) if _low(dtype) else jnp.dtype(jnp.float32)


def _dx_impl(dpre, w, *, cfg: _Cfg):
  """du = dpre @ w^T (w is [K, N], read transposed through strides)."""
  r, n = dpre.shape
  k = w.shape[0]
  return (_matmul_launch(dpre, (n, 1), w, (1, n), r, n, k, jnp.float32, cfg),)


def _ln_fwd_impl(x, lns, lnb, *, cfg: _Cfg):
  r, c = x.shape
  br = config.ln_block_rows(c)
  (u,) = launch(lk._layer_norm_fwd_kernel, (config.cdiv(r, br),), (x, lns, lnb),
                (jax.ShapeDtypeStruct((r, c), _grad_dtype(x.dtype)),),
                interpret=cfg.interpret, num_warps=4, num_stages=1, R=r, C=c,
                C_PAD=config.next_pow2(c), LN_EPS=LN_EPS, BLOCK_R=br)
  return (u,)


def _dw_impl(u, dpre, *, cfg: _Cfg):
  """dW = u^T @ dpre: u [R, K] read transposed, reduction over rows."""
  r, k = u.shape
  n = dpre.shape[1]
  return (_matmul_launch(u, (1, k), dpre, (n, 1), k, r, n, jnp.float32, cfg),)


def _ln_bwd_impl(x, lns, du, *, cfg: _Cfg):
  r, c = x.shape
  br = config.ln_block_rows(c)
  nb = config.cdiv(r, br)
  dx, ds, db = launch(
      lk._layer_norm_bwd_kernel, (nb,), (x, lns, du),
      (jax.ShapeDtypeStruct((r, c), jnp.float32), jax.ShapeDtypeStruct((nb, c), jnp.float32),
       jax.ShapeDtypeStruct((nb, c), jnp.float32)),
      interpret=cfg.interpret, num_warps=4, num_stages=1, R=r, C=c,
      C_PAD=config.next_pow2(c), LN_EPS=LN_EPS, BLOCK_R=br)
  return dx, jnp.sum(ds, 0), jnp.sum(db, 0)


@functools.lru_cache(maxsize=None)
def _units(cfg: _Cfg):
  p = lambda f: functools.partial(f, cfg=cfg)
  return dict(
      fwd=vmappable(p(_fwd_impl), (True, False, False, False, False, True)),
      gelu_grad=vmappable(p(_gelu_grad_impl), (True, False, False, False, False, True)),
      dx=vmappable(p(_dx_impl), (True, False)),
      ln_fwd=vmappable(p(_ln_fwd_impl), (True, False, False)),
      dw=vmappable(p(_dw_impl), (False, False)),
      ln_bwd=vmappable(p(_ln_bwd_impl), (False, False, False)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_linear(x, w, b, lns, lnb, res, cfg):
  return _units(cfg)["fwd"](x, w, b, lns, lnb, res)[0]


def _fl_fwd(x, w, b, lns, lnb, res, cfg):
  return _fused_linear(x, w, b, lns, lnb, res, cfg), (x, w, b, lns, lnb, res)


def _fl_bwd(cfg, saved, dy):
  x, w, b, lns, lnb, res = saved
  u = _units(cfg)
  gdt = _grad_dtype(x.dtype)
  if cfg.gelu:
    (dpre,) = u["gelu_grad"](x, w, b, lns, lnb, dy.astype(gdt))
  else:
    dpre = dy.astype(gdt)
  (du,) = u["dx"](dpre, w)
  xin = u["ln_fwd"](x, lns, lnb)[0] if cfg.has_ln else x
  (dw,) = u["dw"](xin, dpre)
  db = jnp.sum(dpre, axis=0, dtype=jnp.float32)
  if cfg.has_ln:
    dx, dlns, dlnb = u["ln_bwd"](x, lns, du)
  else:
    dx, dlns, dlnb = du, jnp.zeros_like(lns), jnp.zeros_like(lnb)
  dres = dy.astype(res.dtype) if cfg.has_res else jnp.zeros_like(res)
  return (dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype),
          dlns.astype(lns.dtype), dlnb.astype(lnb.dtype), dres)


_fused_linear.defvjp(_fl_fwd, _fl_bwd)


def fused_linear(x, w, b, *, ln=None, gelu=False, residual=None, out_dtype=None,
                 interpret=False, block_sizes=None):
  """[residual +] [gelu](LN(x) @ w + b) for x [R, K]; output [R, N] in out_dtype."""
  if gelu and residual is not None:
    raise ValueError("fused_linear: gelu and residual together are not supported")
  cfg = _Cfg(ln is not None, bool(gelu), residual is not None,
             jnp.dtype(out_dtype or x.dtype).name, bool(interpret),
             config.as_block_sizes(block_sizes))
  lns, lnb = ln if ln is not None else (dummy(), dummy())
  res = residual if residual is not None else dummy()
  return _fused_linear(x, w, b, lns, lnb, res, cfg)
