"""Static GPU cost table of the RIN train step and sampling forward, without a GPU.

    pip install -e .[gpu-static]      # jax's CUDA 13 plugin: XLA's GPU compiler, deviceless
    python -m bench.gpu_static --targets h100,h200 --tag today

The GPU twin of bench.tpu_static: the same steps (bench/static_common.py step_fn: value_and
_grad of the train loss, or one sampling forward, of a published config in bf16) and the
same op-group attribution of the compiled HLO, here compiled by the real XLA:GPU compiler
for an H100 / H200 target on a CPU-only machine (DESIGN.md section 5, "GPU without a GPU":
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1, CUDA_VISIBLE_DEVICES=-1, a GpuTargetConfig text proto,
`jax.experimental.topologies.get_topology_desc(platform="cuda", ...)`).

What is exact: the optimized HLO (every kernel the step launches: XLA fusions, XLA's Triton
GEMM and softmax fusions, cuBLAS calls, cuDNN calls, jax-triton calls) and
`compiled.memory_analysis()` (the compiler's buffer assignment: argument, output and temp
bytes). What is an ESTIMATE (never a measurement on hardware): the time. Per kernel:

    t = max(dot FLOPs / PEAK_FLOPS, (operand + result bytes) / HBM_BPS) + LAUNCH_S

* dot FLOPs: 2 x result elements x contracted elements of every dot in the kernel (a
  fusion's body, recursively); a cuBLAS call by its dot dimensions; a cuDNN attention call
  4 B H Sq Sk D forward, 2.5x that backward (S recomputed, dP, dV, dQ, dK); a jax-triton
  call as the kernel executes it, from the launch's shapes and constexprs, recorded while
  the step is traced (bench.triton_estimate.launch_cost: head dim padded, the backward's
  recomputed scores included). Elementwise and transcendental work is not counted (CUDA
  cores; these kernels are memory-bound).
* bytes: every operand read once and every result written once (each at its full HLO
  shape: L2 reuse is free, a fusion that reads a slice of an operand is charged the whole
  operand, an in-place update its whole buffer).
* PEAK_FLOPS, HBM_BPS (TARGETS): the ceilings measured on the lent H200 (DESIGN.md: ~790
  TFLOP/s bf16 dense matmul = 80% of the 989 TFLOP/s data-sheet peak, ~4.3 TB/s device copy
  = 90% of the 4.8 TB/s data sheet); the H100 SXM has the same SMs and clock (790 TFLOP/s)
  and 3.35 TB/s on its data sheet, taken at the same 90%: 3.0 TB/s.
* LAUNCH_S = 2 us per kernel: the step replayed as one CUDA graph (no host launch gaps);
  kernels are serial (no overlap of one kernel's tail with the next).
* Not seen deviceless: autotuning. XLA's GEMM fusions keep their default Triton tiles
  (listed per step: small tiles, 1 stage, no TMA, split-K where XLA guesses it), which
  this model still charges at the tensor-core ceiling. `--xla-flags
  --xla_gpu_enable_triton_gemm=false` compiles GEMMs to cuBLASLt calls instead; autotune
  results dumped on a GPU (bench/gpu_suite.sh: --xla_gpu_dump_autotune_results_to) load
  with `--autotune-from FILE`.

Per step and implementation (xla, cudnn, triton; kernels/api.py): the kernels of each op
group (read, write, latent attention, latent MLP, io, other; fwd / bwd by "transpose(" in
the op_name), their bytes, FLOPs and roofline time, the largest kernels per group and
kind, the GEMM tile configs XLA chose, memory_analysis. Results:
bench/results/gpu_static/<tag>.json and .md. `--write-wins` puts each kernel-backed op
class's per-implementation train-step time into kernels/gpu_cost_table.py (WINS, the GPU
default's estimate until a GPU measurement in kernels/triton_gpu/autotune_table.py
overrides it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib

from bench.static_common import (CLASS_GROUPS, GROUP_DOC, MODES, OP_GROUPS, _recording_op_classes,
                                 _short_op_name, attribute, hlo_computations, rewrite_wins,
                                 step_fn)

LABEL = ("ESTIMATES: per-kernel roofline over the kernels XLA:GPU compiles deviceless (no "
         "autotuning, default GEMM tiles), not measurements; memory_analysis figures are "
         "the compiler's exact buffer sizes")
CONFIGS = ("cifar10", "imagenet64_p4")
BATCH = {"cifar10": 256, "imagenet64_p4": 128, "imagenet64_p8": 128, "tiny": 4}
IMPLEMENTATIONS = ("xla", "cudnn", "triton")
LAUNCH_S = 2e-6
# The CI rung's compile flags: GEMMs as cuBLASLt calls (no Triton GEMM codegen) and LLVM's
# expensive passes off cut the tiny compile's CPU time by about a third; the paths under
# test (jax-triton, cuDNN, XLA's attention fusions) compile as in the full tables.
CI_FLAGS = "--xla_gpu_enable_triton_gemm=false --xla_llvm_disable_expensive_passes=true"

_DEVICE = ("block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
           "core_count: 132 cuda_compute_capability {{ major: 9 minor: 0 }} "
           "threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048 "
           "registers_per_core_limit: 65536 registers_per_block_limit: 65536 "
           "fpus_per_core: 128 shared_memory_per_block: 49152 "
           "shared_memory_per_block_optin: 232448 shared_memory_per_core: 233472 "
           "clock_rate_ghz: 1.98 memory_bandwidth: {bw} l2_cache_size: {l2} "
           "device_memory_size: {mem}")


def target_config(bw: int, l2: int, mem: int, name: str) -> str:
  """A GpuTargetConfig text proto of a Hopper SXM part (DESIGN.md section 5)."""
  return (f"gpu_device_info {{ {_DEVICE.format(bw=bw, l2=l2, mem=mem)} }} "
          'platform_name: "CUDA" dnn_version_info { major: 9 minor: 24 } '
          f'runtime_version {{ major: 13 }} device_description_str: "{name}"')


# name: target proto, ceilings used by the roofline (module docstring).
TARGETS = {
    "h100": dict(proto=target_config(3352320000000, 52428800, 84929347584,
                                     "NVIDIA H100 80GB HBM3"),
                 peak_flops=790e12, hbm_bps=3.0e12,
                 why="H100 SXM: 790 TFLOP/s bf16 (the H200's measured, same SMs and clock), "
                     "3.0 TB/s (90% of the 3.35 TB/s data sheet, as measured on the H200)"),
    "h200": dict(proto=target_config(4800000000000, 62914560, 150754820096,
                                     "NVIDIA H200"),
                 peak_flops=790e12, hbm_bps=4.3e12,
                 why="H200: 790 TFLOP/s bf16 and 4.3 TB/s, both measured on the lent H200"),
}

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_SHAPE = re.compile(r"([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# Ops that launch nothing: views, tuples, parameters.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
         "add-dependency", "opt-barrier", "partition-id", "replica-id"}


def arrays(shape: str):
  """[(dtype, dims)] of an HLO shape string (a tuple gives each element)."""
  return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _SHAPE.findall(shape)]


def nbytes(shape: str) -> int:
  return sum(_BYTES.get(dt, 0) * math.prod(dims) for dt, dims in arrays(shape))


def _dims(line: str, key: str):
  m = re.search(key + r"=\{([\d,]*)\}", line)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _json_dims(cfg: str, key: str):
  m = re.search(r'"' + key + r'":\[([^\]]*)\]', cfg)
  return [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []


def dot_flops(comps, comp: str, memo: dict) -> float:
  """Dot FLOPs of one computation and everything it calls (fusion bodies, nested GEMMs)."""
  if comp in memo:
    return memo[comp]
  memo[comp] = 0.0
  recs = comps.get(comp, [])
  shapes = {r["name"]: r["shape"] for r in recs}
  total = 0.0
  for r in recs:
    if r["opcode"] == "dot" and r["operands"]:
      lhs = arrays(shapes.get(r["operands"][0], ""))
      out = arrays(r["shape"])
      if lhs and out:
        k = math.prod(lhs[0][1][d] for d in _dims(r["line"], "lhs_contracting_dims"))
        total += 2.0 * math.prod(out[0][1]) * k
    elif r["opcode"] == "convolution" and len(r["operands"]) > 1:
      rhs = arrays(shapes.get(r["operands"][1], ""))
      out = arrays(r["shape"])
      if rhs and out:      # 2 x outputs x (kernel elements / output features)
        feat = max(1, out[0][1][-1])
        total += 2.0 * math.prod(out[0][1]) * math.prod(rhs[0][1]) / feat
    for c in r["calls"]:
      total += dot_flops(comps, c, memo)
  memo[comp] = total
  return total


def _unescape(s: str) -> bytes:
  """HLO text's C escapes (\\XX hex, \\n, \\", \\\\) back to bytes."""
  out, i = bytearray(), 0
  esc = {"n": b"\n", "t": b"\t", '"': b'"', "\\": b"\\", "'": b"'"}
  while i < len(s):
    if s[i] == "\\" and i + 1 < len(s):
      if s[i + 1] in esc:
        out += esc[s[i + 1]]
        i += 2
        continue
      out.append(int(s[i + 1:i + 3], 16))
      i += 3
      continue
    out += s[i].encode()
    i += 1
  return bytes(out)


def triton_call_info(line: str):
  """(kernel name, uses wgmma) of a jax-triton call, from its zlib-compressed opaque
  backend config (the kernel's name and its PTX)."""
  m = re.search(r'opaque = "((?:[^"\\]|\\.)*)"', line)
  if not m:
    return "?", None
  try:
    blob = zlib.decompress(_unescape(m.group(1)))
  except zlib.error:
    return "?", None
  name = re.search(rb"[A-Za-z_]\w*", blob[:200])
  return (name.group(0).decode() if name else "?"), b"wgmma.mma_async" in blob


def cudnn_flops(line: str, shapes) -> float:
  """FLOPs of a cuDNN fused-attention call from its bmm1 dot dimensions and q, k shapes."""
  if not shapes or len(shapes) < 2:
    return 0.0
  q, k = shapes[0], shapes[1]
  batch = _json_dims(line, "lhs_batch_dimensions") or [0, 1]
  contract = _json_dims(line, "lhs_contracting_dimensions") or [len(q) - 1]
  bh = math.prod(q[d] for d in batch)
  d = math.prod(q[c] for c in contract)
  sq = math.prod(q) // max(1, bh * d)
  sk = math.prod(k) // max(1, bh * d)
  fwd = 4.0 * bh * sq * sk * d
  return fwd * (2.5 if "Backward" in line else 1.0)


def cublas_flops(line: str, shapes, out_shape: str) -> float:
  lhs = shapes[0] if shapes else None
  out = arrays(out_shape)
  if not lhs or not out:
    return 0.0
  k = math.prod(lhs[d] for d in _json_dims(line, "lhs_contracting_dimensions"))
  return 2.0 * math.prod(out[0][1]) * k


def kernel_kind(r, fusion_kind: str | None, has_dot: bool) -> str:
  t = r["target"] or ""
  if r["opcode"] == "custom-call":
    if t.startswith("__cublas"):
      return "cublas_gemm"
    if t.startswith("__cudnn"):
      return "cudnn"
    if "triton" in t:
      return "jax_triton"
    return "custom_call:" + t
  if r["opcode"] == "fusion":
    if fusion_kind == "__triton_nested_gemm_fusion" or (fusion_kind or "").endswith("gemm_fusion"):
      return "xla_triton_gemm"
    if fusion_kind == "__triton":
      return "xla_triton_fusion"
    if fusion_kind and "cudnn" in fusion_kind:
      return "cudnn"
    if has_dot:
      return "fusion_with_dot"
    return "fusion"
  return r["opcode"]


def analyse(text: str, ceil: dict, triton_records=()):
  """Every kernel of a compiled step (ENTRY ops that launch something), attributed and
  costed: list of dicts (name, kind, group, direction, flops, bytes, seconds, ...)."""
  from bench.triton_estimate import launch_cost
  entry, comps = hlo_computations(text, keep_line=True)
  recs = attribute(comps[entry])
  shapes = {r["name"]: r["shape"] for r in recs}
  memo, out = {}, []
  for r in recs:
    if r["opcode"] in _FREE:
      continue
    line = r["line"]
    in_shapes = [arrays(shapes.get(a, "")) for a in r["operands"]]
    in_dims = [a[0][1] for a in in_shapes if a]
    nb = sum(nbytes(shapes.get(a, "")) for a in r["operands"]) + nbytes(r["shape"])
    fk = re.search(r'"fusion_backend_config":\{"kind":"([^"]*)"', line)
    fk = fk.group(1) if fk else None
    flops = sum(dot_flops(comps, c, memo) for c in r["calls"])
    kind = kernel_kind(r, fk, flops > 0)
    extra = {}
    if kind == "cudnn" and r["opcode"] == "custom-call":
      flops = cudnn_flops(line, in_dims)
    elif kind == "cublas_gemm":
      flops = cublas_flops(line, in_dims, r["shape"])
    elif kind == "jax_triton":
      name, wgmma = triton_call_info(line)
      ins = tuple(tuple(d) for d in in_dims)
      outs = tuple(tuple(d) for _, d in arrays(r["shape"]))
      match = [t for t in triton_records if t.kernel.__name__ == name
               and tuple(t.in_shapes) == ins and tuple(t.out_shapes) == outs]
      flops = launch_cost(match[0]).flops if match else 0.0
      extra = dict(kernel=name, wgmma=wgmma, launch_matched=bool(match))
    elif kind == "xla_triton_gemm":
      tiles = re.search(r'"output_tiles":\[\{"sizes":\[([^\]]*)\]', line)
      warps = re.search(r'"num_warps":"(\d+)"', line)
      stages = re.search(r'"num_stages":(\d+)', line)
      extra = dict(tile="x".join(re.findall(r"\d+", tiles.group(1))) if tiles else "?",
                   warps=int(warps.group(1)) if warps else None,
                   stages=int(stages.group(1)) if stages else None)
    t_flop, t_mem = flops / ceil["peak_flops"], nb / ceil["hbm_bps"]
    out.append(dict(name=r["name"], opcode=r["opcode"], kind=kind, group=r["group"],
                    direction=r["direction"], op_name=_short_op_name(r["op_name"]),
                    inherited=bool(r.get("inherited")), shape=r["shape"][:120],
                    flops=flops, bytes=nb, seconds=max(t_flop, t_mem) + LAUNCH_S,
                    bound="flops" if t_flop >= t_mem else "bytes", **extra))
  return out


def summarise(kernels, top=6):
  """Per op group and overall: kernel count, bytes, FLOPs, roofline seconds (fwd/bwd), per
  kind, and the largest kernels."""
  def empty():
    return dict(kernels=0, bytes=0.0, flops=0.0, seconds=0.0, fwd_seconds=0.0,
                bwd_seconds=0.0, kinds={}, top=[])
  groups = {g: empty() for g in OP_GROUPS}
  total = empty()
  for k in kernels:
    # Per group the kinds are split by direction and name the jax-triton kernel.
    what = k["kind"] + (f":{k['kernel']}" if k["kind"] == "jax_triton" else "")
    for agg, kind in ((groups[k["group"]], f"{k['direction']} {what}"), (total, k["kind"])):
      agg["kernels"] += 1
      agg["bytes"] += k["bytes"]
      agg["flops"] += k["flops"]
      agg["seconds"] += k["seconds"]
      agg[f"{k['direction']}_seconds"] += k["seconds"]
      kd = agg["kinds"].setdefault(kind, dict(kernels=0, seconds=0.0, bytes=0.0, flops=0.0))
      kd["kernels"] += 1
      kd["seconds"] += k["seconds"]
      kd["bytes"] += k["bytes"]
      kd["flops"] += k["flops"]
    if k["kind"] in ("fusion", "xla_triton_fusion"):
      # The glue: XLA's non-GEMM fusions by the jax op they carry (its name's last part).
      leaf = f"{k['direction']} {k['op_name'].rsplit('/', 1)[-1] or '(unnamed)'}"
      lf = groups[k["group"]].setdefault("glue", {}).setdefault(leaf, [0, 0.0, 0.0])
      lf[0] += 1
      lf[1] += k["seconds"]
      lf[2] += k["bytes"]
  for g in groups:
    mine = sorted((k for k in kernels if k["group"] == g), key=lambda k: -k["seconds"])
    groups[g]["top"] = mine[:top]
  return groups, total


def gemm_tiles(kernels):
  """{tile/warps/stages: [count, seconds]} of XLA's Triton GEMM fusions (default configs)."""
  out = {}
  for k in kernels:
    if k["kind"] == "xla_triton_gemm":
      key = f"{k.get('tile')} w{k.get('warps')} s{k.get('stages')}"
      c = out.setdefault(key, [0, 0.0])
      c[0] += 1
      c[1] += k["seconds"]
  return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


# ----------------------------------------------------------------------------
# Worker: one step compiled in a fresh process (XLA_FLAGS and the plugin's environment are
# read once per process).
# ----------------------------------------------------------------------------

def gpu_env(xla_flags: str = "") -> dict:
  env = dict(os.environ)
  env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"   # else the plugin's cuInit fails, unregistered
  env["CUDA_VISIBLE_DEVICES"] = "-1"             # deviceless: the GPU is a compile target
  env["JAX_PLATFORMS"] = ""                      # let the cuda plugin register beside cpu
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  if os.path.isdir(plugin_dir()):
    env["PYTHONPATH"] = os.pathsep.join(p for p in (plugin_dir(), env.get("PYTHONPATH"))
                                        if p)
  return env


def placed(target: str):
  """(topology, sds) of a deviceless single-GPU target; sds(shape, dtype) places on it."""
  import jax
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target]["proto"],
                                      topology="1x1x1")
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  return topo, (lambda shape, dt: jax.ShapeDtypeStruct(tuple(shape), dt, sharding=sharding))


class _recording_triton_launches:
  """Context: the jax-triton launches traced inside, as launch.LaunchRecord (the launches
  still happen: the compiled step is the real one)."""

  def __enter__(self):
    self.records = []
    try:
      from kernels.triton_gpu import launch as L
    except ImportError:
      self.mod = None
      return self.records
    self.mod, self.orig = L, L._gpu_launch

    def rec(kernel, grid, inputs, out_shapes, constexprs, num_warps, num_stages):
      import jax.numpy as jnp
      self.records.append(L.LaunchRecord(
          kernel, tuple(grid), tuple(jnp.dtype(x.dtype).name for x in inputs),
          tuple(jnp.dtype(s.dtype).name for s in out_shapes), tuple(sorted(constexprs.items())),
          num_warps, num_stages, tuple(tuple(x.shape) for x in inputs),
          tuple(tuple(s.shape) for s in out_shapes)))
      return self.orig(kernel, grid, inputs, out_shapes, constexprs, num_warps, num_stages)

    L._gpu_launch = rec
    return self.records

  def __exit__(self, *exc):
    if self.mod is not None:
      self.mod._gpu_launch = self.orig


def compile_step(target, cfg, mode, impl, batch, hlo_path=None):
  """One deviceless compile: (kernel records, memory_analysis dict, op classes, seconds)."""
  import jax
  topo, sds = placed(target)
  t0 = time.time()
  fn, args = step_fn(cfg, impl, mode, batch, sds)   # eager parameter shapes: on the CPU
  # Lowered with the target as default device: jax-triton asks it for the compute capability.
  with jax.default_device(topo.devices[0]):
    with _recording_op_classes() as classes, _recording_triton_launches() as launches:
      lowered = jax.jit(fn).lower(*args)
    t_lower = time.time() - t0
    compiled = lowered.compile()
  text = compiled.as_text()
  if hlo_path:
    import gzip
    with gzip.open(hlo_path, "wt") as f:
      f.write(text)
  ma = compiled.memory_analysis()
  mem = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes", "temp_size_in_bytes")}
  classes = {g: sorted(v) for g, v in classes.items()}
  times = dict(lower_s=round(t_lower, 1), compile_s=round(time.time() - t0 - t_lower, 1))
  if hlo_path:   # what --reanalyse needs besides the HLO
    json.dump(dict(memory=mem, op_classes=classes, times=times,
                   launches=[_launch_json(r) for r in launches]),
              open(hlo_path + ".side.json", "w"))
  return analyse(text, TARGETS[target], launches), mem, classes, times


def _launch_json(r) -> dict:
  return dict(kernel=r.kernel.__name__, grid=list(r.grid), in_dtypes=list(r.in_dtypes),
              out_dtypes=list(r.out_dtypes), constexprs=[list(c) for c in r.constexprs],
              num_warps=r.num_warps, num_stages=r.num_stages,
              in_shapes=[list(x) for x in r.in_shapes], out_shapes=[list(x) for x in r.out_shapes])


def _launch_from_json(d):
  """A LaunchRecord-like object (what triton_estimate.launch_cost reads) from _launch_json."""
  import types
  return types.SimpleNamespace(
      kernel=types.SimpleNamespace(__name__=d["kernel"]), grid=tuple(d["grid"]),
      in_dtypes=tuple(d["in_dtypes"]), out_dtypes=tuple(d["out_dtypes"]),
      constexprs=tuple(tuple(c) for c in d["constexprs"]), num_warps=d["num_warps"],
      num_stages=d["num_stages"], in_shapes=tuple(tuple(x) for x in d["in_shapes"]),
      out_shapes=tuple(tuple(x) for x in d["out_shapes"]))


def worker(args) -> dict:
  target, cfg, mode, impl = args.target, args.configs[0], args.modes[0], args.impls[0]
  batch = args.batch or BATCH[cfg]
  kernels, mem, classes, times = compile_step(target, cfg, mode, impl, batch, args.hlo_path)
  return step_row(target, cfg, mode, impl, batch, kernels, mem, classes, times)


def reanalyse(hlo_path: str, target: str, cfg: str, mode: str, impl: str, batch: int) -> dict:
  """A step row from a kept HLO (--hlo-dir) and its side file, without compiling again."""
  import gzip
  side = json.load(open(hlo_path + ".side.json"))
  with gzip.open(hlo_path, "rt") as f:
    text = f.read()
  kernels = analyse(text, TARGETS[target], [_launch_from_json(d) for d in side["launches"]])
  return step_row(target, cfg, mode, impl, batch, kernels, side["memory"], side["op_classes"],
                  side["times"])


def step_row(target, cfg, mode, impl, batch, kernels, mem, classes, times) -> dict:
  import jax
  groups, total = summarise(kernels)
  ceil = TARGETS[target]
  total["flop_bound_seconds"] = total["flops"] / ceil["peak_flops"]
  total["byte_bound_seconds"] = total["bytes"] / ceil["hbm_bps"]
  triton = [k for k in kernels if k["kind"] == "jax_triton"]
  return dict(target=target, config=cfg, mode=mode, impl=impl, batch=batch,
              jax=jax.__version__, memory=mem, groups=groups, total=total,
              gemm_tiles=gemm_tiles(kernels), op_classes=classes, **times,
              jax_triton=dict(calls=len(triton), wgmma=sum(1 for k in triton if k["wgmma"]),
                              unmatched=sum(1 for k in triton if not k["launch_matched"])))


def plugin_dir() -> str:
  """Where scripts/setup.sh installs jax's CUDA plugin for the deviceless compiles: a folder
  of its own beside the venv's site-packages, on PYTHONPATH only in gpu_env()'s processes.
  In site-packages the plugin would register in every jax process and, on a machine
  without a GPU, print a cuInit traceback at each start (the main job, every test)."""
  return os.environ.get("RIN_XLA_GPU_PLUGIN_DIR", os.path.join(sys.prefix, "xla_gpu_plugin"))


def plugin_available() -> bool:
  """Whether jax's CUDA plugin (XLA:GPU) is installed: in plugin_dir() (scripts/setup.sh)
  or importable here (pip install -e .[gpu-static])."""
  import importlib.util
  if os.path.isdir(os.path.join(plugin_dir(), "jax_plugins", "xla_cuda13")):
    return True
  for m in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(m) is not None:
        return True
    except ImportError:        # no jax_plugins package at all
      pass
  return False


def ops_check(target: str = "h100", impls=IMPLEMENTATIONS, b=2, m=16, n=256, d=64, t=32,
              heads=2) -> dict:
  """Tiny-shape deviceless compile of the kernel-backed ops (read, write with MLP, latent
  attention; forward + backward, bf16) per implementation: {impl: {"kinds": {kind: count},
  "targets": {custom-call target: count}, "triton_kernels": sorted names, "unmatched":
  jax-triton calls without a recorded launch, "wgmma": calls whose PTX has wgmma, "temp":
  temp bytes}}. n > 128 interface tokens: the read's backward takes the three-kernel path,
  the write's and latent attention's (16 latent keys) the one-pass one. Call in a process
  with gpu_env() (CI: tests/bench/test_gpu_static.py)."""
  import collections
  import jax
  import jax.numpy as jnp
  import kernels
  from kernels.params import LatentAttentionParams, ReadBlockParams, WriteBlockParams
  topo, sds = placed(target)
  bf, f32 = jnp.bfloat16, jnp.float32
  w = lambda i, o: sds((i, o), bf)
  v = lambda c: sds((c,), f32)
  a = d                                        # attention width: heads x head_dim 32
  rp = ReadBlockParams(v(d), v(d), w(d, a), v(a), w(t, a), v(a), w(t, a), v(a), w(a, d), v(d))
  wp = WriteBlockParams(v(t), v(t), w(t, a), v(a), w(d, a), v(a), w(d, a), v(a), w(a, t), v(t),
                        v(t), v(t), w(t, 4 * t), v(4 * t), w(4 * t, t), v(t))
  lp = LatentAttentionParams(v(d), v(d), w(d, a), v(a), w(d, a), v(a), w(d, a), v(a),
                             w(a, d), v(d))
  z, x = sds((b, m, d), bf), sds((b, n, t), bf)
  out = {}
  for impl in impls:
    def loss(z, x, rp, wp, lp, impl=impl):
      kw = dict(num_heads=heads, implementation=impl)
      z1 = kernels.read_block(z, x, rp, **kw)
      z2 = kernels.latent_attention_block(z1, lp, residual=True, **kw)
      x1 = kernels.write_block(x, z2, wp, **kw)
      return x1.astype(f32).sum() + z2.astype(f32).sum()
    fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    with jax.default_device(topo.devices[0]), _recording_triton_launches() as launches:
      compiled = jax.jit(fn).lower(z, x, rp, wp, lp).compile()
    ks = analyse(compiled.as_text(), TARGETS[target], launches)
    tr = [k for k in ks if k["kind"] == "jax_triton"]
    hlo_targets = collections.Counter(
        r["target"] for r in hlo_computations(compiled.as_text())[1].get(
            hlo_computations(compiled.as_text())[0], []) if r["target"])
    out[impl] = dict(kinds=dict(collections.Counter(k["kind"] for k in ks)),
                     targets=dict(hlo_targets),
                     triton_kernels=sorted({k["kernel"] for k in tr}),
                     unmatched=sum(1 for k in tr if not k["launch_matched"]),
                     wgmma=sum(1 for k in tr if k["wgmma"]),
                     temp=int(compiled.memory_analysis().temp_size_in_bytes),
                     flops=sum(k["flops"] for k in ks))
  return out


# ----------------------------------------------------------------------------
# Parent: workers, JSON + markdown.
# ----------------------------------------------------------------------------

def run_all(args) -> list:
  rows = []
  for target in args.targets:
    for cfg in args.configs:
      for mode in args.modes:
        for impl in args.impls:
          with tempfile.TemporaryDirectory() as tmp:
            outf = os.path.join(tmp, "row.json")
            cmd = [sys.executable, "-m", "bench.gpu_static", "--_worker", "--_out", outf,
                   "--targets", target, "--configs", cfg, "--modes", mode, "--impls", impl,
                   "--batch", str(args.batch or 0)]
            if args.hlo_dir:
              os.makedirs(args.hlo_dir, exist_ok=True)
              cmd += ["--_hlo", os.path.join(args.hlo_dir,
                                             f"{target}_{cfg}_{mode}_{impl}.hlo.txt.gz")]
            t0 = time.time()
            if args.reanalyse:
              src = args.hlo_from or target
              hlo = os.path.join(args.reanalyse, f"{src}_{cfg}_{mode}_{impl}.hlo.txt.gz")
              if not os.path.exists(hlo + ".side.json"):
                print(f"[{target}] {cfg} {mode} {impl}: no kept HLO in {args.reanalyse}",
                      file=sys.stderr, flush=True)
                continue
              row = reanalyse(hlo, target, cfg, mode, impl, args.batch or BATCH[cfg])
              rows.append(dict(row, hlo_target=src))
              continue
            r = subprocess.run(cmd, env=gpu_env(args.flags))
            if r.returncode:
              print(f"[{target}] {cfg} {mode} {impl}: worker failed (exit {r.returncode})",
                    file=sys.stderr, flush=True)
              rows.append(dict(target=target, config=cfg, mode=mode, impl=impl,
                               error=f"worker exit {r.returncode}"))
              continue
            row = json.load(open(outf))
          print(f"[{target}] {cfg} {mode} {impl}: {row['total']['kernels']} kernels, "
                f"{row['total']['seconds'] * 1e3:.2f} ms est., temp "
                f"{row['memory']['temp_size_in_bytes'] / 1e9:.2f} GB ({time.time() - t0:.0f} s)",
                file=sys.stderr, flush=True)
          rows.append(row)
  return rows


def _ms(s):
  return f"{s * 1e3:.2f}"


def markdown(result) -> str:
  out = [f"# GPU static cost table: {result['tag']}", "",
         f"**{LABEL}.** jax {result['jax']} with jax-cuda13-plugin {result['plugin']}, bf16, "
         f"deviceless XLA:GPU compile. Command: `{result['command']}`"
         + (f"; XLA_FLAGS `{result['xla_flags']}`" if result["xla_flags"] else "") + ".", "",
         "Model (bench/gpu_static.py docstring): per kernel max(dot FLOPs / peak, (operand + "
         "result bytes) / HBM bandwidth) + 2 us launch (one CUDA graph), kernels serial. "
         "Ceilings: " + "; ".join(TARGETS[t]["why"] for t in result["targets"]) + ". "
         "Not seen deviceless: autotuning (XLA's GEMM fusions keep default tiles, listed "
         "below, yet are charged at the tensor-core ceiling here). Temp and total buffer "
         "sizes are the compiler's exact memory_analysis.", "",
         "Groups: " + "; ".join(f"{k}: {v}" for k, v in GROUP_DOC.items()) + ".", ""]
  ok = [r for r in result["rows"] if "error" not in r]
  for r in result["rows"]:
    if "error" in r:
      out.append(f"- {r['target']} {r['config']} {r['mode']} {r['impl']}: {r['error']}")
  by = {(r["target"], r["config"], r["mode"], r["impl"]): r for r in ok}
  keys = sorted({(r["target"], r["config"], r["mode"]) for r in ok},
                key=lambda k: (result["targets"].index(k[0]), k[1], MODES.index(k[2])))
  impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in ok)]
  out += ["## Whole steps", "",
          "| target | config | mode | impl | kernels | est. ms | / xla | FLOP-bound ms | GB "
          "moved | TFLOP | temp GB | arg+out+temp GB | compile s |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for key in keys:
    x = by.get(key + ("xla",))
    for impl in impls:
      r = by.get(key + (impl,))
      if not r:
        continue
      t, m = r["total"], r["memory"]
      ratio = f"{t['seconds'] / x['total']['seconds']:.2f}x" if x else "-"
      tot = (m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
             - m["alias_size_in_bytes"])
      tgt = key[0] if r.get("hlo_target", key[0]) == key[0] else f"{key[0]} (HLO of {r['hlo_target']})"
      out.append(f"| {tgt} | {key[1]} | {key[2]} | {impl} | {t['kernels']} | "
                 f"{_ms(t['seconds'])} | {ratio} | {_ms(t['flop_bound_seconds'])} | "
                 f"{t['bytes'] / 1e9:.1f} | {t['flops'] / 1e12:.2f} | "
                 f"{m['temp_size_in_bytes'] / 1e9:.2f} | {tot / 1e9:.2f} | "
                 f"{r['compile_s']:.0f} |")
  out.append("")
  for key in keys:
    rows = [(i, by[key + (i,)]) for i in impls if key + (i,) in by]
    out += [f"## {key[0]} {key[1]} {key[2]}: per op group (est. ms per step; kernels)", "",
            "| group | " + " | ".join(f"{i} ms (fwd + bwd) | {i} kernels" for i, _ in rows)
            + " |", "|---|" + "---:|---:|" * len(rows)]
    for g in OP_GROUPS:
      cells = []
      for _, r in rows:
        a = r["groups"][g]
        cells.append(f"{_ms(a['seconds'])} ({_ms(a['fwd_seconds'])} + {_ms(a['bwd_seconds'])})"
                     f" | {a['kernels']}")
      out.append(f"| {g} | " + " | ".join(cells) + " |")
    out.append("| all | " + " | ".join(f"{_ms(r['total']['seconds'])} | {r['total']['kernels']}"
                                       for _, r in rows) + " |")
    out += ["", "By kernel kind (ms, kernels): " + "; ".join(
        f"{i}: " + ", ".join(f"{k} {_ms(v['seconds'])} ({v['kernels']})" for k, v in sorted(
            r["total"]["kinds"].items(), key=lambda kv: -kv[1]["seconds"])) for i, r in rows), ""]
    for i, r in rows:
      jt = r.get("jax_triton", {})
      if jt.get("calls"):
        out.append(f"- {i}: {jt['calls']} jax-triton calls ({jt['wgmma']} with wgmma in their "
                   f"PTX; {jt['unmatched']} without a recorded launch, FLOPs 0)")
      tiles = list(r.get("gemm_tiles", {}).items())[:4]
      if tiles:
        out.append(f"- {i}: XLA GEMM fusion default configs (tile warps stages: count, ms): "
                   + ", ".join(f"{k}: {c} {_ms(s)}" for k, (c, s) in tiles))
    out += ["", "Where each kernel-backed group's time goes (ms, kernels, GB; kind = "
            "fusion: XLA's native fusions (LN, bias, casts, transposes, reductions); "
            "xla_triton_gemm: XLA's GEMM fusions; xla_triton_fusion: XLA's Triton "
            "softmax/normalization fusions; cudnn; jax_triton:<kernel>):", "",
            "| group | impl | by kind (dir kind: ms, kernels, GB) |", "|---|---|---|"]
    for g in ("read", "write", "latent_attn", "latent_mlp"):
      for i, r in rows:
        kinds = sorted(r["groups"][g]["kinds"].items(), key=lambda kv: -kv[1]["seconds"])
        out.append(f"| {g} | {i} | " + "; ".join(
            f"{k}: {_ms(v['seconds'])}, {v['kernels']}, {v['bytes'] / 1e9:.1f}"
            for k, v in kinds) + " |")
    out += ["", "The glue (XLA's non-GEMM fusions) of each group by the jax op a fusion carries "
            "(dir op: ms, kernels, GB; the 6 largest):", "",
            "| group | impl | glue ms | largest |", "|---|---|---:|---|"]
    for g in ("read", "write", "latent_attn", "latent_mlp"):
      for i, r in rows:
        glue = sorted(r["groups"][g].get("glue", {}).items(), key=lambda kv: -kv[1][1])
        out.append(f"| {g} | {i} | {_ms(sum(v[1] for _, v in glue))} | " + "; ".join(
            f"{k}: {_ms(v[1])}, {v[0]}, {v[2] / 1e9:.1f}" for k, v in glue[:6]) + " |")
    out.append("")
    for g in ("read", "write", "latent_attn", "latent_mlp"):
      out += [f"Largest kernels of {g}:", "", "| impl | kernel | kind | dir | GFLOP | MB | us "
              "| bound | op_name |", "|---|---|---|---|---:|---:|---:|---|---|"]
      for i, r in rows:
        for k in r["groups"][g]["top"][:5]:
          nm = k.get("kernel", k["name"])
          out.append(f"| {i} | {nm} | {k['kind']} | {k['direction']} | {k['flops'] / 1e9:.2f} | "
                     f"{k['bytes'] / 1e6:.1f} | {k['seconds'] * 1e6:.1f} | {k['bound']} | "
                     f"`{k['op_name'][:70]}` |")
      out.append("")
  return "\n".join(out)


def wins_rows(result) -> dict:
  """{shape_class: row} for kernels/gpu_cost_table.WINS: per kernel-backed op group with one
  op class, each implementation's group time per train step (ms -> us), per target."""
  rows = {}
  by = {}
  for r in result["rows"]:
    if "error" not in r and r["mode"] == "train":
      by.setdefault((r["target"], r["config"]), {})[r["impl"]] = r
  for (target, cfg), impls in by.items():
    if "xla" not in impls:
      continue
    for grp, keys in impls["xla"].get("op_classes", {}).items():
      if len(keys) != 1:
        continue
      row = {f"{i}_us": round(r["groups"][grp]["seconds"] * 1e6, 1) for i, r in impls.items()}
      row["device"] = (f"{target} (ESTIMATE: bench.gpu_static roofline over the deviceless "
                       f"XLA:GPU compile, {cfg} train, batch {impls['xla']['batch']}, op group "
                       f"{grp})")
      row["source"] = f"bench/results/gpu_static/{result['tag']}.json"
      rows.setdefault(target, {})[keys[0]] = row
  return rows


def write_wins(rows_by_target, target="h100", path=None):
  """Rewrites WINS in kernels/gpu_cost_table.py with `target`'s rows (others kept)."""
  from kernels import gpu_cost_table
  return rewrite_wins(gpu_cost_table, rows_by_target.get(target, {}), path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--targets", default="h100,h200", help=f"comma list of {list(TARGETS)}")
  ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list; 'tiny' for tests")
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
  ap.add_argument("--batch", type=int, default=0,
                  help=f"batch per GPU (0: the published one, {BATCH})")
  ap.add_argument("--tag", default="latest", help="result file name")
  ap.add_argument("--out", default=os.path.join("bench", "results", "gpu_static"))
  ap.add_argument("--xla-flags", dest="flags", default="",
                  help="extra XLA_FLAGS, e.g. --xla_gpu_enable_triton_gemm=false (cuBLASLt)")
  ap.add_argument("--autotune-from", default=None, metavar="FILE",
                  help="XLA autotune results dumped on a GPU (--xla_gpu_dump_autotune_results"
                       "_to, bench/gpu_suite.sh), loaded instead of the default GEMM tiles")
  ap.add_argument("--hlo-dir", default=None, help="keep each step's compiled HLO (gzipped)")
  ap.add_argument("--reanalyse", default=None, metavar="DIR",
                  help="re-derive the tables from the HLO an earlier --hlo-dir run kept "
                       "(no compile)")
  ap.add_argument("--hlo-from", default=None, metavar="TARGET",
                  help="with --reanalyse: cost the HLO compiled for TARGET at each --targets' "
                       "ceilings (said in the tables)")
  ap.add_argument("--write-wins", default=None, metavar="TARGET",
                  help="write TARGET's per-op-class train-step times into "
                       "kernels/gpu_cost_table.py WINS (the GPU default's estimate)")
  ap.add_argument("--ops-check", action="store_true",
                  help="print ops_check() as JSON (tiny ops, deviceless; what CI runs) and exit")
  ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--_out", help=argparse.SUPPRESS)
  ap.add_argument("--_hlo", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  split = lambda s: [x for x in s.split(",") if x]
  args.targets, args.configs = split(args.targets), split(args.configs)
  args.modes, args.impls = split(args.modes), split(args.impls)
  for name, vals, allowed in (("--targets", args.targets, tuple(TARGETS)),
                              ("--modes", args.modes, MODES),
                              ("--impls", args.impls, IMPLEMENTATIONS),
                              ("--configs", args.configs, tuple(BATCH))):
    for v in vals:
      if v not in allowed:
        raise ValueError(f"{name}: {v!r} is not one of {list(allowed)}")
  if args.batch < 0:
    raise ValueError(f"--batch must be >= 0 (0: published), got {args.batch}")
  if args.autotune_from:
    if not os.path.exists(args.autotune_from):
      raise ValueError(f"--autotune-from: {args.autotune_from} does not exist")
    args.flags += f" --xla_gpu_load_autotune_results_from={os.path.abspath(args.autotune_from)}"
  if args.ops_check:
    if os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK") != "1":
      return subprocess.run([sys.executable, "-m", "bench.gpu_static", "--ops-check",
                             "--targets", args.targets[0], "--impls", ",".join(args.impls)],
                            env=gpu_env(args.flags)).returncode
    print(json.dumps(ops_check(args.targets[0], args.impls)))
    return 0
  if args._worker:
    args.target = args.targets[0]
    args.hlo_path = args._hlo
    json.dump(worker(args), open(args._out, "w"))
    return 0

  import importlib.metadata as md
  import jax
  rows = run_all(args)
  try:
    plugin = md.version("jax-cuda13-plugin")
  except md.PackageNotFoundError:
    plugin = "?"
  result = dict(tag=args.tag, label=LABEL, jax=jax.__version__, plugin=plugin,
                targets=args.targets, xla_flags=args.flags.strip(),
                command="python -m bench.gpu_static " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                ceilings={t: {k: v for k, v in TARGETS[t].items() if k != "proto"}
                          for t in args.targets},
                launch_s=LAUNCH_S, rows=rows)
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, args.tag)
  json.dump(result, open(base + ".json", "w"), indent=1)
  text = markdown(result)
  open(base + ".md", "w").write(text)
  if args.write_wins:
    print(len(write_wins(wins_rows(result), args.write_wins)), "WINS entries", file=sys.stderr)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
