"""Compile every Triton kernel variant the published RIN shapes need, for sm_90
(H100/H200) and sm_80 (A100), on a CPU-only machine; report registers, spills
and shared memory.

    python -m kernels.triton_gpu.compile_report [--dtypes bfloat16,float32]
        [--out bench/results/triton_compile_report.md]

How: the ops (forward and jax.grad backward) are traced with `record_launches()`,
which captures each launch's kernel, operand dtypes, constexprs, warps and stages
without running anything; each unique variant is then built with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`. Registers and
spill bytes come from the wheel's `ptxas -v` on the generated PTX (the same ptxas
Triton uses), shared memory from the compiled metadata (dynamic) plus the cubin's
static shared memory (`cuobjdump --dump-resource-usage`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp

# Per-block shared memory opt-in maxima (CUDA programming guide): the SM has 228 KiB
# (H100/H200) / 164 KiB (A100), of which one block may use 227 / 163 KiB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)

_TRITON_TY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32"}


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  op: str            # "attention" | "read" | "write"
  b: int
  lq: int            # attention: q length; blocks: query-side tokens
  lk: int
  cq: int = 0        # blocks: query-side width
  ckv: int = 0
  width: int = 0     # attention width (heads * head_dim)
  heads: int = 0
  head_dim: int = 0  # attention op only
  mlp: int = 0       # write block MLP hidden width (0: none)


# Published RIN block shapes (DESIGN.md section 2), batch 1 (batch only changes the grid).
PUBLISHED = (
    Shape("cifar10/read", "read", 1, 128, 256, cq=512, ckv=256, width=256, heads=8),
    Shape("cifar10/write", "write", 1, 256, 128, cq=256, ckv=512, width=256, heads=8, mlp=512),
    Shape("cifar10/latent_self_attn", "attention", 1, 128, 128, heads=16, head_dim=32),
    Shape("imagenet64_p4/read", "read", 1, 128, 256, cq=768, ckv=512, width=512, heads=16),
    Shape("imagenet64_p4/write", "write", 1, 256, 128, cq=512, ckv=768, width=512, heads=16,
          mlp=2048),
    Shape("imagenet64_p8/read", "read", 1, 128, 64, cq=768, ckv=512, width=512, heads=16),
    Shape("imagenet64_p8/write", "write", 1, 64, 128, cq=512, ckv=768, width=512, heads=16,
          mlp=2048),
    Shape("imagenet64/latent_self_attn", "attention", 1, 128, 128, heads=16, head_dim=48),
)


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def shape_fn(s: Shape, dtype) -> tuple[Callable, tuple]:
  """(loss function, abstract args) whose jax.grad runs every forward+backward kernel."""
  from kernels.params import ReadBlockParams, WriteBlockParams
  from kernels import triton_gpu as tg
  if s.op == "attention":
    shp = (s.b, s.lq, s.heads, s.head_dim)
    f = lambda q, k, v: jnp.sum(tg.cross_attention(q, k, v).astype(jnp.float32))
    return f, (_sds(shp, dtype), _sds((s.b, s.lk, s.heads, s.head_dim), dtype),
               _sds((s.b, s.lk, s.heads, s.head_dim), dtype))
  a, cq, ckv = s.width, s.cq, s.ckv
  p = dict(ln_scale=(cq,), ln_bias=(cq,), wq=(cq, a), bq=(a,), wk=(ckv, a), bk=(a,),
           wv=(ckv, a), bv=(a,), wo=(a, cq), bo=(cq,))
  if s.op == "write" and s.mlp:
    p.update(mlp_ln_scale=(cq,), mlp_ln_bias=(cq,), w1=(cq, s.mlp), b1=(s.mlp,),
             w2=(s.mlp, cq), b2=(cq,))
  cls = ReadBlockParams if s.op == "read" else WriteBlockParams
  params = cls(**{k: _sds(v, dtype) for k, v in p.items()})
  op = tg.read_block if s.op == "read" else tg.write_block
  f = lambda xq, xkv, pp: jnp.sum(op(xq, xkv, pp, num_heads=s.heads).astype(jnp.float32))
  return f, (_sds((s.b, s.lq, cq), dtype), _sds((s.b, s.lk, ckv), dtype), params)


def record(shape: Shape, dtype) -> list:
  """Every launch of `shape` (an undifferentiated forward, then forward and backward
  under jax.grad: they differ for the write block), without running anything."""
  from kernels.triton_gpu import attention, blocks, linear
  from kernels.triton_gpu.launch import record_launches
  attention._units.cache_clear()
  linear._units.cache_clear()
  blocks._one_kernel_unit.cache_clear()
  jax.clear_caches()
  f, args = shape_fn(shape, dtype)
  with record_launches() as recs:
    jax.make_jaxpr(f)(*args)      # undifferentiated: the one-kernel write-block forward
    jax.make_jaxpr(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
  return list(recs)


def _bin(name):
  import triton
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclasses.dataclass
class Result:
  kernel: str
  arch: int
  num_warps: int
  num_stages: int
  regs: int
  spill_bytes: int
  shared_bytes: int
  key: str


def compile_record(rec, arch: int) -> Result:
  import triton
  from triton.backends.compiler import GPUTarget
  kernel = rec.kernel
  constexprs = dict(rec.constexprs)
  ptr_types = [f"*{_TRITON_TY[d]}" for d in rec.in_dtypes + rec.out_dtypes]
  sig, ptrs = {}, iter(ptr_types)
  for name in kernel.arg_names:
    sig[name] = "constexpr" if name in constexprs else next(ptrs)
  src = triton.compiler.ASTSource(kernel, sig, constexprs)
  c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                     options=dict(num_warps=rec.num_warps, num_stages=rec.num_stages))
  with tempfile.TemporaryDirectory() as d:
    ptx = os.path.join(d, "k.ptx")
    with open(ptx, "w") as fh:
      fh.write(c.asm["ptx"])
    cubin = os.path.join(d, "k.cubin")
    with open(cubin, "wb") as fh:
      fh.write(c.asm["cubin"])
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    pt = subprocess.run([_bin("ptxas"), f"-arch={sm}", "-v", "-o", os.devnull, ptx],
                        capture_output=True, text=True, check=True)
    res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", cubin],
                         capture_output=True, text=True, check=True).stdout
  log = pt.stdout + pt.stderr
  regs = int(re.search(r"Used (\d+) registers", log).group(1))
  spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
  static_smem = int(re.search(r"SHARED:(\d+)", res).group(1))
  key = ", ".join(f"{k}={v}" for k, v in rec.constexprs if k not in ("SCALE", "LN_EPS"))
  return Result(kernel.__name__, arch, rec.num_warps, rec.num_stages, regs, spills,
                c.metadata.shared + static_smem, key)


def unique_records(shapes=PUBLISHED, dtypes=("bfloat16",)):
  """{record: [shape names]} over shapes x dtypes (identical variants compiled once)."""
  out: dict = {}
  for dt in dtypes:
    for s in shapes:
      for r in record(s, jnp.dtype(dt)):
        out.setdefault(r, []).append(f"{s.name}:{dt}")
  return out


def run(shapes=PUBLISHED, dtypes=("bfloat16",), archs=ARCHS):
  """[(Result, [shape names])] for every unique variant and arch."""
  rows = []
  for rec, where in unique_records(shapes, dtypes).items():
    for arch in archs:
      rows.append((compile_record(rec, arch), where))
  return rows


def violations(rows) -> list[str]:
  bad = []
  for r, where in rows:
    if r.spill_bytes:
      bad.append(f"{r.kernel} sm_{r.arch} spills {r.spill_bytes} bytes ({r.key}) in {where}")
    if r.shared_bytes > SMEM_LIMIT[r.arch]:
      bad.append(f"{r.kernel} sm_{r.arch} needs {r.shared_bytes} B shared memory "
                 f"> {SMEM_LIMIT[r.arch]} ({r.key}) in {where}")
  return bad


def markdown(rows, dtypes) -> str:
  import triton
  lines = [
      "# Triton kernels: sm_90 / sm_80 compile report",
      "",
      f"Generated by `python -m kernels.triton_gpu.compile_report` (triton {triton.__version__}, "
      f"CPU only: `triton.compile` + the wheel's ptxas/cuobjdump; no GPU ran anything).",
      f"Every kernel variant that the forward and backward passes of the published RIN "
      f"shapes launch, dtypes {', '.join(dtypes)}, batch 1. Limits: "
      f"{SMEM_LIMIT[90]} B shared per block on sm_90, {SMEM_LIMIT[80]} B on sm_80.",
      "",
      "| kernel | arch | warps | stages | regs | spill B | shared B | constexprs | used by |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r, where in sorted(rows, key=lambda t: (t[0].kernel, t[0].key, t[0].arch)):
    names = sorted(set(w.split(":")[0] for w in where))
    lines.append(f"| {r.kernel} | sm_{r.arch} | {r.num_warps} | {r.num_stages} | {r.regs} | "
                 f"{r.spill_bytes} | {r.shared_bytes} | {r.key} | {', '.join(names)} |")
  bad = violations(rows)
  lines += ["", f"Variants x archs compiled: {len(rows)}. Spills or over-limit shared memory: "
            f"{len(bad)}."] + [f"- {b}" for b in bad]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--out", default="bench/results/triton_compile_report.md")
  a = ap.parse_args(argv)
  dtypes = tuple(a.dtypes.split(","))
  rows = run(dtypes=dtypes)
  text = markdown(rows, dtypes)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as fh:
    fh.write(text)
  print(text)
  return 1 if violations(rows) else 0


if __name__ == "__main__":
  sys.exit(main())
