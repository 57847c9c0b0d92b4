"""ROOFLINE ESTIMATE (not a measurement) of the Triton path against the plain XLA path on
an H200, per Triton launch variant and per train / sample step.

    python -m bench.triton_estimate [--out bench/results/triton_estimate.md]
    python -m bench.kernels --estimate          # the same

Ceilings (DESIGN.md section 5, measured on the lent H200): 790 TFLOP/s bf16 dense
matmul, 4.3 TB/s HBM. Every op is assumed to run at its roofline, max(FLOPs / 790T,
bytes / 4.3T), on both paths: the estimate says which path moves fewer bytes and does
fewer FLOPs, not that either reaches its roofline. "Minimum bytes" = each operand read
once from HBM and each output written once (L2 reuse is free, launch overheads are
ignored).

Per variant: the launches that bench/triton_compile_report.py's steps record, FLOPs as
the kernel executes them (the head dim padded to D_PAD, the backward's recomputed
scores included), bytes from the recorded operand and output shapes.

Per step: the kernel-backed ops of one step (every read block, latent self-attention
core and write block, in each forward pass and, for training, the backward of the
second pass; the self-conditioning pass is forward only), for
  xla     kernels/reference.py under XLA: LN fusion, cuBLAS GEMMs, attention as two
          batched GEMMs with the scores S and probabilities P in HBM (bf16), backward
          with P, dP, dS in HBM;
  triton  the same GEMMs and LN fusions (blocks.py hands them to XLA), the attention
          cores in Triton (no S/P in HBM; the backward recomputes S: 7 score-sized
          matmuls instead of 4), the read's K/V projection inside the attention kernel
          (no K/V round trip in the forward; STORE_KV writes them once for training).
  triton_fused_linear  the Triton path before commit 331d782, for the decision that
          commit made: the blocks' GEMMs as `fused_linear` launches (gemm_fl: 64x64 output
          tiles, LN / GELU / residual fused, rate scaled by the grid's fill of 132 SMs;
          the weight gradients get 16-32 CTAs), attention cores as now.
The latent tower's GEMMs and MLPs, the stem and the readout are identical on all paths
and left out, so the ratio is that of the kernel-backed work only.

The xla column here is hand-modelled. bench.gpu_static replaces it: it reads the kernels
XLA's GPU compiler really emits for the whole step (deviceless, H100/H200 targets; the
cuDNN path beside them) and costs each one (bench/results/gpu_static/).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from kernels import shapes

PEAK_FLOPS = 790e12
HBM_BPS = 4.3e12
S = 2      # bf16 bytes
F32 = 4


@dataclasses.dataclass
class Cost:
  """FLOPs, minimum bytes and `eff_flops`: the FLOPs weighted by 1 / (the fraction of the
  chip a launch's grid occupies), so that a GEMM on 16 CTAs of 132 SMs counts 132/16 times
  its FLOPs against the peak (= its FLOPs when the grid fills the chip; the default)."""
  flops: float = 0.0
  bytes: float = 0.0
  eff_flops: float | None = None

  def __post_init__(self):
    if self.eff_flops is None:
      self.eff_flops = self.flops

  def __add__(self, o):
    return Cost(self.flops + o.flops, self.bytes + o.bytes, self.eff_flops + o.eff_flops)

  def __mul__(self, k):
    return Cost(self.flops * k, self.bytes * k, self.eff_flops * k)

  @property
  def seconds(self) -> float:
    return max(self.eff_flops / PEAK_FLOPS, self.bytes / HBM_BPS)

  @property
  def bound(self) -> str:
    return "compute" if self.eff_flops / PEAK_FLOPS >= self.bytes / HBM_BPS else "memory"


# ----------------------------------------------------------------------------
# Per launch variant (from recorded launches).
# ----------------------------------------------------------------------------

_ITEM = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4}


def launch_cost(rec) -> Cost:
  c = dict(rec.constexprs)
  name = rec.kernel.__name__
  nbytes = sum(math.prod(s) * _ITEM[d] for s, d in zip(rec.in_shapes, rec.in_dtypes))
  nbytes += sum(math.prod(s) * _ITEM[d] for s, d in zip(rec.out_shapes, rec.out_dtypes))
  flops = 0.0
  if name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
              "_attn_bwd_fused_kernel"):
    qk = 2.0 * c["B"] * c["H"] * c["LQ"] * c["LK"] * c["D_PAD"]
    # fused backward: S recomputed, dP, dV, dK, dQ (the two-kernel split recomputes S and
    # dP in both).
    flops = qk * {"_attn_fwd_kernel": 2, "_attn_bwd_dkdv_kernel": 4,
                  "_attn_bwd_dq_kernel": 3, "_attn_bwd_fused_kernel": 5}[name]
  elif name == "_read_attn_kernel":
    q_blocks = rec.grid[0]
    flops = (4.0 * c["B"] * c["H"] * c["M"] * c["N"] * c["D_PAD"]
             + 4.0 * c["B"] * c["N"] * c["T"] * c["H"] * c["D_PAD"] * q_blocks)
  return Cost(flops, nbytes)


# ----------------------------------------------------------------------------
# Per step (analytic, from the config).
# ----------------------------------------------------------------------------

def gemm(r, k, n, in_b=S, out_b=S, extra=0.0) -> Cost:
  """[r, k] @ [k, n] (+ epilogue reading `extra` bytes)."""
  return Cost(2.0 * r * k * n, in_b * r * k + S * k * n + out_b * r * n + extra)


def ln(r, c, in_b) -> Cost:
  return Cost(0.0, in_b * r * c + S * r * c)


def gemm_bwd(r, k, n, in_b=S) -> Cost:
  """dX = dY W^T and dW = X^T dY of one GEMM (dY, X, W read; dX, dW written)."""
  return gemm(r, n, k, in_b=S, out_b=F32) + gemm(k, r, n, in_b=in_b, out_b=F32)


# The Triton GEMM the backend had before commit 331d782 (`fused_linear`): fixed 64x64
# output tiles, one CTA per tile, the reduction serial inside each CTA (no split-K).
FL_TILE = 64
SMS = 132
# The fraction of the bf16 peak a full grid of fused_linear's 64x64x32, 2-stage, no-TMA
# tiles reaches (1.0: generous; no GPU has measured it). break_even_efficiency varies it.
FL_EFFICIENCY = 1.0


def _fill(ctas: int) -> float:
  """Fraction of the H200's SMs a grid of `ctas` one-tile CTAs keeps busy."""
  return min(1.0, ctas / SMS)


def gemm_fl(r, k, n, in_b=S, out_b=S, extra=0.0) -> Cost:
  """[r, k] @ [k, n] as one fused_linear launch: LN prologue / GELU / residual epilogues
  fused (callers add no LN pass), rate scaled by the grid's fill of the chip."""
  c = gemm(r, k, n, in_b, out_b, extra)
  ctas = math.ceil(r / FL_TILE) * math.ceil(n / FL_TILE)
  return Cost(c.flops, c.bytes, c.flops / (_fill(ctas) * FL_EFFICIENCY))


def gemm_fl_bwd(r, k, n, in_b=S, with_ln=False, gelu=False) -> Cost:
  """fused_linear's backward of [r, k] @ [k, n]: dX = dY W^T ([r/64 x k/64] CTAs) and
  dW = X^T dY ([k/64 x n/64] CTAs, all r rows serial in each: 16-32 CTAs at RIN's widths);
  with_ln: the LN recomputed (u written) and its backward kernel (x, du read, dx written);
  with gelu: the pre-activation recomputed for GELU' (one more forward GEMM)."""
  c = gemm_fl(r, n, k, out_b=F32) + gemm_fl(k, r, n, in_b=in_b, out_b=F32)
  if with_ln:
    c += ln(r, k, in_b) + Cost(0.0, in_b * r * k + F32 * r * k + F32 * r * k)
  if gelu:
    c += gemm_fl(r, k, n)
  return c


def attn_xla(b, h, lq, lk, dh, backward=False) -> Cost:
  sc = b * h * lq * lk
  qkv = S * b * h * dh * (2 * lq + 2 * lk)
  if not backward:   # S = QK^T (written), softmax (S read, P written), O = PV (P read)
    return Cost(4.0 * sc * dh, qkv + 4 * S * sc)
  # dP = dO V^T (write), dS = P (dP - rowsum) (read P, dP; write dS), dQ, dK (read dS
  # twice), dV = P^T dO (read P): 7 score-sized tensors; reads q, k, v, o, do, writes 3.
  return Cost(8.0 * sc * dh, 2 * qkv + 7 * S * sc)


def attn_triton(b, h, lq, lk, dh, backward=False) -> Cost:
  d_pad = max(16, 1 << (dh - 1).bit_length())
  sc = b * h * lq * lk
  qkv = S * b * h * dh * (2 * lq + 2 * lk)
  lse = F32 * b * h * lq
  if not backward:
    return Cost(4.0 * sc * d_pad, qkv + lse)
  # delta (read o, do); dK/dV pass 4 matmuls, dQ pass 3 (S and dP recomputed).
  return Cost(14.0 * sc * d_pad, 2 * qkv + 3 * lse + S * b * h * dh * lq * 2)


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  batch: int
  m: int
  d: int
  n: int
  t: int
  rw_heads: int
  latent_heads: int
  blocks: int
  latent_layers: int
  t_mlp: int        # interface MLP hidden width (0: none)


def model(s: shapes.ModelShapes, batch: int) -> Model:
  """A row of the shapes table at `batch`."""
  return Model(s.name, batch, s.m, s.d, s.n, s.t, s.rw_heads, s.latent_heads, s.num_blocks,
               s.latent_layers, s.mlp_hidden)


MODELS = (model(shapes.CIFAR10, 256), model(shapes.IMAGENET64_P4, 128))


def _block_ops(md: Model, path: str, backward: bool) -> dict:
  """{op: Cost} of one RIN block's kernel-backed ops (forward, or backward alone)."""
  b, m, d, n, t = md.batch, md.m, md.d, md.n, md.t
  w = min(d, t)
  dh = w // md.rw_heads
  ldh = d // md.latent_heads
  attn = attn_triton if path == "triton" else attn_xla
  ops = {}
  # Read: LN(z) q-proj, K/V proj of x, attention, out-proj + fp32 residual.
  shared = gemm(b * m, d, w) + gemm(b * m, w, d, extra=F32 * b * m * d) + ln(b * m, d, S)
  if not backward:
    if path == "triton":   # K/V projected inside the kernel: x read, K/V never written
      kv = Cost(2.0 * b * n * t * 2 * w, S * b * n * t + S * 2 * t * w)
      core = attn(b, md.rw_heads, m, n, dh) + Cost(0, -S * b * n * 2 * w)
    else:
      kv = gemm(b * n, t, 2 * w)
      core = attn(b, md.rw_heads, m, n, dh)
    ops["read"] = shared + kv + core
  else:
    ops["read"] = (gemm_bwd(b * m, d, w) + gemm_bwd(b * m, w, d) + gemm_bwd(b * n, t, 2 * w)
                   + attn(b, md.rw_heads, m, n, dh, True) + ln(b * m, d, F32))
  # Latent self-attention cores (the projections are the latent tower's, identical).
  ops["latent_attn"] = attn(b, md.latent_heads, m, m, ldh, backward) * md.latent_layers
  # Write: LN(x) q-proj, K/V of z, attention, out-proj + residual, LN + MLP + residual.
  wr = (ln(b * n, t, S) + gemm(b * n, t, w) + gemm(b * m, d, 2 * w)
        + gemm(b * n, w, t, out_b=F32, extra=S * b * n * t))
  if md.t_mlp:
    wr += (ln(b * n, t, F32) + gemm(b * n, t, md.t_mlp)
           + gemm(b * n, md.t_mlp, t, out_b=S, extra=F32 * b * n * t))
  if backward:
    wr = wr * 2   # dX and dW GEMMs: twice the forward GEMMs' FLOPs and traffic
  ops["write"] = wr + attn(b, md.rw_heads, n, m, dh, backward)
  if backward and path == "triton":
    # The read's K/V were stored by the forward (STORE_KV): one extra write there.
    ops["read"] += Cost(0, S * b * n * 2 * w)
  return ops


def _block_ops_fused_linear(md: Model, backward: bool) -> dict:
  """{op: Cost} of one block on the Triton path as it was before commit 331d782: every
  projection and MLP GEMM a `fused_linear` launch (gemm_fl / gemm_fl_bwd), the attention
  cores the Triton kernels (as now). The read's K/V are a fused_linear GEMM written to HBM
  (the composed read that training ran then). Generous to fused_linear: its 64x64x32,
  2-stage tiles are assumed to run at the bf16 peak wherever the grid fills the chip."""
  b, m, d, n, t = md.batch, md.m, md.d, md.n, md.t
  w = min(d, t)
  dh = w // md.rw_heads
  ldh = d // md.latent_heads
  ops = {}
  if not backward:
    ops["read"] = (gemm_fl(b * m, d, w) + gemm_fl(b * n, t, 2 * w)
                   + gemm_fl(b * m, w, d, extra=F32 * b * m * d)
                   + attn_triton(b, md.rw_heads, m, n, dh))
    wr = (gemm_fl(b * n, t, w) + gemm_fl(b * m, d, 2 * w)
          + gemm_fl(b * n, w, t, out_b=F32, extra=S * b * n * t))
    if md.t_mlp:
      wr += (gemm_fl(b * n, t, md.t_mlp, in_b=F32)
             + gemm_fl(b * n, md.t_mlp, t, out_b=S, extra=F32 * b * n * t))
  else:
    ops["read"] = (gemm_fl_bwd(b * m, d, w, with_ln=True) + gemm_fl_bwd(b * m, w, d)
                   + gemm_fl_bwd(b * n, t, 2 * w)
                   + attn_triton(b, md.rw_heads, m, n, dh, True))
    wr = (gemm_fl_bwd(b * n, t, w, with_ln=True) + gemm_fl_bwd(b * m, d, 2 * w)
          + gemm_fl_bwd(b * n, w, t))
    if md.t_mlp:
      wr += (gemm_fl_bwd(b * n, t, md.t_mlp, in_b=F32, with_ln=True, gelu=True)
             + gemm_fl_bwd(b * n, md.t_mlp, t))
  ops["latent_attn"] = attn_triton(b, md.latent_heads, m, m, ldh, backward) * md.latent_layers
  ops["write"] = wr + attn_triton(b, md.rw_heads, n, m, dh, backward)
  return ops


PATHS = ("xla", "triton", "triton_fused_linear")


def step_estimate(md: Model, kind: str) -> dict:
  """{path: {op: Cost}} of one train or sample step's kernel-backed work, for the xla
  path, the Triton path (XLA GEMMs + Triton attention) and the Triton path as it was
  before 331d782 (fused_linear GEMMs)."""
  out = {}
  for path in PATHS:
    tot: dict = {}
    passes = [(False, 2 if kind == "train" else 1)]
    if kind == "train":
      passes.append((True, 1))
    for backward, times in passes:
      ops = (_block_ops_fused_linear(md, backward) if path == "triton_fused_linear"
             else _block_ops(md, path, backward))
      for op, c in ops.items():
        tot[op] = tot.get(op, Cost()) + c * (times * md.blocks)
    out[path] = tot
  return out


def _total_seconds(ops: dict) -> float:
  return sum(c.seconds for c in ops.values())


def break_even_efficiency(md: Model, kind: str) -> float | None:
  """The lowest FL_EFFICIENCY at which the fused_linear path's step is no slower than
  the XLA-GEMM Triton path's (None: slower even at the peak). Bisection, 1e-3."""
  global FL_EFFICIENCY
  saved = FL_EFFICIENCY
  try:
    def fl_wins(e):
      global FL_EFFICIENCY
      FL_EFFICIENCY = e
      est = step_estimate(md, kind)
      return _total_seconds(est["triton_fused_linear"]) <= _total_seconds(est["triton"])
    if not fl_wins(1.0):
      return None
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-3:
      mid = (lo + hi) / 2
      lo, hi = (lo, mid) if fl_wins(mid) else (mid, hi)
    return hi
  finally:
    FL_EFFICIENCY = saved


def fused_vs_composed_read(md: Model) -> tuple[Cost, Cost]:
  """Forward of the read's K/V projection + attention core: fused kernel vs an XLA GEMM
  writing K/V and the Triton attention kernel reading them."""
  b, m, d, n, t = md.batch, md.m, md.d, md.n, md.t
  w = min(d, t)
  dh = w // md.rw_heads
  fused = Cost(2.0 * b * n * t * 2 * w, S * b * n * t + S * 2 * t * w) + \
      attn_triton(b, md.rw_heads, m, n, dh) + Cost(0, -S * b * n * 2 * w)
  composed = gemm(b * n, t, 2 * w) + attn_triton(b, md.rw_heads, m, n, dh)
  return fused, composed


def markdown(variant_rows, steps) -> str:
  us = lambda c: f"{c.seconds * 1e6:.1f}"
  lines = [
      "# ESTIMATE: Triton vs XLA on an H200 (roofline, not a measurement)",
      "",
      "Generated by `python -m bench.triton_estimate` (also `python -m bench.kernels "
      "--estimate`). Ceilings 790 TFLOP/s bf16, 4.3 TB/s (DESIGN.md); every op at its "
      "roofline on both paths; bf16 compute. See the module docstring for the cost model.",
      "",
      "## Per step (kernel-backed ops only; the rest is identical XLA on both paths)",
      "",
      "| step | op | xla GFLOP | xla MB | xla us | triton GFLOP | triton MB | triton us | "
      "xla / triton |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, est in steps:
    xs, ts = est["xla"], est["triton"]
    for op in list(xs) + ["total"]:
      x = xs[op] if op != "total" else sum(xs.values(), Cost())
      tr = ts[op] if op != "total" else sum(ts.values(), Cost())
      if op == "total":   # ops run one after another: add their times
        xt, tt = sum(c.seconds for c in xs.values()), sum(c.seconds for c in ts.values())
      else:
        xt, tt = x.seconds, tr.seconds
      lines.append(f"| {name} | {op} | {x.flops / 1e9:.1f} | {x.bytes / 1e6:.0f} | "
                   f"{xt * 1e6:.1f} | {tr.flops / 1e9:.1f} | {tr.bytes / 1e6:.0f} | "
                   f"{tt * 1e6:.1f} | {xt / tt:.2f} |")
  lines += [
      "", "## Decision: the blocks' GEMMs in Triton (`fused_linear`, before 331d782) or XLA",
      "",
      "The same steps with every projection and MLP GEMM of the blocks a `fused_linear` "
      "launch (64x64 output tiles, reduction serial per CTA; LN / GELU / residual fused; "
      "assumed at the bf16 peak wherever its grid fills the 132 SMs, scaled by the fill "
      "where it does not: the weight gradients' 16-32 CTAs) against the Triton path as it "
      "is (cuBLAS GEMMs via XLA, separate LN fusions). Attention cores Triton in both.",
      "",
      "| step | op | fused_linear GFLOP | fused_linear MB | fused_linear us | "
      "XLA-GEMM triton us | xla us | fused_linear / XLA-GEMM triton |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, est in steps:
    fl, ts, xs = est["triton_fused_linear"], est["triton"], est["xla"]
    for op in list(fl) + ["total"]:
      if op == "total":
        f = sum(fl.values(), Cost())
        ft, tt, xt = (sum(c.seconds for c in e.values()) for e in (fl, ts, xs))
      else:
        f = fl[op]
        ft, tt, xt = fl[op].seconds, ts[op].seconds, xs[op].seconds
      lines.append(f"| {name} | {op} | {f.flops / 1e9:.1f} | {f.bytes / 1e6:.0f} | "
                   f"{ft * 1e6:.1f} | {tt * 1e6:.1f} | {xt * 1e6:.1f} | {ft / tt:.2f} |")
  lines += ["", "fused_linear's tile efficiency (fraction of the bf16 peak with a full grid) "
            "at which its step would tie the XLA-GEMM Triton path (cuBLAS at the peak):", ""]
  for md in MODELS:
    for kind in ("train", "sample"):
      e = break_even_efficiency(md, kind)
      lines.append(f"- {md.name}_{kind} B={md.batch}: " + (
          "none: slower even at 100% (the weight gradients' under-filled grids)" if e is None
          else f"{100 * e:.0f}% or more"))
  lines += ["", "## Fused read (K/V projection inside the attention) vs composed, forward",
            "", "| model | fused us | composed us | composed / fused |", "|---|---:|---:|---:|"]
  for md in MODELS:
    f, c = fused_vs_composed_read(md)
    lines.append(f"| {md.name} B={md.batch} | {us(f)} | {us(c)} | {c.seconds / f.seconds:.2f} |")
  lines += ["", "## Per Triton launch variant (recorded by the compile report's steps)", "",
            "| step | kernel | grid | GFLOP | MB | us | bound |", "|---|---|---|---:|---:|---:|---|"]
  for step, rec, c in variant_rows:
    lines.append(f"| {step} | {rec.kernel.__name__} | {'x'.join(map(str, rec.grid))} | "
                 f"{c.flops / 1e9:.2f} | {c.bytes / 1e6:.1f} | {us(c)} | {c.bound} |")
  return "\n".join(lines) + "\n"


def run(steps=("cifar10_train", "cifar10_sample", "imagenet64_train", "imagenet64_sample",
               "read_n4096")):
  from bench import triton_compile_report as cr
  by_name = {s.name: s for s in cr.STEPS}
  variant_rows, seen = [], set()
  for name in steps:
    for rec in cr.record_step(by_name[name]):
      k = (name, cr.variant_key(rec), rec.grid)
      if k not in seen:
        seen.add(k)
        variant_rows.append((name, rec, launch_cost(rec)))
  step_rows = []
  for md in MODELS:
    for kind in ("train", "sample"):
      step_rows.append((f"{md.name}_{kind} B={md.batch}", step_estimate(md, kind)))
  return variant_rows, step_rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench/results/triton_estimate.md")
  a = ap.parse_args(argv)
  text = markdown(*run())
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as fh:
    fh.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
