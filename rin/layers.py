"""Flax (linen) layers of RIN, drop-in and kernel-backed.

Every layer takes `implementation=` (see `kernels.api`) and `interpret=`, and creates
the same parameter tree whatever the implementation, so a checkpoint trained with one
implementation loads into another. The fused read/write blocks hold their weights as
flat arrays (names match `kernels.params`) because the kernels consume them directly.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from kernels.params import ReadBlockParams, WriteBlockParams

LN_EPS = 1e-6
dense_init = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def LayerNorm(name: str | None = None, **kw) -> nn.LayerNorm:
  """Pre-norm LayerNorm as the authors use it (eps 1e-6, two-pass variance)."""
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name, **kw)


def Dense(features: int, name: str | None = None, dtype=None) -> nn.Dense:
  return nn.Dense(features, kernel_init=dense_init, bias_init=zeros, name=name,
                  dtype=dtype)


class Dropout(nn.Module):
  """Inverted dropout as nn.Dropout, drawing 16 random bits per element instead of 32.

  An element survives with probability k = round((1 - rate) * 2^16) / 2^16 (within 2^-17 of
  1 - rate) and survivors are scaled by exactly 1/k, so E[output] = input as with nn.Dropout.
  Half the random bits: the masks of the latent MLPs were ~10% of a CPU train step.
  """
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"dropout rate must lie in [0, 1), got {self.rate}")
    threshold = int(round((1.0 - self.rate) * 65536))
    n = x.size
    words = jax.random.bits(self.make_rng("dropout"), ((n + 1) // 2,), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
    keep = bits.astype(jnp.uint32) < threshold
    return jnp.where(keep, x * (65536.0 / threshold), 0.0).astype(x.dtype)


class MLP(nn.Module):
  """Dense(ratio*d) -> exact GELU -> dropout -> Dense(d)."""
  ratio: float
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    d = x.shape[-1]
    h = Dense(int(round(self.ratio * d)), dtype=self.dtype)(x)
    h = nn.gelu(h, approximate=False)
    h = Dropout(self.dropout)(h, deterministic=deterministic)
    return Dense(d, dtype=self.dtype)(h)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class _KernelBacked(nn.Module):
  """Mixin fields shared by every kernel-backed layer."""
  implementation: str | None = None
  interpret: bool = False
  block_sizes: Any = None


class LatentSelfAttention(_KernelBacked):
  """Z + MHA(LN(Z)) over the latents (the residual is added by the caller)."""
  num_heads: int = 16
  dtype: Any = None

  @nn.compact
  def __call__(self, z):
    b, m, d = z.shape
    if d % self.num_heads:
      raise ValueError(f"latent width {d} is not divisible by latent_heads={self.num_heads}")
    h = LayerNorm(name="ln", dtype=self.dtype)(z)
    split = lambda y: y.reshape(b, m, self.num_heads, d // self.num_heads)
    q = split(Dense(d, "q", self.dtype)(h))
    k = split(Dense(d, "k", self.dtype)(h))
    v = split(Dense(d, "v", self.dtype)(h))
    o = kernels.cross_attention(q, k, v, implementation=self.implementation,
                                interpret=self.interpret, block_sizes=self.block_sizes)
    return Dense(d, "out", self.dtype)(o.reshape(b, m, d))


def _attention_params(module: nn.Module, q_dim: int, kv_dim: int, width: int):
  p = module.param
  return dict(
      ln_scale=p("ln_scale", ones, (q_dim,)), ln_bias=p("ln_bias", zeros, (q_dim,)),
      wq=p("wq", dense_init, (q_dim, width)), bq=p("bq", zeros, (width,)),
      wk=p("wk", dense_init, (kv_dim, width)), bk=p("bk", zeros, (width,)),
      wv=p("wv", dense_init, (kv_dim, width)), bv=p("bv", zeros, (width,)),
      wo=p("wo", dense_init, (width, q_dim)), bo=p("bo", zeros, (q_dim,)))


class ReadBlock(_KernelBacked):
  """Fused read: Z <- Z + MHA(q=LN(Z), kv=X). X is not normalised (as the authors)."""
  num_heads: int = 8
  width: int | None = None    # attention width; default min(T, D)

  @nn.compact
  def __call__(self, z, x):
    d, t = z.shape[-1], x.shape[-1]
    width = self.width or min(d, t)
    params = ReadBlockParams(**_attention_params(self, d, t, width))
    return kernels.read_block(z, x.astype(z.dtype), params, num_heads=self.num_heads,
                              implementation=self.implementation,
                              interpret=self.interpret, block_sizes=self.block_sizes)


class WriteBlock(_KernelBacked):
  """Fused write: X <- X + MHA(q=LN(X), kv=Z); X <- X + MLP_T(LN(X)) if mlp_ratio > 0."""
  num_heads: int = 8
  width: int | None = None
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, z):
    t, d = x.shape[-1], z.shape[-1]
    width = self.width or min(d, t)
    kw = _attention_params(self, t, d, width)
    if self.mlp_ratio > 0:
      hidden = int(round(self.mlp_ratio * t))
      p = self.param
      kw.update(mlp_ln_scale=p("mlp_ln_scale", ones, (t,)),
                mlp_ln_bias=p("mlp_ln_bias", zeros, (t,)),
                w1=p("w1", dense_init, (t, hidden)), b1=p("b1", zeros, (hidden,)),
                w2=p("w2", dense_init, (hidden, t)), b2=p("b2", zeros, (t,)))
    return kernels.write_block(x, z.astype(x.dtype), WriteBlockParams(**kw),
                               num_heads=self.num_heads,
                               implementation=self.implementation,
                               interpret=self.interpret, block_sizes=self.block_sizes)


class RINBlock(_KernelBacked):
  """One RIN block: read, latent MLP, `latent_layers` x (self-attn, MLP), write."""
  latent_layers: int = 2
  latent_heads: int = 16
  latent_mlp_ratio: float = 4.0
  rw_heads: int = 8
  rw_width: int | None = None
  interface_mlp_ratio: float = 4.0
  dropout: float = 0.0      # latent tower only
  drop_path: float = 0.0    # latent tower only
  dtype: Any = None

  @nn.compact
  def __call__(self, z, x, *, deterministic: bool = True):
    kb = dict(implementation=self.implementation, interpret=self.interpret,
              block_sizes=self.block_sizes)
    z = ReadBlock(num_heads=self.rw_heads, width=self.rw_width, name="read", **kb)(z, x)
    z = z + MLP(self.latent_mlp_ratio, dtype=self.dtype, name="read_mlp")(
        LayerNorm(name="read_mlp_ln", dtype=self.dtype)(z))
    for i in range(self.latent_layers):
      y = LatentSelfAttention(num_heads=self.latent_heads, dtype=self.dtype,
                              name=f"latent_attn_{i}", **kb)(z)
      z = z + DropPath(self.drop_path)(y, deterministic=deterministic)
      y = MLP(self.latent_mlp_ratio, self.dropout, dtype=self.dtype,
              name=f"latent_mlp_{i}")(LayerNorm(name=f"latent_mlp_ln_{i}", dtype=self.dtype)(z),
                                       deterministic=deterministic)
      z = z + DropPath(self.drop_path)(y, deterministic=deterministic)
    x = WriteBlock(num_heads=self.rw_heads, width=self.rw_width,
                   mlp_ratio=self.interface_mlp_ratio, name="write", **kb)(x, z)
    return z, x
