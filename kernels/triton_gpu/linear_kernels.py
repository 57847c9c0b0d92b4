"""Triton kernels for the token-wise parts of the read/write blocks.

  _fused_linear_kernel   [row blocks, column blocks]
      y = epilogue(prologue(x) @ w + b), where
        prologue: optional LayerNorm of each row of x (two-pass mean/variance, eps),
        epilogue: optional exact (erf) GELU, optional residual add, or -- for the
                  backward pass -- the GELU derivative times an incoming gradient.
      With every option off it is a plain strided matmul, which is how the backward
      pass computes dX = dY W^T and dW = X^T dY (transposes are just swapped strides).
  _layer_norm_fwd_kernel [row blocks]   u = LN(x) * scale + bias (materialised for dW).
  _layer_norm_bwd_kernel [row blocks]   dx of a LayerNorm, and per-block partial sums
                                        of d(scale), d(bias).
All sizes and strides are constexpr (static under jit).
"""
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, b_ptr, ln_s_ptr, ln_b_ptr, r_ptr, y_ptr,
    R: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
    SXR: tl.constexpr, SXK: tl.constexpr, SWK: tl.constexpr, SWN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, LN_EPS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # 0: none, 1: gelu, 2: + residual, 3: r * gelu'(.)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
  pid_r = tl.program_id(0)
  pid_n = tl.program_id(1)
  offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  r_mask = offs_r < R
  n_mask = offs_n < N

  if HAS_LN:
    # Row statistics over the full feature axis K, two passes like the reference.
    acc_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
      offs_k = k0 + tl.arange(0, BLOCK_K)
      xm = r_mask[:, None] & (offs_k < K)[None, :]
      xk = tl.load(x_ptr + offs_r[:, None] * SXR + offs_k[None, :] * SXK, mask=xm, other=0.0)
      acc_s += tl.sum(xk.to(tl.float32), 1)
    mean = acc_s / K
    acc_v = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
      offs_k = k0 + tl.arange(0, BLOCK_K)
      xm = r_mask[:, None] & (offs_k < K)[None, :]
      xk = tl.load(x_ptr + offs_r[:, None] * SXR + offs_k[None, :] * SXK, mask=xm, other=0.0)
      xc = tl.where(xm, xk.to(tl.float32) - mean[:, None], 0.0)
      acc_v += tl.sum(xc * xc, 1)
    rstd = 1.0 / tl.sqrt(acc_v / K + LN_EPS)

  acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
  for k0 in range(0, K, BLOCK_K):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    xm = r_mask[:, None] & k_mask[None, :]
    xk = tl.load(x_ptr + offs_r[:, None] * SXR + offs_k[None, :] * SXK, mask=xm, other=0.0)
    if HAS_LN:
      g = tl.load(ln_s_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
      bb = tl.load(ln_b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
      xn = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :]
      xk = tl.where(xm, xn, 0.0).to(xk.dtype)
    wk = tl.load(w_ptr + offs_k[:, None] * SWK + offs_n[None, :] * SWN,
                 mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    if DOT_F32:
      acc += tl.dot(xk.to(tl.float32), wk.to(tl.float32), input_precision="ieee")
    else:
      acc += tl.dot(xk, wk.to(xk.dtype))

  if HAS_BIAS:
    acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
  out_idx = offs_r[:, None] * N + offs_n[None, :]
  out_mask = r_mask[:, None] & n_mask[None, :]
  if EPILOGUE == 1:
    acc = 0.5 * acc * (1.0 + tl.math.erf(acc * _SQRT1_2))
  elif EPILOGUE == 2:
    acc += tl.load(r_ptr + out_idx, mask=out_mask, other=0.0).to(tl.float32)
  elif EPILOGUE == 3:
    # d gelu(a) / da = Phi(a) + a phi(a)
    cdf = 0.5 * (1.0 + tl.math.erf(acc * _SQRT1_2))
    pdf = tl.exp(-0.5 * acc * acc) * _INV_SQRT_2PI
    gin = tl.load(r_ptr + out_idx, mask=out_mask, other=0.0).to(tl.float32)
    acc = gin * (cdf + acc * pdf)
  tl.store(y_ptr + out_idx, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, s_ptr, b_ptr, u_ptr,
    R: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, LN_EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
  offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
  offs_c = tl.arange(0, C_PAD)
  c_mask = offs_c < C
  m = (offs_r < R)[:, None] & c_mask[None, :]
  idx = offs_r[:, None] * C + offs_c[None, :]
  x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
  mean = tl.sum(x, 1) / C
  xc = tl.where(m, x - mean[:, None], 0.0)
  rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + LN_EPS)
  g = tl.load(s_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
  bb = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
  u = xc * rstd[:, None] * g[None, :] + bb[None, :]
  tl.store(u_ptr + idx, u.to(u_ptr.dtype.element_ty), mask=m)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, s_ptr, du_ptr, dx_ptr, ds_part_ptr, db_part_ptr,
    R: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, LN_EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
  pid = tl.program_id(0)
  offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
  offs_c = tl.arange(0, C_PAD)
  c_mask = offs_c < C
  m = (offs_r < R)[:, None] & c_mask[None, :]
  idx = offs_r[:, None] * C + offs_c[None, :]
  x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
  du = tl.load(du_ptr + idx, mask=m, other=0.0).to(tl.float32)
  g = tl.load(s_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
  mean = tl.sum(x, 1) / C
  xc = tl.where(m, x - mean[:, None], 0.0)
  rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + LN_EPS)
  xhat = xc * rstd[:, None]
  dxhat = du * g[None, :]
  c1 = tl.sum(dxhat * xhat, 1) / C
  c2 = tl.sum(dxhat, 1) / C
  dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
  tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=m)
  tl.store(ds_part_ptr + pid * C + offs_c, tl.sum(du * xhat, 0), mask=c_mask)
  tl.store(db_part_ptr + pid * C + offs_c, tl.sum(du, 0), mask=c_mask)
