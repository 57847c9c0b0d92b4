"""Public ops: argument checks, then dispatch to one implementation.

Implementations:
  "xla"        pure jax.numpy (kernels/reference.py); runs anywhere, the default on CPU.
  "pallas_tpu" Pallas kernels lowered through Mosaic (kernels/pallas_tpu/).
  "triton"     Triton kernels called through jax-triton (kernels/triton_gpu/).
  "cudnn"      cuDNN fused attention (jax.nn.dot_product_attention(implementation="cudnn"))
               as the attention core, blocks composed over it in XLA (kernels/cudnn_gpu.py).

`implementation=None` picks the platform default. On GPU it is chosen per op/shape class
among "xla", "cudnn" and "triton" by evidence, the fastest one: a GPU measurement committed
in kernels/triton_gpu/autotune_table.py (WINS, filled by bench/gpu_suite.sh) where one
exists, else the estimate in kernels/gpu_cost_table.py (WINS, `bench.gpu_static
--write-wins`: a roofline over the kernels XLA:GPU compiles deviceless, no GPU measured),
"xla" for a class neither has; said once in the log per class with its source. On TPU the same rule runs over
kernels/pallas_tpu/cost_table.py (WINS, filled by `bench.tpu_static --write-wins` from the
TPU compiler's own cost model: an estimate, no TPU measured): the Pallas kernels only for a
class whose estimated time per train step, kernels plus the XLA ops around them, beats
XLA's fusion of the same op. Today only the CIFAR-10 latent self-attention block does
(bench/results/tpu_static/latent_v5e.md); read and write lose (and ImageNet-64's latent
block has no row yet), so those run "xla"; implementation="pallas_tpu" forces the kernels. `precision=` follows
kernels/precision.py (None: TF32 for fp32 dots, as XLA; "highest": exact fp32).
`interpret=True` runs a kernel implementation in its interpreter on CPU (it has no effect on "xla"). An
implementation that is known but not importable here raises instead of silently
running the reference.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels import precision as _precision
from kernels import reference
from kernels.params import (LatentAttentionParams, LatentMLPParams, ReadBlockParams,
                            WriteBlockParams)

# name -> module implementing cross_attention / read_block / write_block.
_BACKEND_MODULES = {
    "xla": "kernels.reference",
    "pallas_tpu": "kernels.pallas_tpu",
    "triton": "kernels.triton_gpu",
    "cudnn": "kernels.cudnn_gpu",
}
IMPLEMENTATIONS = tuple(_BACKEND_MODULES)
# TPU: "xla", widened per op/shape class to "pallas_tpu" where cost_table.WINS (TPU cost
# model) shows the kernels winning; GPU: per class the fastest of xla / cudnn / triton by
# the measured WINS, else the gpu_cost_table estimate (_gpu_default); "triton" only for a
# call without an op class.
_PLATFORM_DEFAULT = {"tpu": "xla", "gpu": "triton", "cuda": "triton"}
TPU_DEFAULT_REASON = ("per op class by kernels/pallas_tpu/cost_table.py WINS, the TPU "
                      "compiler's cost-model estimate; bench/results/tpu_static/latent_v5e.md: "
                      "only the CIFAR-10 latent attention block beats XLA's fusion of it")
_GPU_PLATFORMS = ("gpu", "cuda")
_LOGGED: set = set()


def _log_once(key, msg, *args):
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.warning(msg, *args)


def shape_class(op: str, *arrays, heads: int = 0, dtype=None) -> str:
  """The key of an op/shape class in the GPU measurement table (autotune_table.WINS):
  "op:dims:dtype", dims the non-batch sizes of the operands (and the head count)."""
  dims = "x".join(str(d) for a in arrays for d in a.shape[1:])
  dt = jnp.dtype(dtype or arrays[0].dtype).name
  return f"{op}:{dims}" + (f":h{heads}" if heads else "") + f":{dt}"


# platform -> (module with the WINS table, the kernel implementation it can choose).
_WINS_TABLES = {"gpu": ("kernels.triton_gpu.autotune_table", "triton"),
                "tpu": ("kernels.pallas_tpu.cost_table", "pallas_tpu")}
_WINS_SOURCE = {"gpu": "GPU measurement", "tpu": "TPU cost-model estimate (bench.tpu_static)"}


# GPU evidence, in order of precedence: (module, what it is).
_GPU_EVIDENCE = (("kernels.triton_gpu.autotune_table", "GPU measurement"),
                 ("kernels.gpu_cost_table", "ESTIMATE (bench.gpu_static roofline over the "
                                            "deviceless XLA:GPU compile)"))
_GPU_CHOICES = ("xla", "cudnn", "triton")


def _gpu_default(op_key: str) -> str:
  """implementation=None on GPU for one op/shape class: the fastest of xla / cudnn / triton
  by the first evidence table with a row for the class (a measurement overrides the
  estimate); an implementation that cannot run here (not importable; cudnn for a dtype
  other than bf16/fp16) is skipped; "xla" when no table has the class."""
  for module, what in _GPU_EVIDENCE:
    try:
      row = getattr(importlib.import_module(module), "WINS", {}).get(op_key)
    except ImportError:
      row = None
    if not row:
      continue
    times = {}
    for impl in _GPU_CHOICES:
      us = row.get(f"{impl}_us")
      if us is None or (impl == "cudnn" and not op_key.endswith(("bfloat16", "float16"))):
        continue
      if impl != "xla":
        try:
          _backend(impl)
        except NotImplementedError:
          continue
      times[impl] = us
    if not times:
      continue
    best = min(times, key=times.get)
    _log_once(("gpu", op_key), "implementation=None on GPU: %s -> %r (%s on %s: %s)", op_key,
              best, what, row.get("device", "?"),
              ", ".join(f"{k} {v:.1f} us" for k, v in sorted(times.items())))
    return best
  _log_once(("gpu", op_key), "implementation=None on GPU: no measurement or estimate for %s; "
            "using 'xla' (implementation='triton' or 'cudnn' forces one)", op_key)
  return "xla"


def _measured_default(op_key: str, platform: str = "gpu") -> str:
  """Default for one op/shape class on `platform` ("gpu" or "tpu"): the kernel
  implementation only where its committed WINS row (a GPU measurement; on TPU the TPU
  compiler's cost model, bench.tpu_static) shows it faster than XLA."""
  module, impl = _WINS_TABLES[platform]
  what = _WINS_SOURCE[platform]
  try:
    wins = getattr(importlib.import_module(module), "WINS", {})
  except ImportError as e:
    _log_once(("noimport", platform), "implementation=None on %s: %s does not import (%s); "
              "using 'xla'", platform.upper(), module, e)
    return "xla"
  row = wins.get(op_key)
  if row and row.get(f"{impl}_us", float("inf")) < row.get("xla_us", 0.0):
    _log_once((platform, op_key), "implementation=None on %s: %s -> %r (%s %.1f us vs "
              "xla %.1f us on %s)", platform.upper(), op_key, impl, what, row[f"{impl}_us"],
              row["xla_us"], row.get("device", "?"))
    return impl
  if row:
    _log_once((platform, op_key), "implementation=None on %s: %s -> 'xla' (%s: %s %.1f us "
              "vs xla %.1f us on %s); implementation=%r forces the kernels", platform.upper(),
              op_key, what, impl, row.get(f"{impl}_us", float("nan")), row.get("xla_us",
                                                                          float("nan")),
              row.get("device", "?"), impl)
  else:
    _log_once((platform, op_key), "implementation=None on %s: no committed %s shows %r "
              "beating XLA for %s; using 'xla' (implementation=%r forces it)",
              platform.upper(), what, impl, op_key, impl)
  return "xla"


def _backend(name: str):
  """Returns the module implementing `name`, with a clear error if it can't."""
  if name not in _BACKEND_MODULES:
    raise ValueError(f"implementation={name!r} is unknown; expected one of "
                     f"{IMPLEMENTATIONS} or None (platform default)")
  try:
    return importlib.import_module(_BACKEND_MODULES[name])
  except ImportError as e:
    raise NotImplementedError(
        f"implementation={name!r} is not available here: {e}") from e


def available_implementations() -> tuple[str, ...]:
  """Implementations whose module imports in this environment."""
  out = []
  for name in IMPLEMENTATIONS:
    try:
      _backend(name)
      out.append(name)
    except NotImplementedError:
      pass
  return tuple(out)


def default_implementation(platform: str | None = None) -> str:
  """The implementation `implementation=None` resolves to on `platform`."""
  platform = platform or jax.default_backend()
  name = _PLATFORM_DEFAULT.get(platform, "xla")
  if platform == "tpu":
    _log_once(("tpu_default",), "implementation=None on TPU: 'xla' unless chosen %s; "
              "implementation='pallas_tpu' forces the kernels", TPU_DEFAULT_REASON)
  if name != "xla":
    try:
      _backend(name)
    except NotImplementedError as e:
      logging.warning("default implementation %r for platform %r is not "
                      "available (%s); using 'xla'", name, platform, e)
      name = "xla"
  return name


def resolve_implementation(implementation: str | None, op_key: str | None = None) -> str:
  """implementation, or for None the platform default; on GPU and TPU, with `op_key` (a
  shape_class), the per-class default of that platform's WINS table (module docstring)."""
  if implementation is None:
    name = default_implementation()
    platform = jax.default_backend()
    if op_key is not None:
      if platform in _GPU_PLATFORMS:
        name = _gpu_default(op_key)
      elif platform == "tpu":
        name = _measured_default(op_key, "tpu")
    return name
  _backend(implementation)  # validates the name and importability
  return implementation


# ----------------------------------------------------------------------------
# Argument checks: one place, shared by every implementation.
# ----------------------------------------------------------------------------

def _check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _check_attention_args(q, k, v) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim], "
                       f"got shape {x.shape}")
    _check_float(name, x)
    if x.shape[1] < 1:
      raise ValueError(f"{name} must have a sequence length >= 1, got shape {x.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
  if q.shape[2] != k.shape[2]:
    raise ValueError(f"q and k must have the same number of heads, got {q.shape[2]} and {k.shape[2]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")


def _expect_shape(what: str, x, shape) -> None:
  if x is None or tuple(x.shape) != tuple(shape):
    got = None if x is None else tuple(x.shape)
    raise ValueError(f"{what} must have shape {tuple(shape)}, got {got}")


def _check_block_args(direction: str, q_src, kv_src, p, num_heads: int) -> None:
  """q_src: [B, Lq, Cq] (queries' source), kv_src: [B, Lk, Ckv]."""
  qn, kvn = ("z", "x") if direction == "read" else ("x", "z")
  for name, a in ((qn, q_src), (kvn, kv_src)):
    if a.ndim != 3:
      raise ValueError(f"{direction}_block: {name} must have rank 3 [batch, seq, "
                       f"features], got shape {a.shape}")
    _check_float(name, a)
  if q_src.shape[0] != kv_src.shape[0]:
    raise ValueError(f"{direction}_block: {qn} and {kvn} must have the same batch "
                     f"size, got {q_src.shape[0]} and {kv_src.shape[0]}")
  if q_src.dtype != kv_src.dtype:
    raise TypeError(f"{direction}_block: {qn} and {kvn} must share one dtype, "
                    f"got {q_src.dtype} and {kv_src.dtype}")
  cq, ckv = q_src.shape[-1], kv_src.shape[-1]
  if p.wq.ndim != 2:
    raise ValueError(f"{direction}_block: params.wq must be a matrix, got {p.wq.shape}")
  width = p.wq.shape[1]
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"{direction}_block: num_heads={num_heads} must divide the "
                     f"attention width {width}")
  pre = f"{direction}_block: params"
  _expect_shape(f"{pre}.ln_scale", p.ln_scale, (cq,))
  _expect_shape(f"{pre}.ln_bias", p.ln_bias, (cq,))
  _expect_shape(f"{pre}.wq", p.wq, (cq, width))
  _expect_shape(f"{pre}.bq", p.bq, (width,))
  _expect_shape(f"{pre}.wk", p.wk, (ckv, width))
  _expect_shape(f"{pre}.bk", p.bk, (width,))
  _expect_shape(f"{pre}.wv", p.wv, (ckv, width))
  _expect_shape(f"{pre}.bv", p.bv, (width,))
  _expect_shape(f"{pre}.wo", p.wo, (width, cq))
  _expect_shape(f"{pre}.bo", p.bo, (cq,))
  if isinstance(p, WriteBlockParams) and p.w1 is not None:
    hidden = p.w1.shape[-1]
    _expect_shape(f"{pre}.mlp_ln_scale", p.mlp_ln_scale, (cq,))
    _expect_shape(f"{pre}.mlp_ln_bias", p.mlp_ln_bias, (cq,))
    _expect_shape(f"{pre}.w1", p.w1, (cq, hidden))
    _expect_shape(f"{pre}.b1", p.b1, (hidden,))
    _expect_shape(f"{pre}.w2", p.w2, (hidden, cq))
    _expect_shape(f"{pre}.b2", p.b2, (cq,))


# ----------------------------------------------------------------------------
# Public ops.
# ----------------------------------------------------------------------------

def cross_attention(q, k, v, *, implementation: str | None = None,
                    interpret: bool = False, block_sizes: Any = None,
                    scale: float | None = None, precision: str | None = None):
  """softmax(q k^T / sqrt(head_dim)) v.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    implementation: "xla", "pallas_tpu", "triton" or None (platform default).
    interpret: run a kernel implementation in its interpreter (CPU testing).
    block_sizes: implementation-specific tiling (None: tuned defaults).
    scale: score scale, default 1/sqrt(head_dim).
    precision: fp32 dots, None (TF32, as XLA) or "highest" (kernels/precision.py).
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  _check_attention_args(q, k, v)
  precision = _precision.check(precision)
  name = resolve_implementation(implementation, shape_class("attention", q, k))
  if name == "xla":
    return reference.cross_attention(q, k, v, scale=scale, precision=precision)
  return _backend(name).cross_attention(q, k, v, scale=scale, interpret=interpret,
                                        block_sizes=block_sizes, **_prec_kw(name, precision))


def _prec_kw(name, precision):
  # Backends without a precision switch (pallas_tpu) keep their own policy.
  return {"precision": precision} if name in ("triton", "cudnn") else {}


def read_block(z, x, params: ReadBlockParams, *, num_heads: int,
               implementation: str | None = None, interpret: bool = False,
               block_sizes: Any = None, precision: str | None = None):
  """Fused read: z + OutProj(MHA(q=QProj(LN(z)), kv=KVProj(x))).

  z: latents [B, M, D]; x: interface [B, N, T]. Returns [B, M, D] in z's dtype.
  """
  if not isinstance(params, ReadBlockParams):
    raise TypeError(f"read_block: params must be ReadBlockParams, got {type(params).__name__}")
  _check_block_args("read", z, x, params, num_heads)
  precision = _precision.check(precision)
  name = resolve_implementation(implementation, shape_class("read", z, x, params.wq,
                                                            heads=num_heads, dtype=z.dtype))
  if name == "xla":
    return reference.read_block(z, x, params, num_heads=num_heads, precision=precision)
  return _backend(name).read_block(z, x, params, num_heads=num_heads,
                                   interpret=interpret, block_sizes=block_sizes,
                                   **_prec_kw(name, precision))


def write_block(x, z, params: WriteBlockParams, *, num_heads: int,
                implementation: str | None = None, interpret: bool = False,
                block_sizes: Any = None, precision: str | None = None):
  """Fused write: y = x + OutProj(MHA(q=QProj(LN(x)), kv=KVProj(z)));
  then y + MLP(LN(y)) when params carry an MLP.

  x: interface [B, N, T]; z: latents [B, M, D]. Returns [B, N, T] in x's dtype.
  """
  if not isinstance(params, WriteBlockParams):
    raise TypeError(f"write_block: params must be WriteBlockParams, got {type(params).__name__}")
  _check_block_args("write", x, z, params, num_heads)
  precision = _precision.check(precision)
  mlp = () if params.w1 is None else (params.w1,)
  name = resolve_implementation(implementation, shape_class(
      "write", x, z, params.wq, *mlp, heads=num_heads, dtype=x.dtype))
  if name == "xla":
    return reference.write_block(x, z, params, num_heads=num_heads, precision=precision)
  return _backend(name).write_block(x, z, params, num_heads=num_heads,
                                    interpret=interpret, block_sizes=block_sizes,
                                    **_prec_kw(name, precision))


def _check_latent_args(z, p, num_heads: int) -> None:
  if z.ndim != 3:
    raise ValueError(f"latent_attention_block: z must have rank 3 [batch, latents, "
                     f"features], got shape {z.shape}")
  _check_float("z", z)
  if z.shape[1] < 1:
    raise ValueError(f"latent_attention_block: z must hold >= 1 latent, got shape {z.shape}")
  if p.wq.ndim != 2:
    raise ValueError(f"latent_attention_block: params.wq must be a matrix, got {p.wq.shape}")
  d, width = z.shape[-1], p.wq.shape[1]
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"latent_attention_block: num_heads={num_heads} must divide the "
                     f"attention width {width}")
  pre = "latent_attention_block: params"
  for name, shape in (("ln_scale", (d,)), ("ln_bias", (d,)), ("wq", (d, width)),
                      ("bq", (width,)), ("wk", (d, width)), ("bk", (width,)),
                      ("wv", (d, width)), ("bv", (width,)), ("wo", (width, d)),
                      ("bo", (d,))):
    _expect_shape(f"{pre}.{name}", getattr(p, name), shape)


def latent_attention_block(z, params: LatentAttentionParams, *, num_heads: int,
                           residual: bool = False, implementation: str | None = None,
                           interpret: bool = False, block_sizes: Any = None,
                           precision: str | None = None):
  """Fused latent self-attention: OutProj(MHA(QKVProj(LN(z)))) [+ z if residual].

  z: latents [B, M, D] (the model's residual stream, heads split inside the op).
  Returns [B, M, D] in z's dtype: the attention branch, or z plus it with `residual`.
  """
  if not isinstance(params, LatentAttentionParams):
    raise TypeError("latent_attention_block: params must be LatentAttentionParams, got "
                    f"{type(params).__name__}")
  _check_latent_args(z, params, num_heads)
  precision = _precision.check(precision)
  name = resolve_implementation(implementation, shape_class(
      "latent_attn", z, params.wq, heads=num_heads, dtype=z.dtype))
  if name == "xla":
    return reference.latent_attention_block(z, params, num_heads=num_heads,
                                            residual=residual, precision=precision)
  return _backend(name).latent_attention_block(z, params, num_heads=num_heads,
                                               residual=residual, interpret=interpret,
                                               block_sizes=block_sizes,
                                               **_prec_kw(name, precision))


def _check_mlp_args(z, p, residual, branch_scale, dropout_rate, dropout_seed) -> None:
  pre = "latent_mlp_block"
  if z.ndim != 3:
    raise ValueError(f"{pre}: z must have rank 3 [batch, latents, features], got shape "
                     f"{z.shape}")
  _check_float("z", z)
  if p.w1 is None or p.w1.ndim != 2:
    raise ValueError(f"{pre}: params.w1 must be a matrix [features, hidden], got "
                     f"{None if p.w1 is None else p.w1.shape}")
  d, hidden = z.shape[-1], p.w1.shape[1]
  for name, shape in (("ln_scale", (d,)), ("ln_bias", (d,)), ("w1", (d, hidden)),
                      ("b1", (hidden,)), ("w2", (hidden, d)), ("b2", (d,))):
    _expect_shape(f"{pre}: params.{name}", getattr(p, name), shape)
  if branch_scale is not None:
    _expect_shape(f"{pre}: branch_scale (one scale per batch element)", branch_scale,
                  (z.shape[0],))
    _check_float("branch_scale", branch_scale)
  if not isinstance(dropout_rate, (int, float)) or not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{pre}: dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
  if dropout_rate:
    if dropout_seed is None:
      raise ValueError(f"{pre}: dropout_rate={dropout_rate} needs dropout_seed (uint32[2], "
                       "e.g. jax.random.bits(key, (2,), jnp.uint32))")
    if tuple(dropout_seed.shape) != (2,) or dropout_seed.dtype != jnp.uint32:
      raise ValueError(f"{pre}: dropout_seed must be uint32[2], got "
                       f"{dropout_seed.dtype}{list(dropout_seed.shape)}")
    if math.prod(z.shape[:2]) * hidden >= 2 ** 32:
      raise ValueError(f"{pre}: the hidden activations [B, M, F] = {z.shape[:2] + (hidden,)} "
                       "hold 2^32 or more elements; dropout's 32-bit element index overflows")


def latent_mlp_block(z, params: LatentMLPParams, *, residual: bool = False,
                     branch_scale=None, dropout_rate: float = 0.0, dropout_seed=None,
                     implementation: str | None = None, interpret: bool = False,
                     block_sizes: Any = None, precision: str | None = None):
  """Fused latent MLP: [z +] s * (dropout(GELU(LN(z) W1 + b1)) W2 + b2).

  z: latents [B, M, D]; params: LatentMLPParams (hidden width F = params.w1.shape[1]).
  branch_scale: [B] per-example scale of the branch (the model's drop-path), None for 1.
  dropout_rate / dropout_seed (uint32[2]): inverted dropout on the hidden activations with
  kernels.reference.counter_hash_bits as the mask, so every implementation draws the same
  mask. Returns [B, M, D] in z's dtype: the branch, or z plus it with `residual`.
  """
  if not isinstance(params, LatentMLPParams):
    raise TypeError("latent_mlp_block: params must be LatentMLPParams, got "
                    f"{type(params).__name__}")
  _check_mlp_args(z, params, residual, branch_scale, dropout_rate, dropout_seed)
  precision = _precision.check(precision)
  name = resolve_implementation(implementation, shape_class(
      "latent_mlp", z, params.w1, dtype=z.dtype))
  kw = dict(residual=residual, branch_scale=branch_scale, dropout_rate=float(dropout_rate),
            dropout_seed=dropout_seed)
  if name == "xla":
    return reference.latent_mlp_block(z, params, precision=precision, **kw)
  return _backend(name).latent_mlp_block(z, params, interpret=interpret,
                                         block_sizes=block_sizes,
                                         **_prec_kw(name, precision), **kw)
