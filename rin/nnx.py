"""`flax.nnx` versions of RIN's public layers and models, thin by design.

    ReadBlock  WriteBlock  LatentSelfAttention  InterfaceConv  RINBlock  RIN  VideoRIN
    linen_params(module) -> dict            the parameters as a linen tree
    load_linen_params(module, params)       a linen tree into an nnx module, checked
    to_linen(module) -> (linen module, params)
    from_linen(linen module, params) -> nnx module

Why thin: the linen modules (`rin.layers`, `rin.model`) are the reference; their parameter
tree is what checkpoints hold and what the golden tests pin. These classes are a second
front door to the same computation, not a second implementation of it:
- every nnx class keeps the linen module it mirrors as `self.config` (built from the same
  keyword arguments, so defaults and field names exist once) and reuses its input checks;
- the kernel-backed layers call the same ops with the same arguments
  (`kernels.read_block` / `kernels.write_block` / `kernels.cross_attention`,
  `implementation=`, `interpret=`, `block_sizes=`); the MLP uses the same GELU;
- parameter-free linen leaves whose math lives in their `__call__` (Dropout, DropPath, the
  patch/tubelet stems) are applied as linen modules to the arrays this module holds, so
  their math is never written twice;
- attribute names are the linen parameter names ("block_0/read/wq", "Dense_0/kernel"), so
  `nnx.to_pure_dict(nnx.state(module, nnx.Param))` is the linen tree and conversion is a
  checked copy.

What differs, by nnx's nature: layers take their input widths at construction (linen infers
them at init); randomness for train mode comes from a call argument `rngs=` (an
`nnx.Rngs` with a "dropout" stream, or a PRNG key) rather than `apply(rngs=...)`, so the
module's state is its parameters only. Dropout masks come from the same code but not the
same keys as linen's, so train-mode outputs agree in distribution, not bitwise.
The read-attention capture (linen's `mutable=["attention"]`, used by rin.visualize) is
linen-only.

Length: one file mirrors both rin/layers.py and rin/model.py (their structure, not their
math) plus the converters, so that a layer and the code that maps its tree sit together.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import kernels
from kernels.params import ReadBlockParams, WriteBlockParams
from rin import layers
from rin import model as linen_model

_ones, _zeros = layers.ones, layers.zeros


# ---------------------------------------------------------------------------------------
# Small pieces: nnx counterparts of rin.layers' Dense / LayerNorm / MLP.
# ---------------------------------------------------------------------------------------

def _dense(d_in: int, d_out: int, rngs: nnx.Rngs, dtype=None, kernel_init=layers.dense_init):
  """rin.layers.Dense: kernel [in, out] and zero bias, compute dtype `dtype`."""
  return nnx.Linear(d_in, d_out, kernel_init=kernel_init, bias_init=_zeros, dtype=dtype,
                    rngs=rngs)


def _as_given(arrays, *, dtype=None, **_):
  return arrays


def _layer_norm(d: int, rngs: nnx.Rngs, dtype=None, **kw):
  """rin.layers.LayerNorm: eps 1e-6, two-pass variance.

  No promotion (`_as_given`): linen's LayerNorm normalises with float32 statistics and its
  float32 scale/bias and casts only the result to `dtype`; nnx's default first rounds input,
  scale and bias to `dtype`, which changes bf16 outputs by ~1%."""
  return nnx.LayerNorm(d, epsilon=layers.LN_EPS, use_fast_variance=False, dtype=dtype,
                       promote_dtype=_as_given, rngs=rngs, **kw)


def _as_rngs(rngs):
  """None, an nnx.Rngs, or a PRNG key (made the "dropout" stream)."""
  if rngs is None or isinstance(rngs, nnx.Rngs):
    return rngs
  if isinstance(rngs, jax.Array):
    return nnx.Rngs(dropout=rngs)
  raise TypeError(f"rngs must be None, an nnx.Rngs or a PRNG key, got {type(rngs).__name__}")


def _random_leaf(leaf, x, deterministic: bool, rngs):
  """Applies a parameter-free linen leaf (layers.Dropout / layers.DropPath) in train mode."""
  if deterministic or leaf.rate == 0.0:
    return x
  if rngs is None:
    raise ValueError(f"{type(leaf).__name__}(rate={leaf.rate}) in train mode needs random "
                     "numbers: pass rngs= (an nnx.Rngs with a 'dropout' stream, or a key)")
  return leaf.apply({}, x, deterministic=False, rngs={"dropout": rngs.dropout()})


class MLP(nnx.Module):
  """rin.layers.MLP: Dense(ratio*d) -> exact GELU -> dropout -> Dense(d)."""

  def __init__(self, dim: int, ratio: float, dropout: float = 0.0, dtype=None, *,
               rngs: nnx.Rngs):
    self.config = layers.MLP(ratio, dropout, dtype)
    hidden = int(round(ratio * dim))
    self.Dense_0 = _dense(dim, hidden, rngs, dtype)
    self.Dense_1 = _dense(hidden, dim, rngs, dtype)

  def __call__(self, x, *, deterministic: bool = True, rngs=None):
    h = kernels.reference.gelu(self.Dense_0(x))
    h = _random_leaf(layers.Dropout(self.config.dropout), h, deterministic, rngs)
    return self.Dense_1(h)


# ---------------------------------------------------------------------------------------
# The public layers.
# ---------------------------------------------------------------------------------------

def _check_heads(width: int, num_heads: int, what: str):
  if width % num_heads:
    raise ValueError(f"{what} width {width} is not divisible by {num_heads} heads")


class LatentSelfAttention(nnx.Module):
  """rin.layers.LatentSelfAttention over latents of width `dim`: MHA(LN(z)) (the caller adds
  the residual). Keyword arguments: those of the linen layer (num_heads, dtype,
  implementation, interpret, block_sizes, attention_init)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, **fields):
    self.config = c = layers.LatentSelfAttention(**fields)
    _check_heads(dim, c.num_heads, "latent")
    qkv = layers.attention_kernel_init(c.attention_init, c.num_heads, "qkv")
    out = layers.attention_kernel_init(c.attention_init, c.num_heads, "out")
    self.ln = _layer_norm(dim, rngs, c.dtype)
    self.q = _dense(dim, dim, rngs, c.dtype, qkv)
    self.k = _dense(dim, dim, rngs, c.dtype, qkv)
    self.v = _dense(dim, dim, rngs, c.dtype, qkv)
    self.out = _dense(dim, dim, rngs, c.dtype, out)

  def __call__(self, z):
    c = self.config
    params = kernels.LatentAttentionParams(
        self.ln.scale.value, self.ln.bias.value, self.q.kernel.value, self.q.bias.value,
        self.k.kernel.value, self.k.bias.value, self.v.kernel.value, self.v.bias.value,
        self.out.kernel.value, self.out.bias.value)
    if c.dtype is not None:
      z = z.astype(c.dtype)
    return kernels.latent_attention_block(z, params, num_heads=c.num_heads,
                                          implementation=c.implementation,
                                          interpret=c.interpret, block_sizes=c.block_sizes)

  @staticmethod
  def _dims(params):
    return (params["q"]["kernel"].shape[0],)


def _attention_params(module: nnx.Module, q_dim: int, kv_dim: int, width: int, rngs):
  """The fused blocks' attention weights as flat nnx.Params (names of kernels.params)."""
  c = module.config
  _check_heads(width, c.num_heads, "read/write attention")
  qkv = layers.attention_kernel_init(c.attention_init, c.num_heads, "qkv")
  out = layers.attention_kernel_init(c.attention_init, c.num_heads, "out")
  shapes = dict(ln_scale=(_ones, (q_dim,)), ln_bias=(_zeros, (q_dim,)),
                wq=(qkv, (q_dim, width)), bq=(_zeros, (width,)),
                wk=(qkv, (kv_dim, width)), bk=(_zeros, (width,)),
                wv=(qkv, (kv_dim, width)), bv=(_zeros, (width,)),
                wo=(out, (width, q_dim)), bo=(_zeros, (q_dim,)))
  for name, (init, shape) in shapes.items():
    setattr(module, name, nnx.Param(init(rngs.params(), shape, jnp.float32)))


def _gather(module: nnx.Module, cls):
  """The module's flat params as a kernels.params NamedTuple (absent fields stay None)."""
  return cls(**{f: getattr(module, f)[...] for f in cls._fields if hasattr(module, f)})


class _FusedBlock(nnx.Module):
  """What the fused read and write blocks share: the kernel call and the widths a linen
  tree implies (query and key input widths)."""

  def _fused(self, op, a, b, params_cls):
    c = self.config
    return op(a, b.astype(a.dtype), _gather(self, params_cls), num_heads=c.num_heads,
              implementation=c.implementation, interpret=c.interpret,
              block_sizes=c.block_sizes)

  @staticmethod
  def _dims(params):
    return params["wq"].shape[0], params["wk"].shape[0]


class ReadBlock(_FusedBlock):
  """rin.layers.ReadBlock: z + MHA(q=LN(z), kv=x), fused (kernels.read_block).

  ReadBlock(latent_dim, interface_dim, *, rngs, num_heads=8, width=None, implementation=None,
  interpret=False, block_sizes=None, attention_init="keras_mha")."""

  def __init__(self, latent_dim: int, interface_dim: int, *, rngs: nnx.Rngs, **fields):
    self.config = c = layers.ReadBlock(**fields)
    _attention_params(self, latent_dim, interface_dim, c.width or min(latent_dim, interface_dim),
                      rngs)

  def __call__(self, z, x):
    return self._fused(kernels.read_block, z, x, ReadBlockParams)


class WriteBlock(_FusedBlock):
  """rin.layers.WriteBlock: x + MHA(q=LN(x), kv=z), then x + MLP(LN(x)) if mlp_ratio > 0,
  fused (kernels.write_block).

  WriteBlock(interface_dim, latent_dim, *, rngs, num_heads=8, width=None, mlp_ratio=4.0,
  implementation=None, interpret=False, block_sizes=None, attention_init="keras_mha")."""

  def __init__(self, interface_dim: int, latent_dim: int, *, rngs: nnx.Rngs, **fields):
    self.config = c = layers.WriteBlock(**fields)
    t, d = interface_dim, latent_dim
    _attention_params(self, t, d, c.width or min(d, t), rngs)
    if c.mlp_ratio > 0:
      hidden = int(round(c.mlp_ratio * t))
      self.mlp_ln_scale = nnx.Param(_ones(rngs.params(), (t,)))
      self.mlp_ln_bias = nnx.Param(_zeros(rngs.params(), (t,)))
      self.w1 = nnx.Param(layers.dense_init(rngs.params(), (t, hidden)))
      self.b1 = nnx.Param(_zeros(rngs.params(), (hidden,)))
      self.w2 = nnx.Param(layers.dense_init(rngs.params(), (hidden, t)))
      self.b2 = nnx.Param(_zeros(rngs.params(), (t,)))

  def __call__(self, x, z):
    return self._fused(kernels.write_block, x, z, WriteBlockParams)


class InterfaceConv(nnx.Module):
  """rin.layers.InterfaceConv (the authors' DepthwiseConvBlock on the interface grid):
  InterfaceConv(interface_dim, *, rngs, kernel_size, layout, dropout=0.0, dtype=None).
  The math is rin.layers.interface_conv, called with this module's parameters."""

  def __init__(self, interface_dim: int, *, rngs: nnx.Rngs, **fields):
    self.config = c = layers.InterfaceConv(**fields)
    layers.check_conv_args(c.kernel_size, c.dropout, interface_dim)
    shapes = layers.conv_param_shapes(interface_dim, c.kernel_size, 3 if c.layout[2] else 2)
    for name, (init, shape) in shapes.items():
      setattr(self, name, nnx.Param(init(rngs.params(), shape, jnp.float32)))

  def __call__(self, x, *, deterministic: bool = True, rngs=None):
    c = self.config
    params = {name: getattr(self, name)[...] for name in layers.CONV_PARAMS}
    drop = lambda h: _random_leaf(layers.Dropout(c.dropout), h, deterministic, _as_rngs(rngs))
    return layers.interface_conv(x, params, c.layout, dropout=drop, dtype=c.dtype)

  @staticmethod
  def _dims(params):
    return (params["pointwise_kernel"].shape[0],)


class RINBlock(nnx.Module):
  """rin.layers.RINBlock: read, latent MLP, latent_layers x (self-attention, MLP), write,
  and the interface conv when conv_kernel_size > 0.

  RINBlock(latent_dim, interface_dim, *, rngs, **fields of the linen RINBlock). Called as
  block(z, x, deterministic=True, rngs=None) -> (z, x)."""

  def __init__(self, latent_dim: int, interface_dim: int, *, rngs: nnx.Rngs,
               num_tokens: int | None = None, **fields):
    self.config = c = layers.RINBlock(**fields)
    layers.check_conv_args(c.conv_kernel_size, c.conv_dropout)
    d, t = latent_dim, interface_dim
    kb = dict(implementation=c.implementation, interpret=c.interpret,
              block_sizes=c.block_sizes, attention_init=c.attention_init)
    self.read = ReadBlock(d, t, num_heads=c.rw_heads, width=c.rw_width, rngs=rngs, **kb)
    self.read_mlp_ln = _layer_norm(d, rngs, c.dtype)
    self.read_mlp = MLP(d, c.latent_mlp_ratio, dtype=c.dtype, rngs=rngs)
    for i in range(c.latent_layers):
      setattr(self, f"latent_attn_{i}", LatentSelfAttention(
          d, num_heads=c.latent_heads, dtype=c.dtype, rngs=rngs, **kb))
      setattr(self, f"latent_mlp_ln_{i}", _layer_norm(d, rngs, c.dtype))
      setattr(self, f"latent_mlp_{i}", MLP(d, c.latent_mlp_ratio, c.dropout, c.dtype,
                                           rngs=rngs))
    self.write = WriteBlock(t, d, num_heads=c.rw_heads, width=c.rw_width,
                            mlp_ratio=c.interface_mlp_ratio, rngs=rngs, **kb)
    if c.conv_kernel_size:
      # nnx builds parameters before any input: without conv_layout the square layout
      # (the authors') needs the token count.
      if c.conv_layout is None and num_tokens is None:
        raise ValueError("RINBlock(conv_kernel_size>0) in nnx needs conv_layout=(rows, cols, "
                         "time_segments) or num_tokens= (a square token count)")
      self.conv = InterfaceConv(t, kernel_size=c.conv_kernel_size,
                                layout=c.conv_layout or layers.square_conv_layout(num_tokens),
                                dropout=c.conv_dropout, dtype=c.dtype, rngs=rngs)

  def __call__(self, z, x, *, deterministic: bool = True, rngs=None):
    c, rngs = self.config, _as_rngs(rngs)
    drop_path = lambda y: _random_leaf(layers.DropPath(c.drop_path), y, deterministic, rngs)
    z = self.read(z, x)
    z = self._latent_mlp(z, "read_mlp", "read_mlp_ln", deterministic=True, rngs=None)
    for i in range(c.latent_layers):
      z = z + drop_path(getattr(self, f"latent_attn_{i}")(z))
      z = self._latent_mlp(z, f"latent_mlp_{i}", f"latent_mlp_ln_{i}",
                           deterministic=deterministic, rngs=rngs)
    x = self.write(x, z)
    if c.conv_kernel_size:
      x = self.conv(x, deterministic=deterministic, rngs=rngs)
    return z, x

  def _latent_mlp(self, z, name: str, ln_name: str, *, deterministic: bool, rngs):
    """z + s * MLP(LN(z)) through kernels.latent_mlp_block, as rin.layers.latent_mlp: the
    dropout seed and the drop-path scales drawn by the linen leaves' own methods."""
    c, mlp, ln = self.config, getattr(self, name), getattr(self, ln_name)
    rate, seed, scale = mlp.config.dropout, None, None
    train = not deterministic
    if train and (rate or c.drop_path) and rngs is None:
      raise ValueError(f"RINBlock(dropout={rate}, drop_path={c.drop_path}) in train mode "
                       "needs random numbers: pass rngs= (an nnx.Rngs with a 'dropout' "
                       "stream, or a key)")
    if train and rate:
      seed = layers.Dropout(rate).apply({}, method=layers.Dropout.draw_seed,
                                        rngs={"dropout": rngs.dropout()})
    if train and c.drop_path and name != "read_mlp":
      scale = layers.DropPath(c.drop_path).apply({}, z.shape[0],
                                                 method=layers.DropPath.keep_scale,
                                                 rngs={"dropout": rngs.dropout()})
    params = kernels.LatentMLPParams(ln.scale[...], ln.bias[...], mlp.Dense_0.kernel[...],
                                     mlp.Dense_0.bias[...], mlp.Dense_1.kernel[...],
                                     mlp.Dense_1.bias[...])
    if c.dtype is not None:
      z = z.astype(c.dtype)
    return kernels.latent_mlp_block(z, params, residual=True, branch_scale=scale,
                                    dropout_rate=rate if seed is not None else 0.0,
                                    dropout_seed=seed, implementation=c.implementation,
                                    interpret=c.interpret, block_sizes=c.block_sizes)

  @staticmethod
  def _dims(params):
    return ReadBlock._dims(params["read"])


# ---------------------------------------------------------------------------------------
# The models.
# ---------------------------------------------------------------------------------------

class _Stem(nnx.Module):
  """Holds a stem's "kernel"/"bias" and applies the linen stem (rin.model.PatchStem or
  TubeletStem, where the space(-time)-to-depth math lives) to them."""

  def __init__(self, linen_stem: Any, kernel_shape: tuple[int, ...], *, rngs: nnx.Rngs):
    self.config = linen_stem
    self.kernel = nnx.Param(layers.dense_init(rngs.params(), kernel_shape))
    self.bias = nnx.Param(_zeros(rngs.params(), (kernel_shape[-1],)))

  def __call__(self, x):
    return self.config.apply({"params": {"kernel": self.kernel[...], "bias": self.bias[...]}}, x)


class RIN(nnx.Module):
  """rin.RIN in nnx: RIN(*, rngs, **fields of rin.RIN) (the same keywords and defaults).

  model(x_t, gamma, labels=None, prev_latents=None, *, train=False, rngs=None)
  -> (prediction, latents), as the linen model's apply; rngs (nnx.Rngs with a "dropout"
  stream, or a key) is needed only when train=True with dropout or drop_path > 0."""

  _linen_cls = linen_model.RIN

  def __init__(self, *, rngs: nnx.Rngs, **fields):
    if isinstance(fields.get("latent_layers_per_block"), list):   # hashable, as nnx needs
      fields["latent_layers_per_block"] = tuple(fields["latent_layers_per_block"])
    self.config = c = self._linen_cls(**fields)
    d, t, m = c.latent_dim, c.interface_dim, c.num_latents
    dt = c.dtype
    self._build_interface(rngs)
    num_pos = m - 1 - (c.num_classes > 0)
    self.pos_latents = nnx.Param(linen_model.pos_init(rngs.params(), (num_pos, d)))
    self.time_dense_0 = _dense(d // 4, d, rngs, dt)
    self.time_dense_1 = _dense(d, d, rngs, dt)
    if c.num_classes > 0:
      self.class_dense = _dense(c.num_classes, d, rngs, dt)
    self.self_cond_ln = _layer_norm(d, rngs, dt)
    self.self_cond_mlp = MLP(d, c.self_cond_mlp_ratio, dtype=dt, rngs=rngs)
    self.self_cond_ln0 = _layer_norm(d, rngs, dt, scale_init=_zeros, bias_init=_zeros)
    for i, layers_i in enumerate(c._layers_per_block()):
      setattr(self, f"block_{i}", RINBlock(
          d, t, latent_layers=layers_i, latent_heads=c.latent_heads,
          latent_mlp_ratio=c.latent_mlp_ratio, rw_heads=c.rw_heads, rw_width=c.rw_width,
          interface_mlp_ratio=c.interface_mlp_ratio, dropout=c.dropout,
          drop_path=c.drop_path, dtype=dt, implementation=c.implementation,
          interpret=c.interpret, block_sizes=c.block_sizes, attention_init=c.attention_init,
          conv_kernel_size=c.conv_kernel_size, conv_dropout=c.conv_dropout,
          conv_layout=c._conv_layout() if c.conv_kernel_size else None, rngs=rngs))
    self.readout_ln = _layer_norm(t, rngs, dt)
    self.readout = _dense(t, self._readout_features(), rngs, dt)

  # The four steps of rin.model.RIN; VideoRIN replaces the interface and the readout.
  def _build_interface(self, rngs):
    c = self.config
    p, g = c.patch_size, c.image_size // c.patch_size
    self.stem = _Stem(linen_model.PatchStem(c.interface_dim, p, dtype=c.dtype),
                      (p, p, c.channels, c.interface_dim), rngs=rngs)
    self.stem_ln = _layer_norm(c.interface_dim, rngs, c.dtype)
    self.pos_interface = nnx.Param(linen_model.pos_init(rngs.params(), (g * g, c.interface_dim)))

  def _readout_features(self) -> int:
    c = self.config
    return c.patch_size * c.patch_size * c.channels

  def _interface(self, x_t, cond=None):
    c = self.config
    x = self.stem(x_t)
    x = x.reshape(x_t.shape[0], -1, c.interface_dim)
    x = self.stem_ln(x)
    return x + self.pos_interface[...].astype(x.dtype)

  def _latents(self, b, gamma, labels, prev_latents):
    c = self.config
    d, m, dt = c.latent_dim, c.num_latents, c.dtype or jnp.float32
    pos = self.pos_latents[...]
    tokens = [jnp.broadcast_to(pos, (b,) + pos.shape)]
    temb = linen_model.timestep_embedding(gamma, d // 4)
    tokens.append(self.time_dense_1(jax.nn.silu(self.time_dense_0(temb)))[:, None, :])
    if c.num_classes > 0:
      onehot = jax.nn.one_hot(labels, c.num_classes, dtype=jnp.float32)
      tokens.append(self.class_dense(onehot)[:, None, :])
    z = jnp.concatenate(tokens, axis=1).astype(dt)
    prev = linen_model.previous_latents(prev_latents, b, m, d, dt)
    prev = prev + self.self_cond_mlp(self.self_cond_ln(prev))
    return z + self.self_cond_ln0(prev)

  def _blocks(self, z, x, train: bool, rngs):
    for i in range(self.config.num_blocks):
      z, x = getattr(self, f"block_{i}")(z, x, deterministic=not train, rngs=rngs)
    return z, x

  def _readout(self, x):
    c = self.config
    b, p, ch, g = x.shape[0], c.patch_size, c.channels, c.image_size // c.patch_size
    out = self.readout(self.readout_ln(x))
    out = out.reshape(b, g, g, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, g * p, g * p, ch)

  def __call__(self, x_t, gamma, labels=None, prev_latents=None, *, train: bool = False,
               rngs=None):
    c = self.config
    c._check_inputs(x_t, gamma, labels)
    x = self._interface(x_t.astype(c.dtype or jnp.float32))
    z = self._latents(x_t.shape[0], gamma, labels, prev_latents)
    z, x = self._blocks(z, x, train, _as_rngs(rngs))
    return self._readout(x).astype(jnp.float32), z.astype(jnp.float32)

  @staticmethod
  def _dims(params):
    return ()


class VideoRIN(RIN):
  """rin.VideoRIN in nnx: VideoRIN(*, rngs, **fields of rin.VideoRIN).

  model(x_t [B, F-Fc, H, W, C], gamma [B], cond [B, Fc, H, W, C], prev_latents=None, *,
  train=False, rngs=None) -> (predicted frames, latents)."""

  _linen_cls = linen_model.VideoRIN

  def _build_interface(self, rngs):
    c = self.config
    pt, p, t = c.tubelet_frames, c.patch_size, c.interface_dim
    self.stem = _Stem(linen_model.TubeletStem(t, pt, p, dtype=c.dtype),
                      (pt, p, p, c.channels, t), rngs=rngs)
    self.stem_ln = _layer_norm(t, rngs, c.dtype)
    fixed = c._fixed_tape_positions()
    init = linen_model.pos_init if fixed is None else nnx.initializers.zeros
    self.pos_interface = nnx.Param(init(rngs.params(), (c.num_patches, t)))

  def _readout_features(self) -> int:
    c = self.config
    return c.tubelet_frames * c.patch_size * c.patch_size * c.channels

  def _interface(self, x_t, cond=None):
    c = self.config
    pos = self.pos_interface[...]
    fixed = c._fixed_tape_positions()       # numpy constants, not state
    if fixed is not None:
      pos = pos + jnp.asarray(fixed)
    tokens, offset = [], 0
    for frames in [x_t] + ([cond] if c.cond_frames else []):
      y = self.stem(frames).reshape(x_t.shape[0], -1, c.interface_dim)
      n = y.shape[1]
      tokens.append(self.stem_ln(y) + pos[offset:offset + n].astype(y.dtype))
      offset += n
    return jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0]

  def __call__(self, x_t, gamma, cond=None, prev_latents=None, *, train: bool = False,
               rngs=None):
    c = self.config
    c._check_inputs(x_t, gamma, cond)
    dt = c.dtype or jnp.float32
    x = self._interface(x_t.astype(dt), None if cond is None else cond.astype(dt))
    z = self._latents(x_t.shape[0], gamma, None, prev_latents)
    z, x = self._blocks(z, x, train, _as_rngs(rngs))
    return self._readout(x).astype(jnp.float32), z.astype(jnp.float32)

  def _readout(self, x):
    c = self.config
    p, g = c.patch_size, c.image_size // c.patch_size
    n_t = c._time_steps(c.pred_frames)
    out = self.readout(self.readout_ln(x[:, :n_t * g * g]))
    return linen_model.tubelets_to_video(out.reshape(x.shape[0], n_t, g, g, -1),
                                         c.tubelet_frames, p, c.channels, c.pred_frames)


# ---------------------------------------------------------------------------------------
# Converters. The nnx state and the linen tree have the same paths; these copy, checked.
# ---------------------------------------------------------------------------------------

_NNX_OF = {layers.ReadBlock: ReadBlock, layers.WriteBlock: WriteBlock,
           layers.InterfaceConv: InterfaceConv,
           layers.LatentSelfAttention: LatentSelfAttention, layers.RINBlock: RINBlock,
           linen_model.RIN: RIN, linen_model.VideoRIN: VideoRIN}


def _unwrap(params, what: str) -> dict:
  """Accepts a linen params tree or the variables dict `init` returns ({"params": ...})."""
  if not isinstance(params, Mapping):
    raise TypeError(f"{what}: expected a nested dict of arrays (a linen params tree), got "
                    f"{type(params).__name__}")
  if set(params) == {"params"} and isinstance(params["params"], Mapping):
    params = params["params"]
  return params


def linen_params(module: nnx.Module) -> dict:
  """The module's parameters as the nested dict its linen counterpart's `init` gives
  (under "params"): the same paths, shapes and values."""
  flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  return unflatten_dict({tuple(str(k) for k in path): v for path, v in flat.items()})


def _show(paths, n: int = 6) -> str:
  shown = ", ".join("/".join(p) for p in sorted(paths)[:n])
  return shown + (f" (and {len(paths) - n} more)" if len(paths) > n else "")


def load_linen_params(module: nnx.Module, params) -> nnx.Module:
  """Copies a linen params tree (or `{"params": tree}`) into `module` in place; returns it.

  The tree must hold exactly the module's parameters with the same shapes: a missing or
  extra path or another shape raises ValueError naming the paths, and nothing is changed.
  Values keep their dtype (as linen's apply would use them).
  """
  what = f"load_linen_params({type(module).__name__})"
  given = flatten_dict(_unwrap(params, what))
  variables = {tuple(str(k) for k in path): var
               for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  missing, extra = set(variables) - set(given), set(given) - set(variables)
  if missing or extra:
    parts = ([f"missing {len(missing)}: {_show(missing)}"] if missing else []) + (
        [f"unexpected {len(extra)}: {_show(extra)}"] if extra else [])
    raise ValueError(f"{what}: the tree does not match the module's parameters ("
                     f"{'; '.join(parts)}); was it saved from another model config?")
  bad = []
  for path, v in given.items():
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
      bad.append(f"{'/'.join(path)} is a {type(v).__name__}, not an array")
    elif tuple(v.shape) != tuple(variables[path].shape):
      bad.append(f"{'/'.join(path)} has shape {tuple(v.shape)}, the module "
                 f"{tuple(variables[path].shape)}")
  if bad:
    raise ValueError(f"{what}: {len(bad)} parameter(s) do not fit: {'; '.join(bad[:6])}")
  for path, v in given.items():
    variables[path].set_value(jnp.asarray(v))
  return module


def to_linen(module: nnx.Module):
  """(the linen module, its params tree): `linen.apply({"params": params}, ...)` computes
  what `module(...)` does."""
  return module.config, linen_params(module)


def from_linen(linen_module, params) -> nnx.Module:
  """The nnx module mirroring `linen_module` (rin.RIN / VideoRIN or a layer of rin.layers
  that this module mirrors), holding `params` (a linen tree, or `{"params": tree}`).

  Built abstractly (no random initialisation) and then filled, checked as in
  load_linen_params. Layer widths are read from the tree.
  """
  cls = _NNX_OF.get(type(linen_module))
  if cls is None:
    raise TypeError(f"from_linen: no nnx counterpart of {type(linen_module).__name__}; "
                    f"supported: {', '.join(sorted(c.__name__ for c in _NNX_OF))}")
  tree = _unwrap(params, "from_linen")
  try:
    dims = cls._dims(tree)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"from_linen: the tree is not a {type(linen_module).__name__} params "
                     f"tree (cannot read the layer widths: {type(e).__name__} {e})") from None
  fields = {f: getattr(linen_module, f) for f in linen_module.__dataclass_fields__
            if f not in ("parent", "name")}
  module = nnx.eval_shape(lambda: cls(*dims, rngs=nnx.Rngs(0), **fields))
  return load_linen_params(module, tree)
