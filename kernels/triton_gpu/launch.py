"""Glue between JAX and the Triton kernels: one `launch` for GPU and interpreter.

GPU (`interpret=False`): `jax_triton.triton_call`. jax-triton 0.3.x spells the
output argument `out_shape=`, 0.4.x `out_type=`; both are handled here.

CPU (`interpret=True`): a `jax.pure_callback` hands the operands to torch CPU
tensors (`torch.from_numpy`, no copy; bf16 travels as int16 bits) and launches
*the same* kernel through Triton's interpreter. Triton decides interpreted vs.
compiled when `@triton.jit` runs (it reads TRITON_INTERPRET then), so we do not
rely on that environment variable: `interpreted(kernel)` builds an explicit
`InterpretedFunction` from the kernel's Python source, with its own copy of the
module globals in which every `@triton.jit` helper is interpreted too. The user
never sets an environment variable, and compiled and interpreted launches of one
kernel coexist in one process.

jax-triton has no batching rule, so every launch site is wrapped with
`vmappable`, a `jax.custom_batching.custom_vmap` whose rule folds the vmapped axis
into the kernel's leading (batch or row) axis, or falls back to `lax.map` when an
operand that cannot be folded (a weight) is batched.

`record_launches()` turns launches into shape-only stubs and records each one
(kernel, grid, operand dtypes and shapes, constexprs, warps, stages): the compile report
(bench/triton_compile_report.py) and the estimate (bench/triton_estimate.py) use it to
find every kernel variant a step needs without running anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import threading
import types
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import triton
from triton.runtime.jit import JITFunction

try:  # jax-triton is only needed for GPU launches.
  import jax_triton as jt
except ImportError:  # pragma: no cover - exercised only without jax-triton
  jt = None


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
  kernel: Any
  grid: tuple
  in_dtypes: tuple
  out_dtypes: tuple
  constexprs: tuple  # sorted (name, value)
  num_warps: int
  num_stages: int
  in_shapes: tuple = ()
  out_shapes: tuple = ()


_RECORDING: list | None = None
_INTERP_LOCK = threading.Lock()
_CACHES: list = []
_LAX_MAP_LOGGED: set = set()


def cached(fn):
  """functools.lru_cache that `clear_caches()` empties (the per-configuration units)."""
  fn = functools.lru_cache(maxsize=None)(fn)
  _CACHES.append(fn)
  return fn


def clear_caches():
  """Forgets every built unit (and jax's traces), so that the next trace launches again:
  `record_launches()` sees only launches that are traced, not ones served from a cache."""
  for fn in _CACHES:
    fn.cache_clear()
  jax.clear_caches()


@contextlib.contextmanager
def record_launches():
  """Within this context, launches return zeros and are appended to the list yielded."""
  global _RECORDING
  prev, _RECORDING = _RECORDING, []
  try:
    yield _RECORDING
  finally:
    _RECORDING = prev


# ----------------------------------------------------------------------------
# Interpreted kernels, built explicitly (no TRITON_INTERPRET needed).
# ----------------------------------------------------------------------------

def _clone(fn, globs):
  f = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, fn.__closure__)
  f.__qualname__, f.__module__ = fn.__qualname__, fn.__module__
  f.__annotations__ = dict(getattr(fn, "__annotations__", {}))
  return f


def _interpreted_globals(module_globals: dict, memo: dict) -> dict:
  """A copy of a module's globals in which every @triton.jit function is interpreted.

  A helper imported from another module is cloned over *its own* module's globals, so it
  resolves its names where it was defined."""
  from triton.runtime.interpreter import InterpretedFunction
  key = id(module_globals)
  if key in memo:
    return memo[key]
  globs = memo[key] = dict(module_globals)
  for name, val in list(globs.items()):
    if isinstance(val, JITFunction):
      home = _interpreted_globals(val.fn.__globals__, memo)
      globs[name] = InterpretedFunction(_clone(val.fn, home))
  return globs


@functools.cache
def interpreted(kernel: JITFunction):
  """An InterpretedFunction running `kernel`'s source in Triton's interpreter."""
  from triton.runtime.interpreter import InterpretedFunction
  return InterpretedFunction(_clone(kernel.fn, _interpreted_globals(kernel.fn.__globals__, {})))


_STDLIB_MODULES = ("triton.language", "triton.language.standard", "triton.language.random",
                   "triton.language.math")


@functools.cache
def _interpreted_stdlib_fn(jitfn: JITFunction):
  from triton.runtime.interpreter import InterpretedFunction
  return InterpretedFunction(jitfn.fn)


@contextlib.contextmanager
def _interpreted_stdlib():
  """Temporarily swaps the `@triton.jit` functions of triton.language (tl.zeros,
  tl.sum, tl.max, ...) for interpreted ones, as TRITON_INTERPRET=1 at import time
  would have built them. Call with _INTERP_LOCK held."""
  import sys
  saved = []
  try:
    for mod_name in _STDLIB_MODULES:
      mod = sys.modules.get(mod_name)
      if mod is None:
        continue
      for name, val in list(vars(mod).items()):
        if isinstance(val, JITFunction):
          saved.append((mod, name, val))
          setattr(mod, name, _interpreted_stdlib_fn(val))
    yield
  finally:
    for mod, name, val in reversed(saved):
      setattr(mod, name, val)
    _restore_triton_language()


def _restore_triton_language():
  """Undoes the patches Triton's interpreter (3.8) leaks into triton.language.

  A nested interpreted call (an interpreted stdlib helper such as tl.sum / tl.max) runs
  the interpreter's `_patch_lang` on its module's globals and never restores it, so after
  an interpreted launch the builtins of triton.language.core stay wrapped in lambdas that
  force the interpreter's semantic; a later `triton.compile` in the same process then
  fails, on and off, with "'ir.value' object has no attribute 'dtype'". Each wrapper keeps
  the original as its `member` default: put the originals back. Call with _INTERP_LOCK
  held (every interpreted launch does, on its way out)."""
  import triton.language as tl
  owners = [tl, tl.core, tl.math, tl.core.tensor]
  if hasattr(tl.core, "tensor_descriptor_base"):
    owners.append(tl.core.tensor_descriptor_base)
  for obj in owners:
    for name, val in list(vars(obj).items()):
      while (getattr(val, "__name__", "") == "<lambda>"
             and "member" in (getattr(val, "__kwdefaults__", None) or {})):
        val = val.__kwdefaults__["member"]
        setattr(obj, name, val)


@contextlib.contextmanager
def _exact_bf16_dot():
  """Makes the interpreter's tl.dot take bf16 operands by value. Triton's interpreter (3.8)
  holds bf16 tensors as their raw uint16 bits and its `create_dot` multiplies those bits as
  integers (a 16x32 @ 32x16 product comes out ~1e10 off); every other bf16 step it runs
  (loads, stores, casts) converts correctly. Here bf16 operands are widened to fp32 first
  (exact), then multiplied and accumulated in fp32: what a bf16 tensor-core dot computes,
  up to the order of the fp32 sums. Call with _INTERP_LOCK held; undone on exit."""
  from triton.runtime import interpreter as ti
  import triton.language as tl
  cls = ti.InterpreterBuilder
  original = cls.create_dot

  def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
      wide = lambda h: (ti.TensorHandle(
          ti._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32),
          tl.float32) if h.dtype.scalar == tl.bfloat16 else h)
      a, b = wide(a), wide(b)
    return original(self, a, b, d, input_precision, max_num_imprecise_acc)

  cls.create_dot = create_dot
  try:
    yield
  finally:
    cls.create_dot = original


def _to_torch(a: np.ndarray):
  import torch
  a = np.ascontiguousarray(a)
  if a.dtype == jnp.bfloat16:
    a = a.view(np.int16)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      return torch.from_numpy(a).view(torch.bfloat16)
  with warnings.catch_warnings():
    # jax hands read-only buffers; torch warns about those but shares them fine,
    # and the kernels never write their inputs: no copy.
    warnings.simplefilter("ignore", UserWarning)
    return torch.from_numpy(a)


def _torch_dtype(dtype):
  import torch
  return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
          np.dtype(jnp.bfloat16): torch.bfloat16, np.dtype(np.float64): torch.float64,
          np.dtype(np.int32): torch.int32}[np.dtype(dtype)]


def _from_torch(t, dtype):
  import torch
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy().astype(dtype, copy=False)


def _interpret_launch(kernel, grid, inputs, out_shapes, constexprs):
  def callback(*arrays):
    import torch
    args = [_to_torch(np.asarray(a)) for a in arrays]
    outs = [torch.zeros(s.shape, dtype=_torch_dtype(s.dtype)) for s in out_shapes]
    # All three patch triton's interpreter / triton.language, and undo it on exit.
    with _INTERP_LOCK, _interpreted_stdlib(), _exact_bf16_dot():
      interpreted(kernel)[grid](*args, *outs, **constexprs)
    return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shapes))
  return jax.pure_callback(callback, tuple(out_shapes), *inputs,
                           vmap_method="sequential")


def _gpu_launch(kernel, grid, inputs, out_shapes, constexprs, num_warps, num_stages):
  if jt is None:
    raise NotImplementedError("implementation='triton' on GPU needs the jax-triton package")
  params = inspect.signature(jt.triton_call).parameters
  out_kw = "out_type" if "out_type" in params else "out_shape"
  outs = jt.triton_call(*inputs, kernel=kernel, grid=grid, num_warps=num_warps,
                        num_stages=num_stages, **{out_kw: tuple(out_shapes)}, **constexprs)
  return tuple(outs)


def launch(kernel, grid: Sequence[int], inputs: Sequence[jax.Array],
           out_shapes: Sequence[jax.ShapeDtypeStruct], *, interpret: bool,
           num_warps: int = 4, num_stages: int = 2, **constexprs) -> tuple:
  """Runs `kernel[grid](*inputs, *outputs, **constexprs)`; returns the outputs."""
  grid = tuple(int(g) for g in grid)
  out_shapes = tuple(jax.ShapeDtypeStruct(tuple(s.shape), jnp.dtype(s.dtype)) for s in out_shapes)
  if _RECORDING is not None:
    _RECORDING.append(LaunchRecord(
        kernel, grid, tuple(jnp.dtype(x.dtype).name for x in inputs),
        tuple(s.dtype.name for s in out_shapes), tuple(sorted(constexprs.items())),
        num_warps, num_stages, tuple(tuple(x.shape) for x in inputs),
        tuple(tuple(s.shape) for s in out_shapes)))
    return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)
  if interpret:
    return _interpret_launch(kernel, grid, inputs, out_shapes, constexprs)
  return _gpu_launch(kernel, grid, inputs, out_shapes, constexprs, num_warps, num_stages)


def dummy():
  """A placeholder operand for pointer arguments a kernel variant never reads."""
  return jnp.zeros((1,), jnp.float32)


# ----------------------------------------------------------------------------
# vmap support.
# ----------------------------------------------------------------------------

def vmappable(fn: Callable, foldable: Sequence[bool]):
  """custom_vmap around `fn(*arrays) -> tuple of arrays`.

  foldable[i]: operand i's leading axis is a batch (or row) axis that may absorb
  a vmapped axis. Every output's leading axis must be such an axis too. When only
  foldable operands are batched, the vmapped axis is folded into them (unbatched
  foldable operands are broadcast); otherwise the batch is run with `lax.map`.
  """
  foldable = tuple(foldable)

  @jax.custom_batching.custom_vmap
  def wrapped(*args):
    return fn(*args)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    in_batched = list(in_batched)
    if all(f or not b for f, b in zip(foldable, in_batched)):
      folded = []
      for a, f, b in zip(args, foldable, in_batched):
        if f:
          if not b:
            a = jnp.broadcast_to(a, (axis_size,) + a.shape)
          a = a.reshape((axis_size * a.shape[1],) + a.shape[2:])
        folded.append(a)
      outs = wrapped(*folded)
      outs = tuple(o.reshape((axis_size, o.shape[0] // axis_size) + o.shape[1:]) for o in outs)
    else:
      name = getattr(fn, "func", fn).__name__
      if name not in _LAX_MAP_LOGGED:
        _LAX_MAP_LOGGED.add(name)
        logging.warning("triton: vmap over an operand that cannot fold into the kernel grid "
                        "(a weight) in %s: running the batch as a sequential lax.map", name)
      bargs = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
               for a, b in zip(args, in_batched)]
      outs = jax.lax.map(lambda xs: wrapped(*xs), tuple(bargs))
      outs = tuple(outs)
    return outs, tuple(True for _ in outs)

  return wrapped
