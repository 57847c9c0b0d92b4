"""Timing helpers shared by the benchmarks.

- `time_calls`: warm-up, then many timed calls, each waited on with
  `jax.block_until_ready` (device-side completion), over a list of input sets
  that rotate so that successive calls do not find their inputs in cache.
- `rotation_count`: how many input sets are needed to exceed the last-level cache.
- `measure_ceilings`: a large matmul (TFLOP/s) and a large copy (GB/s), measured
  in the same process, so "% of roofline" compares like with like.
- `environment`: device, versions, date, load: what every result file records.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

# Last-level cache sizes by platform when the OS does not tell us (bytes).
_CACHE_FALLBACK = {"gpu": 50 << 20, "cuda": 50 << 20, "tpu": 128 << 20, "cpu": 32 << 20}


@dataclasses.dataclass
class Timing:
  """Seconds per call over `n` timed calls."""
  median: float
  q25: float
  q75: float
  min: float
  n: int
  samples: list[float]

  @property
  def iqr(self) -> float:
    return self.q75 - self.q25

  def as_dict(self) -> dict:
    return {"median_s": self.median, "iqr_s": self.iqr, "min_s": self.min,
            "q25_s": self.q25, "q75_s": self.q75, "repeats": self.n}


def summarize(samples: Sequence[float]) -> Timing:
  if not samples:
    raise ValueError("summarize: no samples")
  a = np.asarray(samples, dtype=np.float64)
  q25, med, q75 = np.percentile(a, [25, 50, 75])
  return Timing(float(med), float(q25), float(q75), float(a.min()), len(a), [float(x) for x in a])


def block(x):
  """Waits for every array in `x` (any pytree; torch tensors are passed through)."""
  import jax
  return jax.block_until_ready(x)


def time_calls(fn: Callable, arg_sets: Sequence[tuple], *, warmup: int = 2, repeats: int = 20,
               max_seconds: float | None = None, min_repeats: int = 3,
               sync: Callable[[Any], Any] = block) -> Timing:
  """Median time of `fn(*arg_sets[i % len(arg_sets)])`, completion included.

  warmup: untimed calls first (compilation, allocator warm-up).
  repeats: timed calls; stops early once `max_seconds` of timed calls have run
    (but never before `min_repeats`).
  sync: waits for the result (jax.block_until_ready; torch passes its own).
  """
  if not arg_sets:
    raise ValueError("time_calls: need at least one argument set")
  for i in range(warmup):
    sync(fn(*arg_sets[i % len(arg_sets)]))
  samples: list[float] = []
  spent = 0.0
  for i in range(repeats):
    args = arg_sets[i % len(arg_sets)]
    t0 = time.perf_counter()
    sync(fn(*args))
    dt = time.perf_counter() - t0
    samples.append(dt)
    spent += dt
    if max_seconds is not None and spent >= max_seconds and len(samples) >= min_repeats:
      break
  return summarize(samples)


def cache_bytes(platform_name: str | None = None) -> int:
  """Last-level cache size of the device (CPU: read from sysfs)."""
  platform_name = platform_name or _platform()
  if platform_name == "cpu":
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
      for idx in os.listdir(base):
        try:
          with open(os.path.join(base, idx, "size")) as f:
            s = f.read().strip()
          mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
          best = max(best, int(s.rstrip("KMG")) * mult)
        except (OSError, ValueError):
          pass
    except OSError:
      pass
    if best:
      return best
  return _CACHE_FALLBACK.get(platform_name, 64 << 20)


def rotation_count(bytes_per_set: int, *, cache: int | None = None, max_sets: int = 16,
                   max_total_bytes: int = 2 << 30) -> int:
  """Input sets needed so that one pass over them is at least 2x the cache."""
  cache = cache_bytes() if cache is None else cache
  n = math.ceil(2 * cache / max(bytes_per_set, 1))
  n = min(n, max_sets, max(1, max_total_bytes // max(bytes_per_set, 1)))
  return max(1, n)


def _platform() -> str:
  import jax
  return jax.default_backend()


def device_description() -> dict:
  import jax
  d = jax.devices()[0]
  out = {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}
  if d.platform == "cpu":
    out["cpu_model"] = _cpu_model()
    out["cpu_count"] = os.cpu_count()
  return out


def device_slug() -> str:
  """Short name for result folders: 'cpu', 'nvidia-h200', 'tpu-v5-lite', ..."""
  import jax
  d = jax.devices()[0]
  if d.platform == "cpu":
    return "cpu"
  return "".join(c if c.isalnum() else "-" for c in d.device_kind.lower()).strip("-")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


_PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax",
             "optax", "numpy", "triton", "jax-triton", "tokamax", "torch", "torchvision",
             "rin-pytorch")


def package_versions() -> dict:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def git_commit() -> str | None:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                       text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else None
  except (OSError, subprocess.SubprocessError):
    return None


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict:
  """Device, versions, date and machine load: recorded with every result."""
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": device_description(),
      "python": sys.version.split()[0],
      "packages": package_versions(),
      "git_commit": git_commit(),
      "hostname": platform.node(),
      "load_average_1_5_15": load_average(),
      "command": command_line(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def command_line() -> str | None:
  """How this process was started, as a user would retype it (`python -m bench.kernels
  --quick`, not the module's file path that `-m` leaves in sys.argv[0])."""
  if not sys.argv or not sys.argv[0]:
    return None
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = ["python", "-m", spec.name] if spec and spec.name else ["python", sys.argv[0]]
  return " ".join(head + sys.argv[1:])


# ----------------------------------------------------------------------------
# Measured ceilings.
# ----------------------------------------------------------------------------

def _ceiling_sizes(platform_name: str) -> tuple[int, int]:
  """(matmul n, copy elements) big enough to reach the peak, small enough to be quick."""
  if platform_name == "cpu":
    return 2048, 1 << 25          # 2048^3 matmul; 128 MiB fp32 copy
  return 8192, 1 << 28            # 8192^3; 1 GiB fp32 / 512 MiB bf16 copy


def measure_ceilings(dtype: str = "float32", *, repeats: int = 10,
                     max_seconds: float = 10.0) -> dict:
  """Matmul FLOP/s and copy bytes/s of this device, measured now.

  matmul: C = A @ B with n x n operands and result in `dtype` (2 n^3 FLOPs), the form
  the model's dots take; XLA accumulates low-precision dots in fp32 internally. (Asking
  for an fp32 result of bf16 operands is a different, slower oneDNN path on CPU:
  212 vs 1085 GFLOP/s here.)
  copy: y = x + 1 over a large array (reads and writes every element once).
  """
  import jax
  import jax.numpy as jnp
  plat = _platform()
  n, elems = _ceiling_sizes(plat)
  dt = jnp.dtype(dtype)
  key = jax.random.PRNGKey(0)
  ka, kb = jax.random.split(key)
  sets = [(jax.random.normal(jax.random.fold_in(ka, i), (n, n), dt),
           jax.random.normal(jax.random.fold_in(kb, i), (n, n), dt)) for i in range(2)]
  mm = jax.jit(lambda a, b: jnp.matmul(a, b))
  t_mm = time_calls(mm, sets, warmup=2, repeats=repeats, max_seconds=max_seconds)
  del sets
  x = [(jnp.ones((elems,), dt),)]
  cp = jax.jit(lambda v: v + jnp.asarray(1, dt))
  t_cp = time_calls(cp, x, warmup=2, repeats=repeats, max_seconds=max_seconds)
  copy_bytes = 2 * elems * dt.itemsize
  return {
      "dtype": str(dt),
      "matmul_n": n,
      "matmul_flops_per_s": 2 * n ** 3 / t_mm.median,
      "matmul_timing": t_mm.as_dict(),
      "copy_bytes": copy_bytes,
      "copy_bytes_per_s": copy_bytes / t_cp.median,
      "copy_timing": t_cp.as_dict(),
      "load_average_1_5_15": load_average(),
  }


def roofline_fraction(flops: float, nbytes: float, seconds: float, ceiling: dict) -> float:
  """max(FLOPs/peak, bytes/bandwidth) / measured time, from measured ceilings."""
  ideal = max(flops / ceiling["matmul_flops_per_s"], nbytes / ceiling["copy_bytes_per_s"])
  return ideal / seconds
