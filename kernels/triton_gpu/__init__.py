"""Triton GPU backend (`implementation="triton"`), called from JAX through jax-triton.

Backend contract (see kernels/api.py):
    cross_attention(q, k, v, *, scale, interpret, block_sizes)
    read_block(z, x, p, *, num_heads, interpret, block_sizes)
    write_block(x, z, p, *, num_heads, interpret, block_sizes)

`interpret=True` runs exactly these `@triton.jit` kernels through Triton's
interpreter on CPU (torch CPU tensors, via jax.pure_callback); no environment
variable is needed (see launch.py). `block_sizes` takes a `BlockSizes` (or a dict
of its fields); unset fields come from autotune_table.py, else config.py's
heuristics.

Modules: attention_kernels.py (the attention kernels), read_block_kernel.py (read
attention with the K/V projection inside), attention.py (custom_vjp + vmap op),
blocks.py (read/write blocks: Triton attention, XLA GEMMs; it says why), launch.py
(jax-triton / interpreter glue, `record_launches()`), config.py + autotune_table.py
(block sizes; measured Triton-vs-XLA wins that drive implementation=None).
The tools live in bench/: triton_tune.py (regenerates the table on a GPU),
triton_gpu_check.py (GPU numerics + timings, writes the wins), triton_compile_report.py
(compile report and static lint). Precision:
kernels/precision.py (`precision=` on every op: TF32 default for fp32, "highest" exact).
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels.triton_gpu import attention as _attention
from kernels.triton_gpu import blocks as _blocks
from kernels.triton_gpu.config import BlockSizes

_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _check_dtype(what, dtype):
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
    raise TypeError(f"implementation='triton': {what} must be float32, float16 or "
                    f"bfloat16, got {jnp.dtype(dtype)}")


def _check_head_dim(what, dh):
  if dh > 256:
    raise ValueError(f"implementation='triton': {what} head_dim={dh} must be <= 256")


def cross_attention(q, k, v, *, scale=None, interpret=False, block_sizes=None,
                    precision=None):
  _check_dtype("q", q.dtype)
  _check_head_dim("cross_attention", q.shape[-1])
  return _attention.cross_attention(q, k, v, scale=scale, interpret=interpret,
                                    block_sizes=block_sizes, precision=precision)


def read_block(z, x, p, *, num_heads, interpret=False, block_sizes=None, precision=None):
  _check_dtype("z", z.dtype)
  _check_head_dim("read_block", p.wq.shape[1] // num_heads)
  return _blocks.read_block(z, x, p, num_heads=num_heads, interpret=interpret,
                            block_sizes=block_sizes, precision=precision)


def write_block(x, z, p, *, num_heads, interpret=False, block_sizes=None, precision=None):
  _check_dtype("x", x.dtype)
  _check_head_dim("write_block", p.wq.shape[1] // num_heads)
  return _blocks.write_block(x, z, p, num_heads=num_heads, interpret=interpret,
                             block_sizes=block_sizes, precision=precision)


def latent_attention_block(z, p, *, num_heads, residual=False, interpret=False,
                           block_sizes=None, precision=None):
  """Composed for now: LN and the q/k/v/out GEMMs in XLA around the Triton attention."""
  from kernels import reference
  _check_dtype("z", z.dtype)
  _check_head_dim("latent_attention_block", p.wq.shape[1] // num_heads)
  attn = lambda q, k, v: cross_attention(q, k, v, interpret=interpret,
                                         block_sizes=block_sizes, precision=precision)
  return reference.latent_attention_block(z, p, num_heads=num_heads, residual=residual,
                                          precision=precision, attention=attn)


def latent_mlp_block(z, p, *, residual=False, branch_scale=None, dropout_rate=0.0,
                     dropout_seed=None, interpret=False, block_sizes=None, precision=None):
  """Composed for now: XLA's GEMMs and fusions (kernels/reference.py)."""
  from kernels import reference
  _check_dtype("z", z.dtype)
  return reference.latent_mlp_block(z, p, residual=residual, branch_scale=branch_scale,
                                    dropout_rate=dropout_rate, dropout_seed=dropout_seed,
                                    precision=precision)


__all__ = ["BlockSizes", "cross_attention", "latent_attention_block", "latent_mlp_block",
           "read_block",
           "write_block"]
