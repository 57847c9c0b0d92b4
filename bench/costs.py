"""FLOPs and minimum HBM bytes of the RIN kernels (pure Python, no jax).

"Minimum bytes" is what any implementation must move between HBM and the chip:
each input read once, each output written once (activations in `dtype`, the
fp32 log-sum-exp residual of attention counted, no intermediate round trips).
FLOPs count 2 per multiply-add of the matmuls (the algorithm's, not a kernel's
recomputation); elementwise work (softmax, LN, GELU) is left out: it is small
next to the matmuls and runs on other units. Backward FLOPs are those of the
gradient matmuls alone (2x each forward matmul: input and weight gradients).
"""
from __future__ import annotations

import dataclasses

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def itemsize(dtype) -> int:
  return ITEMSIZE[str(getattr(dtype, "name", dtype))]


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: int
  bytes: int
  transcendentals: int = 0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.bytes + other.bytes,
                self.transcendentals + other.transcendentals)

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes

  def roofline_s(self, peak_flops: float, bandwidth: float) -> float:
    return max(self.flops / peak_flops, self.bytes / bandwidth)


def cross_attention(batch, q_len, kv_len, heads, head_dim, dtype="bfloat16", *,
                    backward=False) -> Cost:
  """softmax(q k^T) v, [B, L, H, Dh]. backward=True: the dQ/dK/dV pass alone."""
  s = itemsize(dtype)
  mac = batch * heads * q_len * kv_len * head_dim
  q_elems, kv_elems = batch * q_len * heads * head_dim, batch * kv_len * heads * head_dim
  lse = 4 * batch * heads * q_len
  exps = batch * heads * q_len * kv_len
  if not backward:   # read q, k, v; write o and lse
    return Cost(4 * mac, s * (2 * q_elems + 2 * kv_elems) + lse, exps)
  # read q, k, v, o, do, lse; write dq, dk, dv
  return Cost(8 * mac, s * (4 * q_elems + 4 * kv_elems) + lse, exps)


def _param_count(q_width, kv_width, width, mlp_hidden=0):
  n = 2 * q_width + q_width * width + width + 2 * (kv_width * width + width)
  n += width * q_width + q_width
  if mlp_hidden:
    n += 2 * q_width + q_width * mlp_hidden + mlp_hidden + mlp_hidden * q_width + q_width
  return n


def _block(batch, lq, cq, lk, ckv, heads, width, mlp_hidden, dtype, backward):
  s = itemsize(dtype)
  macs = (batch * lq * cq * width            # q projection
          + 2 * batch * lk * ckv * width     # k, v projections
          + 2 * batch * lq * lk * width      # q k^T and p v
          + batch * lq * width * cq          # out projection
          + 2 * batch * lq * cq * mlp_hidden)  # MLP
  params = s * _param_count(cq, ckv, width, mlp_hidden)
  acts = s * batch * (lq * cq + lk * ckv)
  exps = batch * heads * lq * lk + batch * lq * mlp_hidden
  if not backward:   # read both sources and the weights, write the output
    return Cost(2 * macs, acts + params + s * batch * lq * cq, exps)
  # read both sources, the weights and d(out); write both source grads and weight grads
  return Cost(4 * macs, 2 * acts + 2 * params + s * batch * lq * cq, exps)


def read_block(batch, m, d, n, t, heads, width, dtype="bfloat16", *, backward=False) -> Cost:
  """z [B, M, D] <- x [B, N, T]: LN, q-proj, K/V-proj, attention, out-proj, residual."""
  return _block(batch, m, d, n, t, heads, width, 0, dtype, backward)


def write_block(batch, n, t, m, d, heads, width, mlp_hidden, dtype="bfloat16", *,
                backward=False) -> Cost:
  """x [B, N, T] <- z [B, M, D]: attention part as read_block, then LN + MLP + residual."""
  return _block(batch, n, t, m, d, heads, width, mlp_hidden, dtype, backward)


def op_cost(o, batch, dtype="bfloat16", *, backward=False) -> Cost:
  """The cost of one op of the shapes table (a kernels.shapes.OpShape) at `batch`."""
  if o.kind == "attention":
    return cross_attention(batch, o.lq, o.lk, o.heads, o.head_dim, dtype, backward=backward)
  if o.kind == "read":
    return read_block(batch, o.lq, o.cq, o.lk, o.ckv, o.heads, o.width, dtype,
                      backward=backward)
  return write_block(batch, o.lq, o.cq, o.lk, o.ckv, o.heads, o.width, o.mlp, dtype,
                     backward=backward)
