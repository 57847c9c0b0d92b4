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
import numpy as np

from rin.layers import Dense, LayerNorm, MLP, RINBlock, check_conv_args, zeros

pos_init = nn.initializers.truncated_normal(stddev=0.02)


def previous_latents(prev_latents, b: int, m: int, d: int, dt):
  """The self-conditioning input: the previous step's latents [b, m, d] (zeros when None)."""
  if prev_latents is None:
    return jnp.zeros((b, m, d), dt)
  if prev_latents.shape != (b, m, d):
    raise ValueError(f"prev_latents must have shape {(b, m, d)}, got {prev_latents.shape}")
  return prev_latents.astype(dt)


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
  # The authors' TapeDenoiser(conv_kernel_size, conv_drop_units): after each block's write a
  # depthwise conv block over the interface grid (rin.layers.InterfaceConv); 0: none.
  conv_kernel_size: int = 0
  conv_dropout: float = 0.0
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
    check_conv_args(self.conv_kernel_size, self.conv_dropout, self.interface_dim)
    num_tokens = 1 + (self.num_classes > 0)
    if self.num_latents <= num_tokens:
      raise ValueError(f"num_latents={self.num_latents} must exceed the {num_tokens} "
                       f"time/class tokens")

  # The model in four steps; a subclass (VideoRIN) replaces the input checks, the stem and
  # the readout and shares everything else (latents, self-conditioning, blocks).
  def _interface(self, x_t):
    """Noisy images -> interface tokens [B, N, T]: patch stem, LN, learned positions."""
    b, g = x_t.shape[0], self.image_size // self.patch_size
    x = PatchStem(self.interface_dim, self.patch_size, dtype=self.dtype, name="stem")(x_t)
    x = x.reshape(b, g * g, self.interface_dim)
    x = LayerNorm(name="stem_ln", dtype=self.dtype)(x)
    return x + self.param("pos_interface", pos_init, (g * g, self.interface_dim)).astype(x.dtype)

  def _latents(self, b, gamma, labels, prev_latents):
    """[pos_z ; time token ; class token] plus latent self-conditioning -> z [B, M, D]."""
    d, m = self.latent_dim, self.num_latents
    dt = self.dtype or jnp.float32
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
    prev = previous_latents(prev_latents, b, m, d, dt)
    prev = prev + MLP(self.self_cond_mlp_ratio, dtype=self.dtype, name="self_cond_mlp")(
        LayerNorm(name="self_cond_ln", dtype=self.dtype)(prev))
    return z + LayerNorm(name="self_cond_ln0", scale_init=zeros, bias_init=zeros,
                         dtype=self.dtype)(prev)

  def _conv_layout(self) -> tuple:
    """Where the interface conv sees each token: the patch grid (the authors')."""
    g = self.image_size // self.patch_size
    return (g, g, ())

  def _blocks(self, z, x, train: bool):
    conv = dict(conv_kernel_size=self.conv_kernel_size, conv_dropout=self.conv_dropout,
                conv_layout=self._conv_layout() if self.conv_kernel_size else None)
    for i, layers in enumerate(self._layers_per_block()):
      z, x = RINBlock(latent_layers=layers, latent_heads=self.latent_heads,
                      latent_mlp_ratio=self.latent_mlp_ratio, rw_heads=self.rw_heads,
                      rw_width=self.rw_width, interface_mlp_ratio=self.interface_mlp_ratio,
                      dropout=self.dropout, drop_path=self.drop_path, dtype=self.dtype,
                      implementation=self.implementation, interpret=self.interpret,
                      block_sizes=self.block_sizes, attention_init=self.attention_init,
                      **conv, name=f"block_{i}")(
                          z, x, deterministic=not train)
    return z, x

  def _readout(self, x):
    """LN, Dense to p*p*C, depth-to-space -> [B, H, W, C]."""
    b, p, c, g = x.shape[0], self.patch_size, self.channels, self.image_size // self.patch_size
    out = Dense(p * p * c, "readout", self.dtype)(LayerNorm(name="readout_ln", dtype=self.dtype)(x))
    out = out.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, g * p, g * p, c)

  @nn.compact
  def __call__(self, x_t, gamma, labels=None, prev_latents=None, *, train: bool = False):
    """x_t: noisy images [B, H, W, C]; gamma: signal variance [B]; labels: int [B];
    prev_latents: [B, M, D] or None (zeros). Returns (prediction [B,H,W,C], latents)."""
    self._check_inputs(x_t, gamma, labels)
    x = self._interface(x_t.astype(self.dtype or jnp.float32))
    z = self._latents(x_t.shape[0], gamma, labels, prev_latents)
    z, x = self._blocks(z, x, train)
    # float32 outputs whatever the compute dtype, so carried latents keep one type.
    return self._readout(x).astype(jnp.float32), z.astype(jnp.float32)


def _same_padding(frames: int, tubelet_frames: int) -> tuple[int, int]:
  """Frames TF's "SAME" adds before/after for a stride = kernel = pt conv over `frames`."""
  pad = -frames % tubelet_frames
  return pad // 2, pad - pad // 2


def video_to_tubelets(x, tubelet_frames: int, patch_size: int):
  """[B, F, H, W, C] -> [B, ceil(F/pt), H/p, W/p, pt*p*p*C], zero-padding the time axis as
  "SAME" does; features ordered (frame, row, col, channel) within each tubelet."""
  b, f, h, w, c = x.shape
  pt, p = tubelet_frames, patch_size
  before, after = _same_padding(f, pt)
  if before or after:
    x = jnp.pad(x, ((0, 0), (before, after), (0, 0), (0, 0), (0, 0)))
  n = (f + before + after) // pt
  x = x.reshape(b, n, pt, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, n, h // p, w // p, pt * p * p * c)


def tubelets_to_video(t, tubelet_frames: int, patch_size: int, channels: int, frames: int):
  """Inverse of video_to_tubelets: [B, n, gh, gw, pt*p*p*C] -> [B, frames, H, W, C], dropping
  the "SAME" padding frames."""
  b, n, gh, gw, _ = t.shape
  pt, p, c = tubelet_frames, patch_size, channels
  x = t.reshape(b, n, gh, gw, pt, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  x = x.reshape(b, n * pt, gh * p, gw * p, c)
  before, _ = _same_padding(frames, pt)
  return x[:, before:before + frames]


TAPE_POS_ENCODINGS = ("learned", "sin_cos_plus_learned")
TAPE_POS_NORMALIZATION_MAX = 1e4    # the authors' time_scaling default, which their video
                                    # tape passes as the sin-cos coordinates' range


def sin_cos_2d(rows: int, cols: int, dim: int, normalization_max: float = 6.2831852):
  """The authors' ``get_2d_position_codes``: [rows, cols, dim] float32, the first dim/2
  features a 1-D sin-cos code of the row, the last dim/2 of the column (each code: sines of
  the even, then cosines of the odd frequency indices); coordinates scaled to
  [0, normalization_max]. A side of 1 gets coordinate 0 (theirs divides 0 by 0)."""
  if dim % 2:
    raise ValueError(f"sin-cos positions need an even width, got interface_dim={dim}")

  def codes(n, d):
    coords = np.arange(n, dtype=np.float64)
    if n > 1:
      coords = coords / (n - 1) * normalization_max
    i = np.arange(d)
    angles = coords[:, None] / np.power(10000.0, 2 * (i // 2) / d)[None, :]
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], -1)

  y, x = codes(rows, dim // 2), codes(cols, dim // 2)
  out = np.concatenate([np.broadcast_to(y[:, None], (rows, cols, dim // 2)),
                        np.broadcast_to(x[None, :], (rows, cols, dim // 2))], -1)
  return out.astype(np.float32)


def video_tape_positions(encoding: str, time_steps: int, rows: int, dim: int):
  """The fixed part of a video tape's positions, [time_steps * rows * rows, dim], or None.

  "learned" (the authors' default): none, the table is a parameter (truncated normal 0.02).
  "sin_cos_plus_learned" (their option of that name): the 2-D sin-cos code of each token's
  (row, col), tiled over time steps (their einops.repeat 'hw d -> (t hw) d'), plus a learned
  residual table initialised to zeros. The time step is then only in the residual: tokens at
  one place in different frames start with one code, which lets reads and writes match a
  place across frames from the first step.
  """
  if encoding not in TAPE_POS_ENCODINGS:
    raise ValueError(f"tape_pos_encoding={encoding!r} must be one of {TAPE_POS_ENCODINGS}")
  if encoding == "learned":
    return None
  hw = sin_cos_2d(rows, rows, dim, TAPE_POS_NORMALIZATION_MAX).reshape(rows * rows, dim)
  return np.tile(hw, (time_steps, 1))


class TubeletStem(nn.Module):
  """The authors' video stem ``Conv3D(features, (pt, p, p), strides=(pt, p, p),
  padding="SAME")`` as space-time-to-depth and one matmul (see PatchStem for why no conv).

  Parameters "kernel" [pt, p, p, C, F] and "bias" [F]. Frame counts that are not a multiple
  of pt are zero-padded as TF's "SAME" pads a stride-equals-kernel conv: the pt - n % pt
  missing frames split floor/ceil before/after (all after for pt = 2).
  """
  features: int
  tubelet_frames: int
  patch_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    pt, p = self.tubelet_frames, self.patch_size
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (pt, p, p, c, self.features))
    bias = self.param("bias", zeros, (self.features,))
    dt = self.dtype or x.dtype
    tubes = video_to_tubelets(x, pt, p).astype(dt)
    y = jnp.einsum("btijk,kf->btijf", tubes, kernel.reshape(-1, self.features).astype(dt))
    return y + bias.astype(dt)


class VideoRIN(RIN):
  """RIN for video prediction, as the authors' ``VideoTapeDenoiser`` computes it.

      x = LN(TubeletStem(noisy frames)) + pos[:Nx]          # the frames to predict
      c = LN(TubeletStem(conditioning frames)) + pos[Nx:]   # same stem, LN and position table
      interface = concat(x, c)        # one tape: every block reads and writes both parts
      z = latents as in RIN (time token; no class token) ; blocks as in RIN
      out = readout(LN(interface[:, :Nx])) -> frames        # the noisy part only

  Called as ``model(x_t [B, F - Fc, H, W, C], gamma [B], cond [B, Fc, H, W, C],
  prev_latents)``: the third argument (the class labels' slot in RIN, the authors' ``cond``)
  holds the clean conditioning frames. Fields beyond RIN's: ``num_frames`` F (the whole
  clip), ``cond_frames`` Fc, ``tubelet_frames`` pt (the stem's temporal stride; the paper's
  2x4x4 tubelets are pt=2, patch_size=4).

  Departure from the authors' code, explicit: they size the position table from
  ``(F - Fc) % pt + Fc % pt`` padding frames, which equals the "SAME" padding only for
  pt <= 2; here it is sized ceil((F - Fc) / pt) + ceil(Fc / pt) time steps, what the stem
  emits, so pt > 2 also works (identical tables for pt <= 2). The readout applies LN+Dense to
  the noisy tokens only; the authors apply it to the whole tape and then drop the
  conditioning frames, the same numbers (both are token-wise).

  Extension, explicit (the authors' conv block reshapes the tape into a square, undefined
  for video, and their video model never passes it): with ``conv_kernel_size=k`` the block
  after each write is a k x k x k depthwise conv over (time, rows, cols) on ONE time axis
  that holds the conditioning frames' steps first and the noisy frames' steps after them,
  so the last conditioning step neighbours the first predicted one and each predicted place
  sees the same and nearby places of the frames before it. (A conv over the noisy steps
  alone, or over the two parts each on its own, did not help: issue 25's probe.) Init,
  GroupNorm, SiLU, dropout, 1x1 conv and residual as the authors' block.
  """
  num_frames: int = 16
  cond_frames: int = 5
  tubelet_frames: int = 2
  tubelet_padding: str = "same"        # "same": the authors' zero frames; "none": F - Fc and
                                       # Fc must be multiples of tubelet_frames
  tape_pos_encoding: str = "learned"   # or "sin_cos_plus_learned" (video_tape_positions)
  num_classes: int = 0

  @property
  def pred_frames(self) -> int:
    return self.num_frames - self.cond_frames

  def _time_steps(self, frames: int) -> int:
    return -(-frames // self.tubelet_frames)

  @property
  def num_patches(self) -> int:
    g = self.image_size // self.patch_size
    return (self._time_steps(self.pred_frames) + self._time_steps(self.cond_frames)) * g * g

  def _check_inputs(self, x_t, gamma, cond):
    for name in ("num_frames", "tubelet_frames"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(self.cond_frames, bool) or not isinstance(self.cond_frames, int) \
        or self.cond_frames < 0:
      raise ValueError(f"cond_frames must be an integer >= 0, got {self.cond_frames!r}")
    if self.cond_frames >= self.num_frames:
      raise ValueError(f"cond_frames={self.cond_frames} must be fewer than "
                       f"num_frames={self.num_frames} (at least one frame to predict)")
    if self.tubelet_padding not in ("same", "none"):
      raise ValueError(f"tubelet_padding must be 'same' or 'none', got {self.tubelet_padding!r}")
    if self.tape_pos_encoding not in TAPE_POS_ENCODINGS:
      raise ValueError(f"tape_pos_encoding={self.tape_pos_encoding!r} must be one of "
                       f"{TAPE_POS_ENCODINGS}")
    if self.tubelet_padding == "none":
      for name, n in (("num_frames - cond_frames", self.pred_frames),
                      ("cond_frames", self.cond_frames)):
        if n % self.tubelet_frames:
          raise ValueError(f"{name}={n} is not a multiple of tubelet_frames="
                           f"{self.tubelet_frames} (tubelet_padding='none'; 'same' pads)")
    if self.num_classes:
      raise ValueError(f"VideoRIN conditions on frames, not classes: num_classes must be 0, "
                       f"got {self.num_classes}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    frame = (self.image_size, self.image_size, self.channels)
    if x_t.ndim != 5 or tuple(x_t.shape[1:]) != (self.pred_frames,) + frame:
      raise ValueError(
          f"noisy frames must be [batch, num_frames - cond_frames, H, W, C] = "
          f"[B, {self.pred_frames}, {', '.join(map(str, frame))}] (num_frames={self.num_frames}, "
          f"cond_frames={self.cond_frames}, image_size={self.image_size}, "
          f"channels={self.channels}), got {x_t.shape}")
    b = x_t.shape[0]
    if gamma.shape != (b,):
      raise ValueError(f"gamma must have shape [batch]={(b,)}, got {gamma.shape}")
    if self.cond_frames:
      want = (b, self.cond_frames) + frame
      if cond is None or tuple(cond.shape) != want:
        raise ValueError(f"cond (the conditioning frames) must have shape {list(want)} "
                         f"(cond_frames={self.cond_frames}), got "
                         f"{None if cond is None else cond.shape}")
    elif cond is not None and cond.shape[1] != 0:
      raise ValueError(f"cond_frames=0 but cond of shape {cond.shape} was given")
    if self.num_latents <= 1:
      raise ValueError(f"num_latents={self.num_latents} must exceed the 1 time token")
    check_conv_args(self.conv_kernel_size, self.conv_dropout, self.interface_dim)

  def _conv_layout(self) -> tuple:
    g = self.image_size // self.patch_size
    n_x, n_c = self._time_steps(self.pred_frames), self._time_steps(self.cond_frames)
    noisy = (0, n_x)                       # the tape: noisy steps, then conditioning steps
    return (g, g, ((n_x * g * g, n_c), noisy) if self.cond_frames else (noisy,))

  def _fixed_tape_positions(self):
    g = self.image_size // self.patch_size
    steps = self._time_steps(self.pred_frames) + self._time_steps(self.cond_frames)
    return video_tape_positions(self.tape_pos_encoding, steps, g, self.interface_dim)

  def _interface(self, x_t, cond=None):
    b, g, t_dim = x_t.shape[0], self.image_size // self.patch_size, self.interface_dim
    stem = TubeletStem(t_dim, self.tubelet_frames, self.patch_size, dtype=self.dtype, name="stem")
    ln = LayerNorm(name="stem_ln", dtype=self.dtype)
    fixed = self._fixed_tape_positions()
    pos = self.param("pos_interface", pos_init if fixed is None else zeros,
                     (self.num_patches, t_dim))
    if fixed is not None:
      pos = pos + jnp.asarray(fixed)
    parts = [x_t] + ([cond] if self.cond_frames else [])
    tokens, offset = [], 0
    for frames in parts:
      y = stem(frames)
      y = y.reshape(b, -1, t_dim)
      n = y.shape[1]
      tokens.append(ln(y) + pos[offset:offset + n].astype(y.dtype))
      offset += n
    return jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0]

  def _readout(self, x):
    b, p, c, pt = x.shape[0], self.patch_size, self.channels, self.tubelet_frames
    g, n_t = self.image_size // p, self._time_steps(self.pred_frames)
    x = x[:, :n_t * g * g]
    out = Dense(pt * p * p * c, "readout", self.dtype)(
        LayerNorm(name="readout_ln", dtype=self.dtype)(x))
    return tubelets_to_video(out.reshape(b, n_t, g, g, -1), pt, p, c, self.pred_frames)

  @nn.compact
  def __call__(self, x_t, gamma, cond=None, prev_latents=None, *, train: bool = False):
    """x_t: noisy frames [B, F-Fc, H, W, C]; gamma [B]; cond: clean conditioning frames
    [B, Fc, H, W, C]; prev_latents [B, M, D] or None. Returns (prediction, latents)."""
    self._check_inputs(x_t, gamma, cond)
    dt = self.dtype or jnp.float32
    x = self._interface(x_t.astype(dt), None if cond is None else cond.astype(dt))
    z = self._latents(x_t.shape[0], gamma, None, prev_latents)
    z, x = self._blocks(z, x, train)
    return self._readout(x).astype(jnp.float32), z.astype(jnp.float32)
