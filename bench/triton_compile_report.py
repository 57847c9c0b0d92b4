"""Compile report and static performance lint of the Triton kernels a real RIN step launches.

    python -m bench.triton_compile_report [--steps cifar10_train,...] [--archs 90,80]
        [--out bench/results/triton_compile_report.md]

What it compiles: the launches that real steps record (`kernels.triton_gpu.launch.
record_launches()`), traced with abstract inputs, nothing run:
  cifar10_train    rin.train_step.loss_and_metrics + grad, CIFAR-10 config, B=256, fp32 params,
                   bf16 compute (the published config with train.dtype="bfloat16")
  cifar10_sample   one sampling forward of the same model (B=256, bf16)
  imagenet64_train ImageNet-64 config with patch 4 (the paper's), B=128, bf16 compute
  imagenet64_sample
  read_n4096       one read block with a long interface (B=32, M=128, N=4096, T=512,
                   D=768, 16 heads), forward and grad, bf16
Each unique variant is built with `triton.compile` for sm_90 (and sm_80) with the
specialisation jax-triton passes (every pointer argument `tt.divisibility=16`; without it
Triton neither vectorises nor pipelines the loads). Per variant: grid and CTAs, warps,
registers and spills (the wheel's `ptxas -v`), shared memory (Triton's metadata plus the
cubin's static shared memory), CTAs per SM from those (H200: 65536 registers, 228 KiB
shared memory, 64 warps per SM), the tensor-core instruction in the PTX (`wgmma`
on sm_90, `mma` = mma.sync, `none` = FMA dots or no dot) and whether TMA is used.

`lint(rows)` is the gate (tests/kernels/test_triton_lint.py): a dot-bearing variant of a
bf16 train step without wgmma on sm_90, a train-step variant with fewer CTAs than the
H200 has SMs, any spill, or a fused kernel that a sample step launches but the matching
train step does not, is a violation. Figures describe the Triton installed here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp

from kernels import shapes

SMS_H200 = 132
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {90: 64, 80: 64}
MAX_CTAS_PER_SM = 32
ARCHS = (90, 80)
# Kernels that exist to fuse a block (the lint checks that training launches them too).
FUSED_KERNELS = ("_read_attn_kernel",)

_TRITON_TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32"}


# ----------------------------------------------------------------------------
# Steps: the launches real train / sample steps record.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  config: str         # rin/configs module, or "read_n4096"
  kind: str           # "train" | "sample" | "read"
  batch: int
  patch: int = 0      # 0: the config's


STEPS = (
    Step("cifar10_train", "cifar10", "train", 256),
    Step("cifar10_sample", "cifar10", "sample", 256),
    Step("imagenet64_train", "imagenet64", "train", 128, patch=4),
    Step("imagenet64_sample", "imagenet64", "sample", 128, patch=4),
    Step("read_n4096", "read_n4096", "read", 32),
)
STEP_NAMES = tuple(s.name for s in STEPS)
# The long-interface read: the ImageNet-64 widths at N = 4096.
READ_N4096 = shapes.op_shape(shapes.IMAGENET64_P4, "read_block", n=4096)


def _config(step: Step, dtype: str):
  import importlib
  cfg = importlib.import_module(f"rin.configs.{step.config}").get_config()
  cfg.train.dtype = dtype
  cfg.train.batch_size = step.batch
  cfg.train.batch_chunks = 1
  cfg.train.implementation = "triton"
  if step.patch:
    cfg.model.patch_size = step.patch
  return cfg


def _step_fn(step: Step, dtype: str) -> tuple[Callable, tuple]:
  """(function, abstract args) whose trace launches what `step` launches."""
  sds = jax.ShapeDtypeStruct
  if step.kind == "read":
    from kernels import triton_gpu as tg
    o = READ_N4096
    f = lambda z, x, pp: jnp.sum(tg.read_block(z, x, pp, num_heads=o.heads).astype(jnp.float32))
    args = shapes.abstract_args(o, step.batch, jnp.dtype(dtype), jnp.float32)
    return (lambda *a: (f(*a), jax.grad(f, argnums=(0, 1, 2))(*a))), args
  from rin import train_state, train_step
  cfg = _config(step, dtype)
  model = train_state.create_model(cfg, implementation="triton")
  mc = cfg.model
  size, ch = mc.image_size, mc.channels
  b = step.batch
  images = sds((b, size, size, ch), jnp.float32)
  labels = sds((b,), jnp.int32)
  gamma = sds((b,), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  dt = jnp.dtype(dtype)

  def init(x, g, lab):
    return model.init(jax.random.key(0), x, g, lab if mc.num_classes else None, None)

  variables = jax.eval_shape(init, images, gamma, labels)
  params = variables["params"]
  if step.kind == "train":
    def f(params, images, labels, rng):
      batch = dict(image=images, label=labels)
      return jax.value_and_grad(train_step.loss_and_metrics)(params, model, cfg, batch, rng)
    return f, (params, images, labels, key)

  def g(params, x_t, gamma, labels):
    out, z = model.apply({"params": params}, x_t, gamma,
                         labels if mc.num_classes else None, None)
    return out, z
  del dt
  return g, (params, images, gamma, labels)


def record_step(step: Step, dtype: str = "bfloat16") -> list:
  """The Triton launches of `step` (traced abstractly; nothing runs). JAX reuses the trace
  of a repeated identical call, so a launch repeated with the same shapes (the blocks of a
  tower) is recorded once: every distinct variant and grid appears, not every call."""
  from kernels.triton_gpu.launch import clear_caches, record_launches
  f, args = _step_fn(step, dtype)
  clear_caches()   # the abstract init above traced the forward: forget those traces
  with record_launches() as recs:
    jax.make_jaxpr(f)(*args)
  return list(recs)


# ----------------------------------------------------------------------------
# Compiling one recorded launch.
# ----------------------------------------------------------------------------

def _bin(name):
  import triton
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclasses.dataclass(frozen=True)
class Result:
  kernel: str
  arch: int
  grid: tuple
  num_warps: int
  num_stages: int
  regs: int
  spill_bytes: int
  shared_bytes: int
  mma: str            # "wgmma" | "mma" | "none"
  has_dot: bool
  tma: bool
  key: str

  @property
  def ctas(self) -> int:
    return math.prod(self.grid)

  @property
  def ctas_per_sm(self) -> int:
    """Resident CTAs per SM from registers (256-register allocation units per warp),
    shared memory (1 KiB reserved per CTA) and warps."""
    per_warp = -(-self.regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(1, per_warp * self.num_warps)
    by_smem = SMEM_PER_SM[self.arch] // (self.shared_bytes + 1024)
    by_warps = MAX_WARPS_PER_SM[self.arch] // self.num_warps
    return max(0, min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM))


def _signature(kernel, rec):
  constexprs = dict(rec.constexprs)
  ptr_types = [f"*{_TRITON_TY[d]}" for d in rec.in_dtypes + rec.out_dtypes]
  sig, ptrs, ptr_idx = {}, iter(ptr_types), []
  for i, name in enumerate(kernel.arg_names):
    if name in constexprs:
      sig[name] = "constexpr"
    else:
      sig[name] = next(ptrs)
      ptr_idx.append(i)
  return sig, constexprs, ptr_idx


def compile_asm(rec, arch: int, aligned: bool = True) -> dict:
  """triton.compile of one recorded launch; returns its `asm` dict (ttir, ttgir, ptx, cubin)
  and metadata. aligned: every pointer tt.divisibility=16, as jax-triton specialises."""
  import triton
  from triton.backends.compiler import GPUTarget
  sig, constexprs, ptr_idx = _signature(rec.kernel, rec)
  attrs = {(i,): [["tt.divisibility", 16]] for i in ptr_idx} if aligned else {}
  src = triton.compiler.ASTSource(rec.kernel, sig, constexprs, attrs)
  c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                     options=dict(num_warps=rec.num_warps, num_stages=rec.num_stages))
  return dict(asm=c.asm, shared=c.metadata.shared)


def _key(rec) -> str:
  return ", ".join(f"{k}={v}" for k, v in rec.constexprs if k not in ("SCALE", "LN_EPS"))


def compile_record(rec, arch: int, aligned: bool = True) -> Result:
  c = compile_asm(rec, arch, aligned)
  asm = c["asm"]
  with tempfile.TemporaryDirectory() as d:
    ptx = os.path.join(d, "k.ptx")
    with open(ptx, "w") as fh:
      fh.write(asm["ptx"])
    cubin = os.path.join(d, "k.cubin")
    with open(cubin, "wb") as fh:
      fh.write(asm["cubin"])
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    pt = subprocess.run([_bin("ptxas"), f"-arch={sm}", "-v", "-o", os.devnull, ptx],
                        capture_output=True, text=True, check=True)
    res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cubin],
                         capture_output=True, text=True, check=True).stdout
  log = pt.stdout + pt.stderr
  regs = int(re.search(r"Used (\d+) registers", log).group(1))
  spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
  static_smem = int(re.search(r"SHARED:(\d+)", res).group(1))
  ptx_text = asm["ptx"]
  mma = "wgmma" if "wgmma.mma_async" in ptx_text else ("mma" if "mma.sync" in ptx_text
                                                       else "none")
  has_dot = "tt.dot" in asm["ttir"]
  tma = "cp.async.bulk.tensor" in ptx_text
  return Result(rec.kernel.__name__, arch, tuple(rec.grid), rec.num_warps, rec.num_stages,
                regs, spills, c["shared"] + static_smem, mma, has_dot, tma, _key(rec))


def variant_key(rec):
  """Launches that compile to the same binary (grid and shapes aside)."""
  return (rec.kernel, rec.in_dtypes, rec.out_dtypes, rec.constexprs, rec.num_warps,
          rec.num_stages)


_COMPILED: dict = {}


def _compiled(rec, arch):
  """compile_record, once per binary (variant_key) and arch."""
  k = (variant_key(rec), arch)
  if k not in _COMPILED:
    _COMPILED[k] = compile_record(rec, arch)
  return _COMPILED[k]


def save_records(path, steps=STEP_NAMES, dtype="bfloat16"):
  """Pickles the recorded launches (kernels by module and name), so another Triton
  version (a separate venv, --load-records) compiles exactly the same launches."""
  import pickle
  by_name = {s.name: s for s in STEPS}
  out = []
  for name in steps:
    for rec in record_step(by_name[name], dtype):
      d = dict(vars(rec))
      d["kernel"] = (rec.kernel.fn.__module__, rec.kernel.fn.__name__)
      out.append((name, d))
  with open(path, "wb") as fh:
    pickle.dump(out, fh)


def load_records(path):
  import importlib
  import pickle
  from kernels.triton_gpu.launch import LaunchRecord
  with open(path, "rb") as fh:
    raw = pickle.load(fh)
  out = []
  for name, d in raw:
    mod, fn = d.pop("kernel")
    out.append((name, LaunchRecord(kernel=getattr(importlib.import_module(mod), fn), **d)))
  return out


def run(steps=STEP_NAMES, archs=(90,), dtype="bfloat16", records=None):
  """[(Result, step name)] for every launch variant (distinct binary and grid) of steps
  (records: [(step name, LaunchRecord)] from load_records instead of tracing)."""
  rows, seen = [], set()
  by_name = {s.name: s for s in STEPS}
  if records is None:
    records = [(name, rec) for name in steps for rec in record_step(by_name[name], dtype)]
  for name, rec in records:
    for arch in archs:
      k = (variant_key(rec), tuple(rec.grid), arch, name)
      if k in seen:
        continue
      seen.add(k)
      r = _compiled(rec, arch)
      rows.append((dataclasses.replace(r, grid=tuple(rec.grid)), name))
  return rows


def lint(rows) -> list[str]:
  """The static performance rules (module docstring); [] when every rule holds."""
  bad = []
  kernels_by_step: dict = {}
  for r, step in rows:
    kernels_by_step.setdefault(step, set()).add(r.kernel)
    where = f"{r.kernel} sm_{r.arch} [{r.key}] in {step}"
    if r.spill_bytes:
      bad.append(f"spills {r.spill_bytes} B: {where}")
    if r.shared_bytes > SMEM_PER_BLOCK[r.arch]:
      bad.append(f"shared memory {r.shared_bytes} B > {SMEM_PER_BLOCK[r.arch]}: {where}")
    if step.endswith("_train") or step.startswith("read_"):
      if r.arch == 90 and r.has_dot and r.mma != "wgmma":
        bad.append(f"dot without wgmma ({r.mma}): {where}")
      if r.ctas < SMS_H200:
        bad.append(f"grid {r.grid} = {r.ctas} CTAs < {SMS_H200} SMs: {where}")
  for step, names in kernels_by_step.items():
    if step.endswith("_sample"):
      train = kernels_by_step.get(step.replace("_sample", "_train"), set())
      for k in sorted(names & set(FUSED_KERNELS) - train):
        bad.append(f"{k} runs in {step} but not in its train step")
  return bad


def markdown(rows, archs, dtype) -> str:
  import triton
  lines = [
      "# Triton kernels of real RIN steps: compile report and static lint",
      "",
      f"Generated by `python -m bench.triton_compile_report` (triton {triton.__version__}, "
      "CPU only: `triton.compile` with every pointer `tt.divisibility=16` as jax-triton "
      "passes, then the wheel's ptxas -v / cuobjdump; no GPU ran anything). Compute dtype "
      f"{dtype}, fp32 params. Steps: "
      + "; ".join(f"{s.name} (B={s.batch}{', patch ' + str(s.patch) if s.patch else ''})"
                  for s in STEPS) + ".",
      "CTAs/SM: resident CTAs per SM from registers, shared memory and warps (H200 limits).",
      "",
      "| step | kernel | arch | grid | CTAs | warps | stages | regs | spill B | smem B | "
      "CTAs/SM | MMA | TMA | constexprs |",
      "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
  ]
  for r, step in sorted(rows, key=lambda t: (t[1], t[0].kernel, t[0].key, t[0].arch)):
    lines.append(
        f"| {step} | {r.kernel} | sm_{r.arch} | {'x'.join(map(str, r.grid))} | {r.ctas} | "
        f"{r.num_warps} | {r.num_stages} | {r.regs} | {r.spill_bytes} | {r.shared_bytes} | "
        f"{r.ctas_per_sm} | {r.mma if r.has_dot else '-'} | {'yes' if r.tma else 'no'} | "
        f"{r.key} |")
  bad = lint(rows)
  lines += ["", f"Launch variants x archs: {len(rows)}. Lint violations: {len(bad)}."]
  lines += [f"- {b}" for b in bad]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", default=",".join(STEP_NAMES))
  ap.add_argument("--archs", default="90,80")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--out", default="bench/results/triton_compile_report.md")
  ap.add_argument("--save-records", default=None,
                  help="only record the steps' launches into this pickle")
  ap.add_argument("--load-records", default=None,
                  help="compile launches saved by --save-records (e.g. under another Triton)")
  a = ap.parse_args(argv)
  archs = tuple(int(x) for x in a.archs.split(","))
  if a.save_records:
    save_records(a.save_records, tuple(a.steps.split(",")), a.dtype)
    return 0
  records = load_records(a.load_records) if a.load_records else None
  rows = run(tuple(a.steps.split(",")), archs, a.dtype, records)
  text = markdown(rows, archs, a.dtype)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as fh:
    fh.write(text)
  print(text)
  return 1 if lint(rows) else 0


if __name__ == "__main__":
  sys.exit(main())
