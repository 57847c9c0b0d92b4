"""XLA:CPU settings the command-line tools apply before JAX starts its CPU backend.

XLA:CPU's own dot emitter handles only some bf16 dot layouts quickly: the transposed
forms a backward pass makes (dX = dY W^T, dW = X^T dY) fall back to a slow loop, so a
bf16 train step ran 2x slower than float32. Routing dots through oneDNN
(`--xla_cpu_experimental_onednn_custom_call=true`) uses AMX/AVX-512 for every layout.
Measured on this 2-core Sapphire Rapids VM, CIFAR-10 config, batch 8 (one process each):
train step float32 3.43 s -> 2.57 s, bfloat16 6.47 s -> 1.76 s; the same losses to the
printed digits in float32 (bench/results/ has the model benchmark with and without).

For 16-bit compute (`compute_dtype="bfloat16"`) it also sets
`--xla_cpu_experimental_ynn_fusion_type=reduce`: jax 0.12's XLA:CPU hands most dots (and
the elementwise work around them) to YNNPACK fusions, which reached only ~160 GFLOP/s on
bf16 dots here, against oneDNN's AMX kernels; with YNN limited to reductions most dots go
to oneDNN, and reductions stay in YNNPACK (turning YNN off entirely made XLA emit ~1000
slow reduce-window loops for the bias / LayerNorm gradients). A YNN reduce fusion still
takes the dot next to a LayerNorm or softmax reduction (60 fusions, ~1.2 s of the step's
summed op time); fencing those dots off with optimization barriers moved the time to oneDNN
with no net gain, so they stay. CIFAR-10, batch 32,
bf16, one run each on this VM: default 5.91 s per train step (11.2 CPU-s), YNN off 4.55 s
(8.4 CPU-s), YNN reductions only 3.95 s (7.4 CPU-s). Not for float32, where YNNPACK's dots
are the faster path (7.94 -> 9.57 s with YNN off).

XLA reads XLA_FLAGS once, when the first computation creates the CPU backend, so
`enable_onednn_dots()` must run before that; it is a no-op (with a warning) afterwards.
Set RIN_CPU_ONEDNN=0 to keep XLA's default dots; a value the user put in XLA_FLAGS wins.
"""
from __future__ import annotations

import logging
import os

ONEDNN_FLAG_NAME = "xla_cpu_experimental_onednn_custom_call"
YNN_FUSION_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
LOW_PRECISION = ("bfloat16", "float16")
ENV_SWITCH = "RIN_CPU_ONEDNN"

log = logging.getLogger(__name__)


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 - private API moved: assume not started
    return False


def _switched_off(env_name: str) -> bool:
  """Whether the environment variable turns a setting off (0/false/no/off; unset = on)."""
  return os.environ.get(env_name, "1").strip().lower() in ("0", "false", "no", "off")


def onednn_dots_requested() -> bool:
  """Whether XLA_FLAGS (as the backend will read it) turns oneDNN dots on."""
  flags = os.environ.get("XLA_FLAGS", "")
  return f"--{ONEDNN_FLAG_NAME}=true" in flags or f"--{ONEDNN_FLAG_NAME}=1" in flags


def enable_onednn_dots(compute_dtype: str | None = None) -> bool:
  """Add the oneDNN dot flag to XLA_FLAGS unless disabled; returns whether it is on.

  compute_dtype: the model's compute dtype when known (config.train.dtype); for bfloat16 /
  float16 YNN fusions are limited to reductions too, so that every dot goes to oneDNN.
  """
  if _switched_off(ENV_SWITCH):
    return onednn_dots_requested()
  flags = os.environ.get("XLA_FLAGS", "")
  if ONEDNN_FLAG_NAME in flags:          # the user decided; respect it
    return onednn_dots_requested()
  if _backend_started():
    log.warning("rin.xla_cpu: JAX's backend already started; %s not applied",
                ONEDNN_FLAG_NAME)
    return False
  flags = f"{flags} --{ONEDNN_FLAG_NAME}=true"
  if compute_dtype is not None and str(compute_dtype) in LOW_PRECISION \
      and YNN_FUSION_FLAG_NAME not in flags:
    flags += f" --{YNN_FUSION_FLAG_NAME}=reduce"
  os.environ["XLA_FLAGS"] = flags.strip()
  return True


# ----------------------------------------------------------------------------
# Host memory: keep XLA's per-step temporaries mapped.
# ----------------------------------------------------------------------------

MALLOC_ENV_SWITCH = "RIN_CPU_KEEP_FREED_MEMORY"
# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_memory_kept = False


def _glibc():
  """The process's C library through ctypes if it is glibc (mallopt is glibc's), else None."""
  import ctypes
  import sys
  if not sys.platform.startswith("linux"):
    return None
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
      return None
    return ctypes.CDLL(None)
  except (ValueError, OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """Has glibc malloc keep freed memory for reuse instead of unmapping it; returns whether
  it is now on.

  Why: XLA:CPU allocates an executable's temporaries as one block per call (2.49 GB for
  the CIFAR-10 bf16 train step at batch 32) and frees it when the call ends. glibc serves a
  block that large with a fresh mmap and unmaps it on free, so every step faulted the
  whole block back in: ~630k minor page faults and ~1.45 s of kernel time per step
  (getrusage around each step). With mmap off (M_MMAP_MAX=0), one arena (M_ARENA_MAX=1:
  other threads' arenas would still mmap blocks above their 64 MB heap limit) and no
  trimming (M_TRIM_THRESHOLD=-1), the block is reused: the heap grows once or twice more
  in the first calls, then the steps run with 0 faults, and the step went from 3.9-4.2 s
  to 3.1-3.5 s (one process each, 12 steps; `bench/results/` has the model benchmark).

  Cost: the process keeps the heap it has grown (RSS does not fall after a large free):
  the CIFAR-10 bf16 step's peak RSS went from 4.0 to 6.4 GB.

  Call it before JAX's backend starts its threads (arena_max binds threads that have no
  arena yet); the command-line tools do, through `configure`. A no-op (False) on a C
  library other than glibc, or with RIN_CPU_KEEP_FREED_MEMORY=0.
  """
  global _memory_kept
  if _memory_kept:
    return True
  if _switched_off(MALLOC_ENV_SWITCH):
    return False
  libc = _glibc()
  if libc is None:
    return False
  ok = all(libc.mallopt(p, v) == 1 for p, v in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    log.warning("rin.xla_cpu: mallopt refused a setting; freed memory may still be unmapped")
  _memory_kept = ok
  return ok


def configure(compute_dtype: str | None = None) -> None:
  """Everything the command-line tools set before JAX starts: oneDNN dots (and YNN for
  reductions only in 16-bit compute) and `keep_freed_memory`."""
  enable_onednn_dots(compute_dtype)
  keep_freed_memory()


def freed_memory_kept() -> bool:
  """Whether `keep_freed_memory` is in effect in this process."""
  return _memory_kept
