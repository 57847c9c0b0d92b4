"""Pure jax.numpy reference for every op: the test oracle and the CPU fallback.

Everything here is written for clarity, not speed. Arithmetic runs in float32
(or float64 when the inputs are float64, which is how the tests build their
oracle) and results are cast back to the input dtype. Every fast path in
`kernels/` is tested against these functions.

Precision (kernels/precision.py): every dot takes `precision=` (None: XLA's default,
which is TF32 for fp32 operands on GPU, as a user's plain XLA model runs; "highest":
exact fp32). The "xla" implementation passes the caller's precision (default None);
the test oracle passes "highest".
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels import precision as _precision
from kernels.params import (LatentAttentionParams, LatentMLPParams, ReadBlockParams,
                            WriteBlockParams)

LN_EPS = 1e-6
SQRT_HALF = 0.7071067811865476               # 1 / sqrt(2), in the erf GELU
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # the normal density's constant


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for low-precision inputs, float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x, scale, bias, eps: float = LN_EPS):
  """Pre-norm LayerNorm over the last axis (two-pass variance, eps 1e-6)."""
  cdt = compute_dtype(x.dtype)
  x = x.astype(cdt)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  return y * scale.astype(cdt) + bias.astype(cdt)


def gelu(x):
  """Exact (erf) GELU, as the authors' code uses: x * Phi(x) = x/2 * (1 + erf(x/sqrt 2)).

  Computed in at least float32 and returned in x's dtype. The same function as
  ``jax.nn.gelu(x, approximate=False)``, which goes through erfc: XLA:CPU expands erfc
  into a much longer select chain than erf (bf16 [32,128,2048] forward 12.3 -> 4.4 ms
  in a one-off microbenchmark). The erf form loses relative precision only where
  x < -5, where |gelu(x)| < 2e-6 and the absolute error stays below float32 ulps of 1.
  """
  wide = x.astype(compute_dtype(x.dtype))
  return (0.5 * wide * (1.0 + jax.lax.erf(wide * SQRT_HALF))).astype(x.dtype)


def _mix32(h):
  """murmur3's 32-bit finaliser: a bijection of uint32 in which every input bit flips each
  output bit with probability ~1/2 (full avalanche)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


HASH_PHI = 0x9E3779B9    # the 32-bit golden ratio: counter_hash_bits' index multiplier


def counter_hash_bits(seed, shape) -> jax.Array:
  """32 pseudo-random bits per element of `shape`: a keyed hash of the element's flat index.

  seed: uint32[2] (drawn from a JAX PRNG key). Each element is mix(mix(i * phi + s0) ^ s1),
  i the flat index, phi the 32-bit golden ratio: a function of the index alone, so XLA fuses
  it into the consumer and recomputes it in the backward pass instead of generating and
  storing a bits array (what jax.random.bits / RngBitGenerator do), and a kernel computes
  the same bits from its tile's indices (the latent MLP kernels' dropout).
  """
  n = math.prod(shape)
  if n >= 2 ** 32:
    raise ValueError(f"counter_hash_bits: shape {tuple(shape)} has {n} elements; the flat "
                     "index is 32-bit, so at most 2^32 - 1 elements")
  idx = jax.lax.iota(jnp.uint32, n).reshape(shape)
  return _mix32(_mix32(idx * jnp.uint32(HASH_PHI) + seed[0]) ^ seed[1])


def dropout_threshold(rate: float) -> int:
  """The uint32 threshold of inverted dropout at `rate`: an element survives when its hash
  bits are below it (probability k = threshold / 2^32, within 2^-33 of 1 - rate) and
  survivors are scaled by exactly 2^32 / threshold = 1/k, so E[output] = input."""
  return min(int(round((1.0 - rate) * 2.0 ** 32)), 2 ** 32 - 1)


def hash_dropout(h, seed, rate: float):
  """Inverted dropout of h with counter_hash_bits(seed, h.shape) as its mask; the scale in
  at least float32 (a bf16 1/k, 1/0.9 -> 1.109375, would bias the mean)."""
  if rate == 0.0:
    return h
  threshold = dropout_threshold(rate)
  keep = counter_hash_bits(seed, h.shape) < jnp.uint32(threshold)
  wide = h.astype(jnp.promote_types(h.dtype, jnp.float32))
  return jnp.where(keep, wide * (2.0 ** 32 / threshold), 0.0).astype(h.dtype)


def operand_dtype(dtype) -> jnp.dtype:
  """Matmul operand dtype: bf16/fp16 inputs stay low precision (accumulated in fp32, as
  the kernels' MXU / tensor-core dots do); fp32 and fp64 stay as they are."""
  return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize < 4 else compute_dtype(dtype)


def dense(x, w, b, operands=None, precision=None):
  """x @ w + b accumulated in fp32 (fp64 for fp64); `operands` sets the operand dtype."""
  cdt = compute_dtype(x.dtype if operands is None else operands)
  op = operand_dtype(x.dtype if operands is None else operands)
  # Low-precision dots emit their own dtype (XLA accumulates them in fp32 on TPU/GPU), so
  # that their backward dots take low-precision cotangents too.
  y = jnp.einsum("...i,io->...o", x.astype(op), w.astype(op),
                 precision=_precision.lax_precision(precision), preferred_element_type=op)
  return y.astype(cdt) + b.astype(cdt)


@jax.custom_vjp
def softmax(s):
  """Softmax over the last axis; equal to ``jax.nn.softmax`` up to rounding (one ulp).

  Written as exp(s - max) * (1 / sum) rather than jax.nn.softmax's divide because, with
  oneDNN dots enabled on CPU (rin/xla_cpu.py), XLA rewrites the divide form in forward-only
  programs into a ``__onednn$softmax`` custom call that (jax 0.12) cannot be serialised:
  every sampling / self-conditioning program then fails to enter the persistent
  compilation cache ("MemoryError: std::bad_alloc"), and that call was no faster than
  XLA's own fusion here (fp32 [32,16,128,256]: ~40 ms vs ~30 ms). The backward is
  jax.nn.softmax's: p * (g - sum(g * p)).
  """
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _softmax_fwd(s):
  p = softmax(s)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def cross_attention(q, k, v, *, scale: float | None = None, precision=None):
  """softmax(q k^T * scale) v, layout [batch, seq, heads, head_dim].

  Returns the input dtype. Softmax in float32 (float64 for float64); bf16/fp16 inputs
  are bf16/fp16 matmul operands, as in the kernels.
  """
  head_dim = q.shape[-1]
  scale = head_dim ** -0.5 if scale is None else scale
  cdt, op = compute_dtype(q.dtype), operand_dtype(q.dtype)
  prec = _precision.lax_precision(precision)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(op), k.astype(op),
                 precision=prec, preferred_element_type=op)
  p = softmax(s.astype(cdt) * scale)
  o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(op), v.astype(op),
                 precision=prec, preferred_element_type=op)
  return o.astype(q.dtype)


def _split_heads(x, num_heads):
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def _merge_heads(x):
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def attention_block(x_q, x_kv, p, *, num_heads: int, precision=None, attention=None):
  """Residual MHA with pre-norm on the queries only: x_q + MHA(LN(x_q), x_kv).

  Shared by the read block (queries = latents, kv = interface) and the write
  block (queries = interface, kv = latents). Keys/values are projected from the
  raw source with no LayerNorm, as in the authors' code. `attention(q, k, v)`: the
  attention core (default cross_attention), as in latent_attention_block.
  """
  attention = attention or functools.partial(cross_attention, precision=precision)
  cdt, op = compute_dtype(x_q.dtype), x_q.dtype
  h = layer_norm(x_q, p.ln_scale, p.ln_bias)
  pr = dict(precision=precision)
  q = _split_heads(dense(h, p.wq, p.bq, op, **pr), num_heads).astype(op)
  k = _split_heads(dense(x_kv, p.wk, p.bk, op, **pr), num_heads).astype(op)
  v = _split_heads(dense(x_kv, p.wv, p.bv, op, **pr), num_heads).astype(op)
  o = attention(q, k, v)
  return x_q.astype(cdt) + dense(_merge_heads(o), p.wo, p.bo, op, **pr)


def attention_probs(x_q, x_kv, p, *, num_heads: int):
  """The attention probabilities [B, heads, Q, K] of attention_block (float32): which keys
  each query reads. For visualisation only; no kernel computes or returns them."""
  cdt, op = compute_dtype(x_q.dtype), x_q.dtype
  h = layer_norm(x_q, p.ln_scale, p.ln_bias)
  q = _split_heads(dense(h, p.wq, p.bq, op), num_heads).astype(cdt)
  k = _split_heads(dense(x_kv, p.wk, p.bk, op), num_heads).astype(cdt)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
  return softmax(s * q.shape[-1] ** -0.5)


def read_block(z, x, p: ReadBlockParams, *, num_heads: int, precision=None, attention=None):
  """Read: latents z [B, M, D] attend to the interface x [B, N, T]."""
  return attention_block(z, x, p, num_heads=num_heads, precision=precision,
                         attention=attention).astype(z.dtype)


def interface_mlp(y, p: WriteBlockParams, dtype, precision=None):
  """y + MLP(LN(y)) of the write block (y: the fp32 residual stream; dtype: operands)."""
  h = layer_norm(y, p.mlp_ln_scale, p.mlp_ln_bias)
  pr = dict(precision=precision)
  return y + dense(gelu(dense(h, p.w1, p.b1, dtype, **pr)), p.w2, p.b2, dtype, **pr)


def write_block(x, z, p: WriteBlockParams, *, num_heads: int, precision=None,
                attention=None):
  """Write: interface x [B, N, T] attends to latents z [B, M, D], then the
  interface MLP (skipped when `p.w1 is None`). `attention`: as attention_block."""
  y = attention_block(x, z, p, num_heads=num_heads, precision=precision,
                      attention=attention)
  if p.w1 is not None:
    y = interface_mlp(y, p, x.dtype, precision)
  return y.astype(x.dtype)


def latent_attention_block(z, p: LatentAttentionParams, *, num_heads: int,
                           residual: bool = False, precision=None, attention=None):
  """Latent self-attention: OutProj(MHA(q, k, v = QKVProj(LN(z)))) [+ z when residual].

  Unlike the read/write blocks, keys and values come from the normalised latents (one LN
  feeds all three projections), as the authors' transformer encoder layer. Without
  `residual` it returns the branch alone (the model adds it through drop-path).
  `attention(q, k, v)`: the attention core ([B, M, H, hd] each; default this module's
  cross_attention), so a backend without a fused block composes it over its own core.
  """
  attention = attention or functools.partial(cross_attention, precision=precision)
  cdt, op = compute_dtype(z.dtype), z.dtype
  h = layer_norm(z, p.ln_scale, p.ln_bias)
  pr = dict(precision=precision)
  q, k, v = (_split_heads(dense(h, w, b, op, **pr), num_heads).astype(op)
             for w, b in ((p.wq, p.bq), (p.wk, p.bk), (p.wv, p.bv)))
  y = dense(_merge_heads(attention(q, k, v)), p.wo, p.bo, op, **pr)
  if residual:
    y = y + z.astype(cdt)
  return y.astype(z.dtype)


def latent_mlp_block(z, p: LatentMLPParams, *, residual: bool = False, branch_scale=None,
                     dropout_rate: float = 0.0, dropout_seed=None, precision=None):
  """The latent tower's MLP: [z +] s * (drop(GELU(LN(z) W1 + b1)) W2 + b2).

  drop: hash_dropout of the hidden [B, M, F] at `dropout_rate` keyed by `dropout_seed`
  (uint32[2]), as rin.layers.Dropout; s: `branch_scale` [B] (the model's drop-path: 0 or
  1/keep per example; None: 1). Matmul operands in z's dtype (the model's compute dtype),
  accumulation, GELU, dropout scale and residual add in float32; returns z's dtype.
  """
  cdt, op = compute_dtype(z.dtype), z.dtype
  pr = dict(precision=precision)
  h = gelu(dense(layer_norm(z, p.ln_scale, p.ln_bias), p.w1, p.b1, op, **pr))
  if dropout_rate:
    h = hash_dropout(h, dropout_seed, dropout_rate)
  y = dense(h, p.w2, p.b2, op, **pr)
  if branch_scale is not None:
    y = y * branch_scale.astype(cdt)[:, None, None]
  if residual:
    y = y + z.astype(cdt)
  return y.astype(z.dtype)
