"""Helpers shared by the Pallas TPU kernels: padding, matmuls, VMEM accounting."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The op's constants are the reference's (kernels/reference.py defines the op).
from kernels.reference import INV_SQRT_2PI, LN_EPS, SQRT_HALF, gelu  # noqa: F401
from kernels.tiling import round_up

# VMEM per TensorCore of each TPU generation, in MiB (jax's own hardware table,
# `pltpu.get_tpu_info_for_chip`, and the Pallas TPU hardware reference): v5e and v6e
# have 128, v5p and v7x 64 (v7x: 64 per core, the whole of it), v4 16. Keys are the
# names the tools use (bench.tpu_static --gens, RIN_TPU_GENERATION).
VMEM_CAPACITY_MIB = {"v4": 16, "v5e": 128, "v5p": 64, "v6e": 128, "v7x": 64}
# device_kind strings (jax.devices()[0].device_kind) of those generations.
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                 "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU7x": "v7x",
                 "TPU v7x": "v7x"}
# The scoped limit asked of Mosaic is 3/4 of the core's VMEM: Mosaic's own internal
# scratch, spills and the pipeline's semaphores live in the rest, and the kernels'
# estimates below are estimates (a 64 MiB request is the whole of a v5p or v7x core).
VMEM_FRACTION = 0.75
# Generations the model targets; an unknown target gets the smallest of their budgets.
TARGET_GENERATIONS = ("v5e", "v5p", "v6e", "v7x")


def _generation_budget(gen: str) -> int:
  return int(VMEM_CAPACITY_MIB[gen] * VMEM_FRACTION) * 2**20


def vmem_limit_bytes(generation: str | None = None) -> int:
  """Scoped-VMEM limit (and block-size budget) for `generation` (None: the current one,
  see tpu_generation(); unknown: VMEM_LIMIT_BYTES, the smallest over TARGET_GENERATIONS,
  which fits all)."""
  gen = tpu_generation() if generation is None else generation
  if gen is None:
    return VMEM_LIMIT_BYTES
  if gen not in VMEM_CAPACITY_MIB:
    raise ValueError(f"TPU generation {gen!r} is not one of {sorted(VMEM_CAPACITY_MIB)}")
  return _generation_budget(gen)


def tpu_generation() -> str | None:
  """The generation the kernels are built for: $RIN_TPU_GENERATION when set (deviceless
  compiles, whose default device is the CPU, name their target this way), else the
  default device's when it is a TPU, else None (unknown)."""
  env = os.environ.get("RIN_TPU_GENERATION")
  if env:
    if env not in VMEM_CAPACITY_MIB:
      raise ValueError(f"RIN_TPU_GENERATION={env!r} is not one of {sorted(VMEM_CAPACITY_MIB)}")
    return env
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  return _DEVICE_KINDS.get(dev.device_kind) if dev.platform == "tpu" else None


# The budget that fits every target generation (48 MiB today: v5p's and v7x's); the
# kernels use vmem_limit_bytes(), this stays for callers that want one constant.
VMEM_LIMIT_BYTES = min(_generation_budget(g) for g in TARGET_GENERATIONS)
# Finite "minus infinity" for masked scores: exp(NEG - m) == 0 and NEG - NEG == 0
# (never NaN), unlike -inf.
NEG = -1e30


def pad_axis(x, axis: int, size: int):
  """Zero-pads `x` along `axis` up to `size` (no-op when already that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def padded_head_dim(d: int) -> int:
  """Head dims <= 128 are used as they are (a block equal to the full array dim is
  legal); larger ones are zero-padded to a multiple of 128 (the lane width)."""
  return d if d <= 128 else round_up(d, 128)


def mm(a, b, dtype):
  """a @ b with operands in `dtype` and float32 accumulation."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def mm_nt(a, b, dtype):
  """a @ b.T (contract the last dims)."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def mm_tn(a, b, dtype):
  """a.T @ b (contract the first dims)."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def bmm(a, b, dtype):
  """Batched a @ b over the leading (head) axis: [h, m, k] x [h, k, n] -> [h, m, n]."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((2,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def bmm_nt(a, b, dtype):
  """Batched a @ b^T: [h, m, k] x [h, n, k] -> [h, m, n]."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((2,), (2,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def bmm_tn(a, b, dtype):
  """Batched a^T @ b: [h, k, m] x [h, k, n] -> [h, m, n]."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)


def layer_norm_fwd(x, scale, bias):
  """x [n, C] float32 -> (y, xhat, rstd), two-pass variance like the reference."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + LN_EPS)
  xhat = xc * rstd
  return xhat * scale + bias, xhat, rstd


def layer_norm_bwd(dy, xhat, rstd, scale):
  """Returns (dx, dscale_rows, dbias_rows) for y = xhat * scale + bias.

  dscale/dbias are summed over the rows of this tile ([1, C])."""
  dxhat = dy * scale
  c = xhat.shape[-1]
  dx = rstd * (dxhat - jnp.sum(dxhat, -1, keepdims=True) / c
               - xhat * (jnp.sum(dxhat * xhat, -1, keepdims=True) / c))
  return dx, jnp.sum(dy * xhat, 0, keepdims=True), jnp.sum(dy, 0, keepdims=True)


def gelu_grad(x):
  """d/dx of the exact GELU x * Phi(x): Phi(x) + x * phi(x) (the kernels' backward)."""
  cdf = 0.5 * (1.0 + jax.lax.erf(x * SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * INV_SQRT_2PI
  return cdf + x * pdf


def vmem_bytes(shape, dtype) -> int:
  """Bytes a VMEM buffer of `shape` occupies with TPU (sublane, 128-lane) tiling."""
  shape = tuple(shape)
  itemsize = jnp.dtype(dtype).itemsize
  if len(shape) == 0:
    return 4
  if len(shape) == 1:
    shape = (1,) + shape
  sub = 8 * max(1, 4 // itemsize)
  lead = math.prod(shape[:-2])
  return lead * round_up(shape[-2], sub) * round_up(shape[-1], 128) * itemsize


def check_vmem(kernel: str, estimate: int, block_sizes, budget: int | None = None):
  """Raises when `estimate` bytes exceed `budget` (None: the target generation's)."""
  where = "the given budget"
  if budget is None:
    gen = tpu_generation()
    budget = vmem_limit_bytes(gen)
    where = (f"TPU {gen}" if gen else
             f"the smallest of {', '.join(TARGET_GENERATIONS)} (no TPU generation known; "
             f"set RIN_TPU_GENERATION to target one)")
  if estimate > budget:
    raise ValueError(
        f"{kernel}: block_sizes={block_sizes} need about {estimate / 2**20:.1f} MiB of "
        f"VMEM (double-buffered blocks, scratch and temporaries), more than the "
        f"{budget / 2**20:.0f} MiB budget of {where}; choose smaller blocks")


def compiler_params(*semantics: str):
  return pltpu.CompilerParams(dimension_semantics=tuple(semantics),
                              vmem_limit_bytes=vmem_limit_bytes())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tilings of all three ops in one object, for callers (the RIN layers) that pass
  one `block_sizes` to every op: each op takes its own field (None: defaults)."""
  attention: Any = None   # AttentionBlockSizes
  read: Any = None        # ReadBlockSizes
  write: Any = None       # WriteBlockSizes
  latent: Any = None      # LatentBlockSizes


def op_block_sizes(block_sizes, field: str, cls):
  """The op's own block sizes from None, its dataclass or a BlockSizes."""
  if isinstance(block_sizes, BlockSizes):
    block_sizes = getattr(block_sizes, field)
  if block_sizes is None:
    return cls()
  if not isinstance(block_sizes, cls):
    raise ValueError(f"block_sizes must be a pallas_tpu.{cls.__name__}, a "
                     f"pallas_tpu.BlockSizes or None, got {type(block_sizes).__name__}")
  return block_sizes


def check_block(name: str, value: int, multiple: int, block_sizes) -> None:
  if value is None:
    return
  if not isinstance(value, int) or value < 1 or value % multiple:
    raise ValueError(f"block_sizes.{name}={value!r} must be a positive multiple of "
                     f"{multiple} (TPU blocks tile (8, 128)); got {block_sizes}")


# ----------------------------------------------------------------------------
# Per-core partial accumulators (megacore chips: v4, v5p). A kernel that accumulates
# weight gradients over its whole grid must run that grid sequentially; a leading
# "parallel" axis of `num_partials` independent accumulators lets each TensorCore own
# one, and XLA sums them after the call.
# ----------------------------------------------------------------------------

DEFAULT_NUM_PARTIALS = 2


def check_num_partials(value, block_sizes) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"block_sizes.num_partials={value!r} must be a positive int (the "
                     f"number of per-core weight-gradient accumulators); got {block_sizes}")


def batch_partials(num_partials: int, batch: int) -> tuple[int, int]:
  """(partials, batch elements per partial) splitting `batch` over at most `num_partials`
  accumulators; the batch is zero-padded to partials * per-partial when they do not
  divide it (pad_axis), which the weight-gradient kernels treat as exact zeros."""
  parts = max(1, min(num_partials, batch))
  return parts, -(-batch // parts)


def partial_spec(shape):
  """BlockSpec of one partial accumulator [num_partials, *shape] on a grid whose first
  axis is the partial: the kernel sees `shape` (leading dim squeezed)."""
  shape = tuple(shape)
  return pl.BlockSpec((pl.Squeezed(),) + shape, lambda p, *_: (p,) + (0,) * len(shape))
