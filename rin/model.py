"""The RIN image model (Jabri, Fleet & Chen, ICML 2023), as the authors' code computes it.

    x = PatchStem(image) ; x = LN(x) + pos_x
    z = [pos_z ; time token ; class token] ; z = z + LN0(z_prev + MLP(LN(z_prev)))
    for each block:  z = read(z, x) ; z = latent tower(z) ; x = write(x, z)
    out = Dense(p*p*C)(LN(x)) -> depth-to-space
    return out, z          # z is the next call's z_prev (self-conditioning / sampling)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rin.layers import Dense, LayerNorm, MLP, RINBlock, zeros

pos_init = nn.initializers.truncated_normal(stddev=0.02)


def timestep_embedding(gamma, dim: int, max_period: float = 10000.0):
  """Sinusoid of gamma * 1000 with `dim` features, standardised over features.

  As the authors' transformers.positional_encoding: feature i has frequency
  max_period^(-2 floor(i/2) / dim); sin of the even features, then cos of the odd ones
  (concatenated). For even dim that is sin-then-cos halves with frequencies
  max_period^(-j / (dim/2)); for odd dim there is one more sin than cos.
  """
  if dim < 1:
    raise ValueError(f"time embedding width (latent_dim // 4) must be >= 1, got {dim}")
  n_sin, n_cos = (dim + 1) // 2, dim // 2
  # Exponent 2 floor(i/2) / dim, as (2j) / dim; for even dim as j / (dim/2), the form this
  # function always had, so even widths keep their exact float32 values.
  idx, denom = (jnp.arange(n_sin, dtype=jnp.float32), n_sin) if dim % 2 == 0 else (
      2.0 * jnp.arange(n_sin, dtype=jnp.float32), dim)
  freqs = jnp.exp(-math.log(max_period) * idx / denom)
  args = (gamma.astype(jnp.float32) * 1000.0)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args[:, :n_cos])], axis=-1)
  mean = emb.mean(-1, keepdims=True)
  std = emb.std(-1, keepdims=True)
  return (emb - mean) / jnp.where(std > 0, std, 1.0)   # as the authors: no epsilon


class PatchStem(nn.Module):
  """``nn.Conv(features, (p, p), strides=(p, p), padding="VALID")`` as space-to-depth and
  one matmul, with the same parameters ("kernel" [p, p, C, F], "bias" [F]) and init.

  Why not nn.Conv: with oneDNN dots on CPU (rin/xla_cpu.py) XLA turns the strided conv into
  a ``__onednn$convolution`` custom call that jax 0.12 cannot serialise, so no train step
  would enter the persistent compilation cache. A matmul is what this conv is anyway.
  """
  features: int
  patch_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (p, p, c, self.features))
    bias = self.param("bias", zeros, (self.features,))
    dt = self.dtype or x.dtype
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    y = jnp.einsum("bijpqc,pqcf->bijf", patches.astype(dt), kernel.astype(dt))
    return y + bias.astype(dt)


class RIN(nn.Module):
  """Recurrent Interface Network for images [B, H, W, C] -> (prediction, latents)."""
  image_size: int = 32
  channels: int = 3
  patch_size: int = 2
  num_latents: int = 128               # M, including the time and class tokens
  latent_dim: int = 512                # D
  latent_heads: int = 16
  latent_mlp_ratio: float = 4.0
  num_blocks: int = 3
  latent_layers_per_block: int | Sequence[int] = 2
  interface_dim: int = 256             # T
  interface_mlp_ratio: float = 2.0     # 0 skips the interface MLP
  rw_heads: int = 8
  rw_width: int | None = None          # read/write attention width, default min(T, D)
  num_classes: int = 10                # 0: unconditional (no class token)
  self_cond_mlp_ratio: float = 4.0
  dropout: float = 0.0
  drop_path: float = 0.0
  attention_init: str = "keras_mha"    # "xavier": 2-D xavier (rin.layers.attention_kernel_init)
  implementation: str | None = None
  interpret: bool = False
  block_sizes: Any = None
  dtype: Any = None                    # compute dtype (None: float32); params stay float32

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def _layers_per_block(self) -> tuple[int, ...]:
    k = self.latent_layers_per_block
    layers = (k,) * self.num_blocks if isinstance(k, int) else tuple(k)
    if len(layers) != self.num_blocks:
      raise ValueError(f"latent_layers_per_block={k} must be an int or have "
                       f"num_blocks={self.num_blocks} entries")
    return layers

  def _check_inputs(self, x_t, gamma, labels):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if x_t.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels], got {x_t.shape}")
    _, h, w, c = x_t.shape
    if (h, w, c) != (self.image_size, self.image_size, self.channels):
      raise ValueError(
          f"images of shape {x_t.shape[1:]} do not fit this model, which expects "
          f"({self.image_size}, {self.image_size}, {self.channels}) "
          f"(image_size={self.image_size}, channels={self.channels}, "
          f"patch_size={self.patch_size})")
    if gamma.shape != x_t.shape[:1]:
      raise ValueError(f"gamma must have shape [batch]={x_t.shape[:1]}, got {gamma.shape}")
    if self.num_classes > 0 and (labels is None or labels.shape != x_t.shape[:1]):
      raise ValueError(f"labels must be given with shape [batch]={x_t.shape[:1]} when "
                       f"num_classes={self.num_classes} > 0, got "
                       f"{None if labels is None else labels.shape}")
    num_tokens = 1 + (self.num_classes > 0)
    if self.num_latents <= num_tokens:
      raise ValueError(f"num_latents={self.num_latents} must exceed the {num_tokens} "
                       f"time/class tokens")

  @nn.compact
  def __call__(self, x_t, gamma, labels=None, prev_latents=None, *, train: bool = False):
    """x_t: noisy images [B, H, W, C]; gamma: signal variance [B]; labels: int [B];
    prev_latents: [B, M, D] or None (zeros). Returns (prediction [B,H,W,C], latents)."""
    self._check_inputs(x_t, gamma, labels)
    b = x_t.shape[0]
    p, t_dim, d, m = self.patch_size, self.interface_dim, self.latent_dim, self.num_latents
    dt = self.dtype or jnp.float32
    g = self.image_size // p

    # Interface: patch stem, LN, learned positions.
    x = PatchStem(t_dim, p, dtype=self.dtype, name="stem")(x_t.astype(dt))
    x = x.reshape(b, g * g, t_dim)
    x = LayerNorm(name="stem_ln", dtype=self.dtype)(x)
    x = x + self.param("pos_interface", pos_init, (g * g, t_dim)).astype(x.dtype)

    # Latents: learned positions, time token, class token.
    num_pos = m - 1 - (self.num_classes > 0)
    tokens = [jnp.broadcast_to(self.param("pos_latents", pos_init, (num_pos, d)), (b, num_pos, d))]
    temb = timestep_embedding(gamma, d // 4)
    temb = Dense(d, "time_dense_0", self.dtype)(temb)
    temb = Dense(d, "time_dense_1", self.dtype)(nn.silu(temb))
    tokens.append(temb[:, None, :])
    if self.num_classes > 0:
      onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
      tokens.append(Dense(d, "class_dense", self.dtype)(onehot)[:, None, :])
    z = jnp.concatenate(tokens, axis=1).astype(dt)

    # Latent self-conditioning. LN0 starts at scale 0 and bias 0, i.e. no effect.
    if prev_latents is None:
      prev_latents = jnp.zeros((b, m, d), dt)
    if prev_latents.shape != (b, m, d):
      raise ValueError(f"prev_latents must have shape {(b, m, d)}, got {prev_latents.shape}")
    prev = prev_latents.astype(dt)
    prev = prev + MLP(self.self_cond_mlp_ratio, dtype=self.dtype, name="self_cond_mlp")(
        LayerNorm(name="self_cond_ln", dtype=self.dtype)(prev))
    z = z + LayerNorm(name="self_cond_ln0", scale_init=zeros, bias_init=zeros,
                      dtype=self.dtype)(prev)

    for i, layers in enumerate(self._layers_per_block()):
      z, x = RINBlock(latent_layers=layers, latent_heads=self.latent_heads,
                      latent_mlp_ratio=self.latent_mlp_ratio, rw_heads=self.rw_heads,
                      rw_width=self.rw_width, interface_mlp_ratio=self.interface_mlp_ratio,
                      dropout=self.dropout, drop_path=self.drop_path, dtype=self.dtype,
                      implementation=self.implementation, interpret=self.interpret,
                      block_sizes=self.block_sizes, attention_init=self.attention_init,
                      name=f"block_{i}")(
                          z, x, deterministic=not train)

    # Readout: LN, Dense to p*p*C, depth-to-space.
    c = self.channels
    out = Dense(p * p * c, "readout", self.dtype)(LayerNorm(name="readout_ln", dtype=self.dtype)(x))
    out = out.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, g * p, g * p, c)
    # float32 outputs whatever the compute dtype, so carried latents keep one type.
    return out.astype(jnp.float32), z.astype(jnp.float32)
