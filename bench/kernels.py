"""Kernel microbenchmarks, side by side with every alternative available here.

One file over 400 lines on purpose: the case table, the timing loop, the report and the plot
read top to bottom as one benchmark; split, each part would import all the others.

    python -m bench.kernels [--dtypes bf16,fp32] [--quick] [--out DIR] [--plot]

Ops (the RIN shapes of the published configs, forward and forward+backward):
  latent_self_attention, read_attention, write_attention   (q, k, v -> o)
  read_block, write_block                                   (fused LN/proj/attention/MLP)
Implementations, each timed when it can run here and listed with the reason when not:
  xla                 our jax.numpy reference (kernels/reference.py)
  pallas_tpu, triton  our kernels (TPU / CUDA GPU only; interpreters are never timed)
  dpa:<impl>          jax.nn.dot_product_attention (xla; cudnn on GPU); for the blocks
                      "dpa:<impl>+xla" is that attention with the rest of the block in XLA
  tokamax:<impl>      tokamax.dot_product_attention, when installed (same "+xla" for blocks)
Sweeps: interface length N (256..16k) and latent count M (64..512) at the CIFAR-10 widths.
Each row: median/IQR time, FLOPs and minimum bytes (bench/costs.py), achieved TFLOP/s and
GB/s, and % of the roofline from a matmul and a copy ceiling measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp

import kernels
from rin import xla_cpu
from bench import costs, report, timing
from kernels import reference, shapes
from kernels.params import ReadBlockParams, WriteBlockParams

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
          "fp16": "float16", "float16": "float16"}


CONFIGS = shapes.BY_NAME   # the published configs, the video ones and moving digits
ATTENTION_OPS, BLOCK_OPS = shapes.ATTENTION_OPS, shapes.BLOCK_OPS
PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------
# Which implementations exist here.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Impl:
  name: str
  kind: str                 # "ours", "dpa", "tokamax"
  arg: str | None = None    # implementation= passed through
  reason: str | None = None  # why it cannot run here (None: it can)


def _tokamax_impls(platform: str) -> list[str]:
  return {"cpu": ["xla", "xla_chunked"], "gpu": ["mosaic", "triton", "cudnn", "xla"],
          "tpu": ["mosaic", "xla"]}.get(platform, ["xla"])


def implementations(platform: str | None = None) -> list[Impl]:
  platform = platform or jax.default_backend()
  out = [Impl("xla", "ours", "xla")]
  avail = kernels.available_implementations()
  if platform == "tpu" and "pallas_tpu" in avail:
    out.append(Impl("pallas_tpu", "ours", "pallas_tpu"))
  else:
    why = ("needs a TPU (Pallas interpret mode on CPU is a correctness tool, excluded from "
           "speed claims)" if platform != "tpu" else "kernels.pallas_tpu does not import here")
    out.append(Impl("pallas_tpu", "ours", "pallas_tpu", why))
  if platform == "gpu" and "triton" in avail:
    out.append(Impl("triton", "ours", "triton"))
  else:
    why = ("needs a CUDA GPU with jax-triton (Triton's interpreter is excluded from speed "
           "claims)" if platform != "gpu" else "kernels.triton_gpu does not import here "
           "(jax-triton missing?)")
    out.append(Impl("triton", "ours", "triton", why))
  # Ours over cuDNN's fused attention (kernels/cudnn_gpu.py): the blocks compose XLA's
  # projections around it, so it is the peer of the Triton blocks.
  if platform == "gpu":
    out.append(Impl("cudnn", "ours", "cudnn"))
  else:
    out.append(Impl("cudnn", "ours", "cudnn", "needs an NVIDIA GPU with cuDNN (bf16/fp16)"))
  out.append(Impl("dpa:xla", "dpa", "xla"))
  if platform == "gpu":
    out.append(Impl("dpa:cudnn", "dpa", "cudnn"))
  else:
    out.append(Impl("dpa:cudnn", "dpa", "cudnn", "needs an NVIDIA GPU with cuDNN"))
  try:
    import tokamax  # noqa: F401
    for a in _tokamax_impls(platform):
      out.append(Impl(f"tokamax:{a}", "tokamax", a))
    if platform == "cpu":
      out.append(Impl("tokamax:mosaic/triton/cudnn", "tokamax", None,
                      f"not available on cpu (tokamax raises 'Not supported on cpu')"))
  except ImportError:
    out.append(Impl("tokamax", "tokamax", None, "tokamax is not installed"))
  return out


# ----------------------------------------------------------------------------
# The functions being timed.
# ----------------------------------------------------------------------------

def _attention_fn(impl: Impl) -> Callable:
  """(q, k, v) -> o for one implementation."""
  if impl.kind == "ours":
    return functools.partial(kernels.cross_attention, implementation=impl.arg)
  if impl.kind == "dpa":
    return functools.partial(jax.nn.dot_product_attention, implementation=impl.arg)
  import tokamax
  return functools.partial(tokamax.dot_product_attention, implementation=impl.arg)


def _block_with_attention(attend: Callable, direction: str, num_heads: int) -> Callable:
  """The reference block with its attention swapped for `attend` (rest in XLA)."""
  def fn(q_src, kv_src, p):
    dt = q_src.dtype
    h = reference.layer_norm(q_src, p.ln_scale, p.ln_bias)
    split = lambda y: reference._split_heads(y.astype(dt), num_heads)
    # Operands in the compute dtype, as the precision policy (kernels/precision.py).
    q = split(reference.dense(h, p.wq, p.bq, dt))
    k = split(reference.dense(kv_src, p.wk, p.bk, dt))
    v = split(reference.dense(kv_src, p.wv, p.bv, dt))
    o = attend(q, k, v)
    y = q_src.astype(jnp.float32) + reference.dense(reference._merge_heads(o), p.wo, p.bo, dt)
    if direction == "write" and p.w1 is not None:
      y = reference.interface_mlp(y, p, dt)
    return y.astype(dt)
  return fn


def _block_fn(impl: Impl, direction: str, num_heads: int) -> Callable:
  if impl.kind == "ours":
    op = kernels.read_block if direction == "read" else kernels.write_block
    return functools.partial(op, num_heads=num_heads, implementation=impl.arg)
  return _block_with_attention(_attention_fn(impl), direction, num_heads)


def _make_block_params(key, o: shapes.OpShape):
  """fp32 params as at init: LN scales 1, biases 0, matrices normal / sqrt(fan-in)."""
  matrices = iter(jax.random.split(key, 8))
  p = {}
  for name, shape in shapes.param_shapes(o.cq, o.ckv, o.width,
                                         o.mlp if o.kind == "write" else 0).items():
    if len(shape) == 2:
      p[name] = jax.random.normal(next(matrices), shape, jnp.float32) * (1.0 / shape[0]) ** 0.5
    else:
      p[name] = (jnp.ones if name.endswith("ln_scale") else jnp.zeros)(shape, jnp.float32)
  return (ReadBlockParams if o.kind == "read" else WriteBlockParams)(**p)


@dataclasses.dataclass
class Case:
  suite: str
  config: str
  op: str
  pass_: str
  dtype: str
  batch: int
  m: int
  n: int
  shape: shapes.ModelShapes

  @property
  def op_shape(self) -> shapes.OpShape:
    return shapes.op_shape(self.shape, self.op, m=self.m, n=self.n)

  def describe(self) -> dict:
    o = self.op_shape
    return {"suite": self.suite, "config": self.config, "op": self.op, "pass": self.pass_,
            "dtype": self.dtype, "batch": self.batch, "M": self.m, "N": self.n,
            "heads": o.heads, "head_dim": o.head_dim}

  def cost(self) -> costs.Cost:
    passes = [False] if self.pass_ == "fwd" else [False, True]
    total = costs.Cost(0, 0, 0)
    for bw in passes:
      total = total + costs.op_cost(self.op_shape, self.batch, self.dtype, backward=bw)
    return total

  def make_inputs(self, key) -> tuple:
    o, dt = self.op_shape, jnp.dtype(self.dtype)
    ks = jax.random.split(key, 4)
    args = shapes.abstract_args(o, self.batch, dt)
    rnd = lambda k, a: jax.random.normal(k, a.shape, jnp.float32).astype(dt)
    if o.kind == "attention":
      return tuple(rnd(k, a) for k, a in zip(ks, args))
    return rnd(ks[1 if o.kind == "write" else 0], args[0]), \
        rnd(ks[0 if o.kind == "write" else 1], args[1]), _make_block_params(ks[2], o)

  def function(self, impl: Impl) -> Callable:
    if self.op in ATTENTION_OPS:
      f = _attention_fn(impl)
    else:
      f = _block_fn(impl, self.op.split("_")[0],
                    self.shape.rw_heads)
    if self.pass_ == "fwd":
      return jax.jit(f)

    def fwd_bwd(*args):
      out, pull = jax.vjp(f, *args)
      return out, pull(jnp.ones_like(out))
    return jax.jit(fwd_bwd)


def _tree_nbytes(x) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(x))


def impl_label(impl: Impl, op: str) -> str:
  return impl.name + ("+xla" if op in BLOCK_OPS and impl.kind != "ours" else "")


def run_case(case: Case, impl: Impl, ceilings: dict, cfg: dict) -> dict:
  row = case.describe()
  row["impl"] = impl_label(impl, case.op)
  c = case.cost()
  row.update(flops=c.flops, min_bytes=c.bytes)
  if impl.reason:
    row.update(status="unavailable", note=impl.reason)
    return row
  try:
    key = jax.random.PRNGKey(hash((case.op, case.m, case.n)) % (2 ** 31))
    first = case.make_inputs(key)
    nsets = timing.rotation_count(_tree_nbytes(first), max_sets=cfg["max_sets"])
    sets = [first] + [case.make_inputs(jax.random.fold_in(key, i)) for i in range(1, nsets)]
    fn = case.function(impl)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*sets[0]))
    row["compile_s"] = time.perf_counter() - t0
    t = timing.time_calls(fn, sets, warmup=cfg["warmup"], repeats=cfg["repeats"],
                          max_seconds=cfg["max_seconds"])
  except Exception as e:  # an implementation that rejects this shape: say so, keep going
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    row.update(status="error", note=msg)
    if cfg.get("verbose"):
      traceback.print_exc()
    return row
  row.update(t.as_dict())
  row.update(status="ok", input_sets=len(sets),
             tflops=c.flops / t.median / 1e12, gbps=c.bytes / t.median / 1e9,
             pct_roofline=100 * timing.roofline_fraction(c.flops, c.bytes, t.median, ceilings),
             load=timing.load_average()[0] if timing.load_average() else None)
  return row


# ----------------------------------------------------------------------------
# Suites.
# ----------------------------------------------------------------------------

def build_cases(args, platform: str) -> list[Case]:
  cases = []
  quick = args.quick
  for dtype in args.dtypes:
    for cname in args.configs:
      s = CONFIGS[cname]
      for op in ATTENTION_OPS + BLOCK_OPS:
        for p in PASSES:
          cases.append(Case("published", cname, op, p, dtype, args.batch, s.m, s.n, s))
  sweep_dtype = args.dtypes[0]
  s = CONFIGS["cifar10"]
  for n in args.sweep_n:
    for op in ("read_attention", "write_attention", "read_block", "write_block"):
      for p in (PASSES[:1] if quick else PASSES):
        cases.append(Case("sweep_interface", "cifar10", op, p, sweep_dtype, args.sweep_batch,
                          s.m, n, s))
  for m in args.sweep_m:
    for op in ("read_block", "write_block"):
      for p in (PASSES[:1] if quick else PASSES):
        cases.append(Case("sweep_latents", "cifar10", op, p, sweep_dtype, args.sweep_batch,
                          m, args.sweep_m_n, s))
  return cases


COLUMNS = [("config", "config"), ("op", "op"), ("pass", "pass"), ("dtype", "dtype"),
           ("batch", "B"), ("M", "M"), ("N", "N"), ("impl", "implementation"),
           ("median_s", "median s"), ("iqr_s", "IQR s"), ("tflops", "TFLOP/s"),
           ("gbps", "GB/s"), ("pct_roofline", "% roofline"), ("status", "status"),
           ("note", "note")]


def _speedup_rows(rows):
  """Per case: best implementation and ours-vs-alternatives ratios (ok rows only)."""
  out = []
  key = lambda r: (r["suite"], r["config"], r["op"], r["pass"], r["dtype"], r["batch"], r["M"],
                   r["N"])
  groups: dict = {}
  for r in rows:
    if r.get("status") == "ok":
      groups.setdefault(key(r), []).append(r)
  for k, rs in groups.items():
    best = min(rs, key=lambda r: r["median_s"])
    xla = next((r for r in rs if r["impl"] == "xla"), None)
    alt = [r for r in rs if not r["impl"].startswith(("xla", "pallas_tpu", "triton"))]
    best_alt = min(alt, key=lambda r: r["median_s"]) if alt else None
    ours = [r for r in rs if r["impl"] in ("pallas_tpu", "triton")]
    o = dict(zip(("suite", "config", "op", "pass", "dtype", "batch", "M", "N"), k))
    o["fastest"] = best["impl"]
    if xla and best_alt:
      o["best_alternative"] = best_alt["impl"]
      o["xla_over_best_alt"] = best_alt["median_s"] / xla["median_s"]
    for r in ours:
      if xla:
        o[f"{r['impl']}_speedup_vs_xla"] = xla["median_s"] / r["median_s"]
      if best_alt:
        o[f"{r['impl']}_speedup_vs_best_alt"] = best_alt["median_s"] / r["median_s"]
    out.append(o)
  return out


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtypes", default=None,
                  help="comma list of bf16, fp32, fp16 (default: bf16,fp32 on accelerators; "
                       "fp32,bf16 on CPU)")
  ap.add_argument("--quick", action="store_true",
                  help="small batch, short sweeps, few repeats (CPU: a few minutes)")
  ap.add_argument("--estimate", action="store_true",
                  help="print and write the H200 roofline ESTIMATE of the Triton path vs XLA "
                       "(bench/triton_estimate.py) instead of timing anything")
  ap.add_argument("--configs", default=None, help="comma list of " + ",".join(CONFIGS))
  ap.add_argument("--batch", type=int, default=None, help="batch of the published shapes")
  ap.add_argument("--sweep-n", default=None, help="interface lengths, e.g. 256,1024,4096,16384")
  ap.add_argument("--sweep-m", default=None, help="latent counts, e.g. 64,128,256,512")
  ap.add_argument("--sweep-batch", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--impls", default=None,
                  help="comma list restricting implementations (names as in the table)")
  ap.add_argument("--out", default=None, help="output folder (default $OUT or "
                  "bench/results/<device>-<date>)")
  ap.add_argument("--no-plot", action="store_true")
  ap.add_argument("--verbose", action="store_true")
  args = ap.parse_args(argv)
  platform = jax.default_backend()
  accel = platform != "cpu"
  args.dtypes = [DTYPES[d.strip()] for d in (args.dtypes or ("bf16,fp32" if accel else
                                                                "fp32,bf16")).split(",")]
  if args.configs:
    args.configs = [c.strip() for c in args.configs.split(",")]
  else:
    args.configs = ["cifar10"] if (args.quick and not accel) else list(CONFIGS)
  ints = lambda s: [int(v) for v in s.split(",") if v.strip()]
  if args.quick:
    dflt = dict(batch=8 if accel else 2, sweep_n="256,1024,4096,16384" if accel else "256,1024,4096",
                sweep_m="64,128,256,512" if accel else "64,256", sweep_batch=4 if accel else 1,
                repeats=20 if accel else 5, warmup=2 if accel else 1, max_seconds=1.0)
  else:
    dflt = dict(batch=32 if accel else 4, sweep_n="256,1024,4096,16384",
                sweep_m="64,128,256,512", sweep_batch=8 if accel else 1,
                repeats=50 if accel else 10, warmup=3 if accel else 2,
                max_seconds=2.0 if accel else 5.0)
  args.batch = args.batch or dflt["batch"]
  args.sweep_n = ints(args.sweep_n or dflt["sweep_n"])
  args.sweep_m = ints(args.sweep_m or dflt["sweep_m"])
  args.sweep_m_n = 1024 if accel else 256
  args.sweep_batch = args.sweep_batch or dflt["sweep_batch"]
  args.timing = dict(warmup=dflt["warmup"], repeats=args.repeats or dflt["repeats"],
                     max_seconds=dflt["max_seconds"], max_sets=16 if accel else 4,
                     verbose=args.verbose)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.estimate:
    from bench import triton_estimate
    out = os.path.join(args.out, "triton_estimate.md") if args.out else None
    triton_estimate.main(["--out", out] if out else [])
    return {}
  xla_cpu.configure()               # before the first computation (rin/xla_cpu.py)
  platform = jax.default_backend()
  out_dir = args.out or os.environ.get("OUT") or report.default_out_dir("kernels")
  env = timing.environment()
  print(f"[bench.kernels] {env['device']} load {env['load_average_1_5_15']} -> {out_dir}",
        flush=True)
  ceilings = {}
  for dt in args.dtypes:
    ceilings[dt] = timing.measure_ceilings(dt, repeats=10 if platform != "cpu" else 5,
                                           max_seconds=5.0)
    c = ceilings[dt]
    print(f"  ceiling {dt}: matmul {c['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, copy "
          f"{c['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
  impls = implementations(platform)
  if args.impls:
    keep = {s.strip() for s in args.impls.split(",")}
    impls = [i for i in impls if i.name in keep]
  rows = []
  t_start = time.perf_counter()
  for case in build_cases(args, platform):
    for impl in impls:
      if impl.reason and case.suite != "published":
        continue   # unavailable implementations are listed once per published case
      row = run_case(case, impl, ceilings[case.dtype], args.timing)
      rows.append(row)
      if row["status"] == "ok":
        msg = (f"{row['median_s'] * 1e3:9.3f} ms  {row['tflops']:8.4f} TFLOP/s  "
               f"{row['pct_roofline']:5.1f}% roofline")
      else:
        msg = f"{row['status']}: {row.get('note', '')[:90]}"
      print(f"  {case.suite:15s} {case.config:13s} {case.op:21s} {case.pass_:7s} "
            f"{case.dtype:8s} B={case.batch} M={case.m} N={case.n} {row['impl']:24s} {msg}",
            flush=True)
      if len(rows) % 25 == 0:   # partial results survive a stage timeout
        write_outputs(_record(env, ceilings, args, t_start, rows), out_dir, plot=False,
                      quiet=True)
  record = _record(env, ceilings, args, t_start, rows)
  write_outputs(record, out_dir, plot=not args.no_plot)
  return record


def _record(env, ceilings, args, t_start, rows) -> dict:
  return {"benchmark": "bench.kernels", "environment": env, "ceilings": ceilings,
            "settings": dict(vars(args)),
            "wall_s": time.perf_counter() - t_start, "rows": rows,
            "summary": _speedup_rows(rows),
            "notes": ["Interpret-mode runs (Pallas interpret=True, TRITON_INTERPRET) are never "
                      "timed: they are correctness tools, not speeds.",
                      "FLOPs and minimum bytes from bench/costs.py (matmul FLOPs only; "
                      "fwd+bwd = forward + backward costs).",
                      "% roofline = max(FLOPs/matmul ceiling, bytes/copy ceiling) / median "
                      "time, ceilings measured in this run in the row's dtype.",
                      "Blocks 'dpa:*+xla' / 'tokamax:*+xla': that attention, the rest of the "
                      "block (LN, projections, MLP) in XLA."]}


def write_outputs(record: dict, out_dir: str, *, plot: bool = True, quiet: bool = False) -> dict:
  rows = record["rows"]
  paths = {"json": report.write_json(os.path.join(out_dir, "kernels.json"), record)}
  sections = []
  for suite, title in (("published", "Published RIN shapes"),
                       ("sweep_interface", "Sweep over interface length N"),
                       ("sweep_latents", "Sweep over latent count M")):
    rs = [r for r in rows if r["suite"] == suite]
    if rs:
      sections.append((title, report.markdown_table(rs, COLUMNS)))
  if record.get("summary"):
    cols = sorted({k for r in record["summary"] for k in r} - {"suite"},
                  key=lambda k: (k not in ("config", "op", "pass", "dtype", "batch", "M", "N"),
                                 k))
    sections.append(("Fastest per case and speedups (ok rows only)",
                     report.markdown_table(record["summary"], [(c, c) for c in cols])))
  paths["md"] = report.write_markdown(os.path.join(out_dir, "kernels.md"),
                                      "bench.kernels", record["environment"], sections,
                                      record["ceilings"].values(), record.get("notes", ()))
  if plot:
    sw = [r for r in rows if r["suite"] == "sweep_interface" and r.get("status") == "ok"]
    p = report.plot_lines(sw, os.path.join(out_dir, "kernels_sweep_interface.png"), x="N",
                          y="median_s", series="impl", panel=("op", "pass", "dtype"),
                          xlabel="interface length N", ylabel="median time (s)",
                          title="RIN kernels vs interface length (CIFAR-10 widths)")
    if p:
      paths["png"] = p
  if not quiet:
    print(f"[bench.kernels] wrote {', '.join(paths.values())}", flush=True)
  return paths


if __name__ == "__main__":
  main()
  sys.exit(0)
