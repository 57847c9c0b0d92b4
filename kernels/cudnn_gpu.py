"""cuDNN backend (`implementation="cudnn"`): the attention core is cuDNN's fused flash
attention through `jax.nn.dot_product_attention(implementation="cudnn")`; the read, write
and latent blocks are kernels/reference.py's compositions over that core (LN, projections,
MLP and residuals are XLA's fusions and GEMMs, as on the "xla" path).

Why it exists: it is the fused attention every JAX user on an NVIDIA GPU gets with one
argument, so it is the peer the Triton kernels must beat (bench.gpu_static, bench.kernels,
bench.model compare all three). XLA compiles each attention to one `__cudnn$fmha` custom
call forward and one backward; the scores never reach HBM.

What cuDNN takes (checked here, with errors naming the argument): bf16 or fp16 operands
(no fp32: use "xla" or "triton"), head_dim a multiple of 8 and <= 256 (<= 128 before
Hopper; jax checks that against the device), an NVIDIA GPU. On a machine without one, a
call raises here instead of failing later inside XLA's CPU compiler; a deviceless compile
for a GPU target (bench.gpu_static) runs the op under `jax.default_device(<the target's
device>)`, which is what this check reads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import reference

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_GPU = ("gpu", "cuda")


def _target_platform() -> str:
  """The platform ops are being placed on: the default device set in a
  `jax.default_device(...)` context (a deviceless GPU target), else the default backend."""
  dev = jax.config.jax_default_device
  if dev is not None and not isinstance(dev, str):
    return dev.platform
  return dev if isinstance(dev, str) else jax.default_backend()


def _check(what, q_dtype, head_dim, interpret):
  if interpret:
    raise ValueError(f"implementation='cudnn': {what}: interpret=True is not supported "
                     "(cuDNN has no interpreter; use implementation='xla' on CPU)")
  if jnp.dtype(q_dtype) not in _DTYPES:
    raise TypeError(f"implementation='cudnn': {what}: operands must be bfloat16 or "
                    f"float16 (cuDNN flash attention), got {jnp.dtype(q_dtype)}; use "
                    "implementation='xla' or 'triton' for float32")
  if head_dim % 8 or head_dim > 256:
    raise ValueError(f"implementation='cudnn': {what}: head_dim={head_dim} must be a "
                     "multiple of 8 and <= 256 (cuDNN flash attention; <= 128 before Hopper)")
  platform = _target_platform()
  if platform not in _GPU:
    raise NotImplementedError(
        f"implementation='cudnn' needs an NVIDIA GPU with cuDNN; ops here are placed on "
        f"{platform!r}. Use implementation='xla' (or None) on this machine.")


def cross_attention(q, k, v, *, scale=None, interpret=False, block_sizes=None,
                    precision=None):
  """softmax(q k^T * scale) v by cuDNN; [B, L, H, Dh] layout. `block_sizes` and
  `precision` do not apply (cuDNN picks its tiles; bf16/fp16 operands, fp32 softmax)."""
  del precision
  if block_sizes is not None:
    raise ValueError("implementation='cudnn': block_sizes must be None (cuDNN picks its "
                     f"own tiles), got {block_sizes!r}")
  _check("cross_attention", q.dtype, q.shape[-1], interpret)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def _attention(interpret, block_sizes):
  return functools.partial(cross_attention, interpret=interpret, block_sizes=block_sizes)


def read_block(z, x, p, *, num_heads, interpret=False, block_sizes=None, precision=None):
  _check("read_block", z.dtype, p.wq.shape[1] // num_heads, interpret)
  return reference.read_block(z, x, p, num_heads=num_heads, precision=precision,
                              attention=_attention(interpret, block_sizes))


def write_block(x, z, p, *, num_heads, interpret=False, block_sizes=None, precision=None):
  _check("write_block", x.dtype, p.wq.shape[1] // num_heads, interpret)
  return reference.write_block(x, z, p, num_heads=num_heads, precision=precision,
                               attention=_attention(interpret, block_sizes))


def latent_attention_block(z, p, *, num_heads, residual=False, interpret=False,
                           block_sizes=None, precision=None):
  _check("latent_attention_block", z.dtype, p.wq.shape[1] // num_heads, interpret)
  return reference.latent_attention_block(z, p, num_heads=num_heads, residual=residual,
                                          precision=precision,
                                          attention=_attention(interpret, block_sizes))


def latent_mlp_block(z, p, *, residual=False, branch_scale=None, dropout_rate=0.0,
                     dropout_seed=None, interpret=False, block_sizes=None, precision=None):
  """No attention in it: cuDNN adds nothing, so XLA's composition (kernels/reference.py)."""
  return reference.latent_mlp_block(z, p, residual=residual, branch_scale=branch_scale,
                                    dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                                    precision=precision)


__all__ = ["cross_attention", "latent_attention_block", "latent_mlp_block", "read_block",
           "write_block"]
