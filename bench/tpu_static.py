"""Static TPU cost table of the RIN train step and sampling forward, without a TPU.

One file over 400 lines on purpose: the step compile, the per-kernel profile and the table
share one set of assumptions (stated below), which stay beside the code that applies them.

    pip install -e .[tpu-static]          # libtpu: the XLA:TPU and Mosaic compilers
    python -m bench.tpu_static --gens v5e,v5p,v6e --tag today

Every figure this writes is an ESTIMATE from the TPU compiler's own cost models, never a
measurement on hardware. For each TPU generation (a deviceless topology,
`jax.experimental.topologies`), each published config (CIFAR-10, ImageNet-64 patch 4 and 8,
bf16, batch per chip) and each implementation ("pallas_tpu", "xla"):

* the whole step is compiled (train: value_and_grad of `rin.train_step.loss_and_metrics`;
  sample: one denoising forward, `train=False`). Every scheduled XLA op carries XLA:TPU's
  `estimated_cycles` in its backend_config; their sum is the XLA part of the step.
* every Pallas kernel of the pallas_tpu step is taken out of the step's jaxpr and compiled
  alone, with its inputs in HBM, in a second process whose libtpu dumps the Mosaic stages
  (`--xla_mosaic_dump_to`) and the static LLO profile (`--xla_jf_dump_static_llo_profile_to`).
  From the final LLO (`*post-finalize-llo.txt`): the grid (iteration_bounds) and the LLO op
  counts of one grid step, loops multiplied out by their trip counts and `pl.when` branches
  weighted by how often they fire over the grid (evaluated on the kernel's jaxpr). From the
  kernel's jaxpr: the matmul FLOPs it carries. MXU proxy = FLOPs / (vmatmul count x FLOPs of
  one full-tile vmatmul), that constant calibrated on a large lane-dense bf16 matmul kernel
  (a second such kernel with other blocks must then come out near 100%). VMEM: the scoped
  VMEM the compiled custom call reserves. Cycles: the static LLO profile of the whole kernel
  (grid loop and DMAs included).
* step estimate = sum of XLA ops' cycles + sum over kernel calls of their profile cycles,
  converted at the clock implied by XLA's own model (estimated_cycles / optimal_seconds of
  a large compute-bound matmul). Assumed: no overlap between ops (the sum is what a serial
  schedule would take), kernels cost what they cost alone, ops without an estimate
  (bitcasts, tuples, async copy starts/dones) are free.

* per model op: every XLA op and kernel call is put in the op group its HLO op_name (the
  jax/flax name stack) names (attribute: read block, write block, latent attention, latent
  MLPs, stem/latents/readout, the rest; "transpose(" marks the backward), so the two
  implementations compare op by op, with the largest XLA ops the pallas_tpu path keeps
  around its kernels. A fusion carries one of its ops' names; an op without one (a layout
  copy, a parameter convert) takes its first named operand's group. Kernel time counts the
  calls left in the compiled HLO (XLA removes dead ones the jaxpr still has).
  `--write-wins` puts each kernel-backed op class's two train-step totals into
  kernels/pallas_tpu/cost_table.py, which `implementation=None` on TPU follows.

Results: bench/results/tpu_static/<tag>.json and <tag>.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

# The step builder, the HLO reader and the op-group attribution are shared with
# bench.gpu_static (one copy); re-exported here under their old names.
from bench.static_common import (  # noqa: F401
    CLASS_GROUPS, GROUP_DOC, MODES, OP_GROUPS, _HLO_DTYPES, _INSTR, _IO_PARAMS, _OPNAME,
    _kernel_name_of, _param_group, _recording_op_classes, _short_op_name, _strip_layouts,
    attribute, hlo_ops, hlo_records, make_config, op_group, rewrite_wins, step_fn)

# name: (topology, TPU_ACCELERATOR_TYPE that quiets libtpu's host probing)
GENERATIONS = {
    "v5e": ("v5e:1x1", "v5litepod-1"),
    "v5p": ("v5p:1x1x1", "v5p-8"),
    "v6e": ("v6e:1x1", "v6e-1"),
}
CONFIGS = ("cifar10", "imagenet64_p4", "imagenet64_p8")
IMPLEMENTATIONS = ("pallas_tpu", "xla")
LABEL = ("ESTIMATES from the TPU compiler's cost models (XLA:TPU estimated_cycles, Mosaic "
         "static LLO profile), deviceless compile; not measurements")


# ----------------------------------------------------------------------------
# The steps (step_fn, make_config: bench/static_common.py) on a deviceless TPU.
# ----------------------------------------------------------------------------

def _placed(topology: str):
  import jax
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  sharding = SingleDeviceSharding(topo.devices[0])
  return topo, (lambda shape, dt: jax.ShapeDtypeStruct(tuple(shape), dt, sharding=sharding))


# ----------------------------------------------------------------------------
# Attribution (hlo_records, attribute: bench/static_common.py) of kernel calls and
# XLA:TPU's estimated cycles per op.
# ----------------------------------------------------------------------------

def kernel_key_of_call(r, keys):
  """The kernel_key (of `keys`) of one HLO custom-call record: same kernel name and
  operand shapes; else the only key with that name; else None."""
  same = [k for k in keys if k.split(" grid=")[0] == r["kernel"]]
  if r.get("in_shapes") is not None:
    exact = [k for k in same if k.endswith(f" in=({r['in_shapes']})")]
    if len(exact) == 1:
      return exact[0]
  return same[0] if len(same) == 1 else None


def group_costs(records, kernel_cycles, top=15):
  """Per group: XLA cycles (fwd, bwd), kernel cycles and calls, and its largest XLA ops.

  `records`: attributed hlo_records of one step; `kernel_cycles(record)`: cycles of one
  kernel call (None if unknown). Returns {group: dict}, every OP_GROUPS key present."""
  out = {g: dict(xla_cycles=0, xla_fwd_cycles=0, xla_bwd_cycles=0, xla_ops=0,
                 kernel_cycles=0, kernel_calls=0, kernel_calls_unknown=0, kernels={},
                 top_xla_ops=[]) for g in OP_GROUPS}
  for r in records:
    g = out[r["group"]]
    if r["kernel"] is not None:
      g["kernel_calls"] += 1
      c = kernel_cycles(r)
      if c is None:
        g["kernel_calls_unknown"] += 1
      else:
        g["kernel_cycles"] += c
        kk = f"{r['kernel']} ({r['direction']})"
        g["kernels"][kk] = g["kernels"].get(kk, 0) + c
    elif r["cycles"]:
      g["xla_cycles"] += r["cycles"]
      g[f"xla_{r['direction']}_cycles"] += r["cycles"]
      g["xla_ops"] += 1
      g["top_xla_ops"].append(r)
  for g in out.values():
    g["top_xla_ops"] = [
        dict(name=r["name"], opcode=r["opcode"], shape=r["shape"], cycles=r["cycles"],
             direction=r["direction"], op_name=_short_op_name(r["op_name"]),
             inherited=bool(r.get("inherited")))
        for r in sorted(g["top_xla_ops"], key=lambda r: -r["cycles"])[:top]]
  return out



def _scoped_vmem(text: str):
  m = re.search(r'tpu_custom_call.*?"used_scoped_memory_configs":\[([^\]]*)\]', text)
  if not m:
    return None
  return sum(int(s) for s in re.findall(r'"size":"(\d+)"', m.group(1)))


# ----------------------------------------------------------------------------
# Kernel jaxprs: matmul FLOPs and pl.when frequencies.
# ----------------------------------------------------------------------------

def find_kernels(jaxpr):
  """Every pallas_call equation in a (closed) jaxpr, nested calls included, in order."""
  from jax._src.pallas import pallas_call as pc
  found = []

  def walk(j):
    for e in j.eqns:
      if e.primitive is pc.pallas_call_p:
        found.append(e)
        continue
      for v in e.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(getattr(jaxpr, "jaxpr", jaxpr))
  return found


def kernel_key(e) -> str:
  grid = tuple(e.params["grid_mapping"].grid)
  ins = ",".join(f"{v.aval.dtype}{list(v.aval.shape)}" for v in e.invars)
  return f"{e.params['name']} grid={list(grid)} in=({ins})"


_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
        "gt": np.greater, "ge": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
        "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
        "min": np.minimum}


def kernel_flops_and_conds(e):
  """(matmul FLOPs of one whole call, [frequency of each top-level cond, branch 1]).

  Frequencies are exact over the grid: program ids are numpy arrays of the grid's shape
  and the scalar integer/bool ops feeding each `cond` are evaluated on them."""
  from jax._src import core as jcore
  grid = tuple(e.params["grid_mapping"].grid)
  steps = math.prod(grid)
  ids = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
  kj = e.params["jaxpr"]
  conds = []

  def val(env, a):
    if isinstance(a, jcore.Literal):
      return np.asarray(a.val)
    return env.get(a)

  def walk(j, weight, env, top):
    flops = 0.0
    for q in j.eqns:
      name = q.primitive.name
      if name == "program_id":
        env[q.outvars[0]] = ids[q.params["axis"]]
      elif name == "num_programs":
        env[q.outvars[0]] = np.asarray(grid[q.params["axis"]])
      elif name in _CMP:
        a, b = (val(env, x) for x in q.invars)
        if a is not None and b is not None:
          env[q.outvars[0]] = _CMP[name](a, b)
      elif name == "not":
        a = val(env, q.invars[0])
        if a is not None:
          env[q.outvars[0]] = np.logical_not(a)
      elif name == "convert_element_type":
        a = val(env, q.invars[0])
        if a is not None:
          env[q.outvars[0]] = a.astype(np.int64)
      elif name == "dot_general":
        (lc, _), _ = q.params["dimension_numbers"]
        k = math.prod(q.invars[0].aval.shape[d] for d in lc)
        flops += weight * 2 * math.prod(q.outvars[0].aval.shape) * k
      elif name == "cond":
        idx = val(env, q.invars[0])
        branches = q.params["branches"]
        if idx is None:
          freqs = [1.0] * len(branches)        # unknown predicate: count every branch
        else:
          idx = np.broadcast_to(idx, grid) if grid else idx
          freqs = [float(np.mean(idx == b)) for b in range(len(branches))]
        if top:
          conds.append(freqs[-1])
        for br, fq in zip(branches, freqs):
          flops += walk(br.jaxpr, weight * fq, {}, False)
      elif name in ("scan",):
        flops += walk(q.params["jaxpr"].jaxpr, weight * q.params["length"], dict(env), False)
      elif name == "while":
        flops += walk(q.params["body_jaxpr"].jaxpr, weight, {}, False)
      else:
        for v in q.params.values():
          if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            flops += walk(v.jaxpr, weight, {}, False)
    return flops

  per_step = walk(kj, 1.0, {}, True)
  return per_step * steps, conds


# ----------------------------------------------------------------------------
# Final LLO: op counts per grid step.
# ----------------------------------------------------------------------------

_CONST = re.compile(r"^\s*(%[\w#:]+) = llo\.constant \{value = (-?\d+) : i\d+\}")
_FOR = re.compile(r"scf\.for %[\w#]+ = (%[\w#:]+) to (%[\w#:]+) step (%[\w#:]+)")
_OP = re.compile(r'^\s*(?:%[\w#:]+(?:, %[\w#:]+)* = )?"?((?:llo|scf|arith)\.[\w.]+)')


def parse_llo(text: str, cond_freqs):
  """{'grid': [...], 'ops': {op: count per grid step}, 'exact': bool}.

  `cond_freqs`: how often each top-level pl.when fires (kernel_flops_and_conds), matched
  in order to the top-level scf.if regions; Mosaic folds a pl.when whose predicate is
  constant over the grid, so those are dropped before matching. Loops are multiplied by
  their trip counts."""
  grid = re.search(r"iteration_bounds = array<i64(?::\s*([\d, ]*))?>", text)
  grid = [int(g) for g in grid.group(1).split(",")] if grid and grid.group(1) else []
  consts, ops, exact = {}, {}, True
  lines = text.splitlines()
  n_top_ifs = 0
  depth_kinds = []
  for line in lines:
    s = line.strip()
    if s.startswith("scf.if") or re.match(r"^%[\w#:]+(?:, %[\w#:]+)* = scf\.if", s):
      if sum(1 for k in depth_kinds if k[0] in ("if", "for")) == 0:
        n_top_ifs += 1
    if s.endswith("{") and not s.startswith("}"):
      depth_kinds.append(("for" if "scf.for" in s else "if" if "scf.if" in s else "other", 1))
    elif s.startswith("}") and depth_kinds:
      if s.endswith("{"):      # } else {
        continue
      depth_kinds.pop()
  freqs = list(cond_freqs)
  if len(freqs) != n_top_ifs:
    freqs = [f for f in freqs if 0.0 < f < 1.0]
  if len(freqs) != n_top_ifs:
    exact = False
    freqs = [1.0] * n_top_ifs
  stack = [1.0]
  kinds = []
  top_if = 0
  for line in lines:
    s = line.strip()
    mc = _CONST.match(line)
    if mc:
      consts[mc.group(1)] = int(mc.group(2))
    if s.startswith("}"):
      if s.endswith("{"):                                   # } else { : the other branch
        if kinds and kinds[-1][0] == "if":
          parent = stack[-2]
          stack[-1] = parent * (1.0 - kinds[-1][1]) if kinds[-1][1] < 1.0 else parent
        continue
      if kinds:
        kinds.pop()
        stack.pop()
      continue
    mo = _OP.match(line)
    if mo and not s.startswith("func.func") and not s.startswith("module"):
      op = mo.group(1)
      if op not in ("scf.yield",):
        ops[op] = ops.get(op, 0.0) + stack[-1]
    if s.endswith("{"):
      mult, kind = 1.0, ("other", 1.0)
      mf = _FOR.search(s)
      if mf:
        lo, hi, st = (consts.get(x) for x in mf.groups())
        if None in (lo, hi, st) or st == 0:
          exact = False
        else:
          mult = max(0, -(-(hi - lo) // st))
        kind = ("for", 1.0)
      elif "scf.if" in s:
        if not any(k[0] in ("if", "for") for k in kinds):
          f = freqs[top_if] if top_if < len(freqs) else 1.0
          top_if += 1
        else:
          f, exact = 1.0, False
        mult, kind = f, ("if", f)
      kinds.append(kind)
      stack.append(stack[-1] * mult)
  return {"grid": grid, "ops": {k: round(v, 3) for k, v in sorted(ops.items())}, "exact": exact}


def op_classes(ops):
  cls = {"vmatmul": 0.0, "vmatres": 0.0, "vector_alu": 0.0, "vector_load": 0.0,
         "vector_store": 0.0, "dma": 0.0, "scalar": 0.0}
  for op, n in ops.items():
    o = op[len("llo."):] if op.startswith("llo.") else op
    if "dma" in o:
      cls["dma"] += n
    elif o.startswith("vmatmul"):
      cls["vmatmul"] += n
    elif o.startswith("vmatres") or o.startswith("vmatpush") or o.startswith("vlatch"):
      cls["vmatres"] += n
    elif o.startswith("vector_load") or o.startswith("vld"):
      cls["vector_load"] += n
    elif o.startswith("vector_store") or o.startswith("vst"):
      cls["vector_store"] += n
    elif o.startswith("v"):
      cls["vector_alu"] += n
    elif o.startswith("s"):
      cls["scalar"] += n
  return {k: round(v, 3) for k, v in cls.items()}


# ----------------------------------------------------------------------------
# Worker processes (one libtpu per process; flags are read once at libtpu start).
# ----------------------------------------------------------------------------

def libtpu_site() -> str | None:
  """Where libtpu is: "" importable here, else the `pip install --target` folder that has it
  (RIN_LIBTPU_SITE, else scripts/setup.sh's .venv/libtpu_site), else None."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is not None:
    return ""
  site = os.environ.get("RIN_LIBTPU_SITE") or os.path.join(sys.prefix, "libtpu_site")
  return site if os.path.isdir(os.path.join(site, "libtpu")) else None


def libtpu_version() -> str:
  """libtpu's version, installed here or in libtpu_site()'s folder."""
  import importlib.metadata as md
  try:
    return md.version("libtpu")
  except md.PackageNotFoundError:
    for d in md.distributions(path=[libtpu_site() or ""]):
      if d.metadata["Name"].lower() == "libtpu":
        return d.version
    return "unknown"


def _libtpu_env(gen: str, flags: str = ""):
  env = dict(os.environ)
  if libtpu_site():
    env["PYTHONPATH"] = os.pathsep.join(p for p in (libtpu_site(), env.get("PYTHONPATH"))
                                        if p)
  env["TPU_ACCELERATOR_TYPE"] = GENERATIONS[gen][1]
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"     # other compiles on this host hold the lockfile
  env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + flags).strip()
  env["JAX_PLATFORMS"] = "cpu"                # deviceless: the TPU is only a compile target
  # The kernels size their VMEM budget (kernels.pallas_tpu.common.vmem_limit_bytes) by the
  # target generation; the default device here is the CPU, so name the target.
  env["RIN_TPU_GENERATION"] = gen
  return env



def wins_rows(result):
  """{shape_class: row} for kernels/pallas_tpu/cost_table.WINS from a result with both
  implementations of a step: per kernel-backed group with one op class, the group's total
  us per step (kernels + XLA ops) in each path. Train steps only (what a default is for)."""
  rows = {}
  for g in result["generations"]:
    by = {(s["config"], s["mode"], s["impl"]): s for s in g["steps"] if "groups" in s}
    for (cfg, mode, impl), p in by.items():
      x = by.get((cfg, mode, "xla"))
      if impl != "pallas_tpu" or mode != "train" or x is None:
        continue
      for grp, keys in p.get("op_classes", {}).items():
        if len(keys) != 1:
          continue
        rows[keys[0]] = dict(
            pallas_tpu_us=round(p["groups"][grp]["total_us"], 1),
            xla_us=round(x["groups"][grp]["total_us"], 1),
            device=f"{g['generation']} (XLA:TPU cost model ESTIMATE, {cfg} {mode}, batch "
                   f"{result['batch']}, op group {grp})",
            source=f"bench/results/tpu_static/{result['tag']}.json")
  return rows


def write_wins(rows, path=None):
  """Rewrites WINS in kernels/pallas_tpu/cost_table.py (docstring kept; other keys kept)."""
  from kernels.pallas_tpu import cost_table
  return rewrite_wins(cost_table, rows, path)


def worker_steps(gen, configs, modes, impls, batch, hlo_dir=None):
  """Whole steps: XLA cycles, kernel calls, clock calibration; each op's record with its
  model-op group (attribute) for the per-group tables; the compiled HLO text gzipped into
  hlo_dir if given."""
  import jax
  import jax.numpy as jnp
  topo, sds = _placed(GENERATIONS[gen][0])
  out = {"clock": _clock(sds), "steps": []}
  for cfg in configs:
    for mode in modes:
      for impl in impls:
        t0 = time.time()
        fn, args = step_fn(cfg, impl, mode, batch, sds)
        with _recording_op_classes() as classes:
          jaxpr = jax.make_jaxpr(fn)(*args)
        kernels = {}
        for e in find_kernels(jaxpr):
          k = kernel_key(e)
          kernels[k] = kernels.get(k, 0) + 1
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        if hlo_dir:
          import gzip
          os.makedirs(hlo_dir, exist_ok=True)
          with gzip.open(os.path.join(hlo_dir, f"{gen}_{cfg}_{mode}_{impl}.hlo.txt.gz"),
                         "wt") as f:
            f.write(text)
        records = attribute(hlo_records(text))
        ops = [(r["name"], r["opcode"], r["cycles"], r["kernel"]) for r in records]
        xla_cycles = sum(c for _, op, c, k in ops if c is not None and k is None)
        calls = [k for _, _, _, k in ops if k is not None]
        top = sorted(((c, n, op) for n, op, c, k in ops if c and k is None), reverse=True)[:12]
        no_est = {}
        for _, op, c, k in ops:
          if c is None and k is None:
            no_est[op] = no_est.get(op, 0) + 1
        out["steps"].append(dict(
            config=cfg, mode=mode, impl=impl, batch=batch, xla_cycles=xla_cycles,
            xla_ops=sum(1 for o in ops if o[2] is not None and o[3] is None),
            ops_without_estimate=no_est, kernel_calls_hlo=len(calls),
            kernel_calls_jaxpr=kernels, top_xla_ops=[dict(cycles=c, name=n, opcode=o)
                                                     for c, n, o in top],
            compile_s=round(time.time() - t0, 1),
            op_classes={g: sorted(v) for g, v in classes.items()},
            op_records=[{k: r[k] for k in ("name", "opcode", "cycles", "kernel", "op_name",
                                           "shape", "in_shapes", "group", "direction")}
                        | ({"inherited": True} if r.get("inherited") else {})
                        for r in records if r["cycles"] or r["kernel"]]))
        print(f"[{gen}] {cfg} {mode} {impl}: {xla_cycles} XLA cycles, {len(calls)} kernel "
              f"calls ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
  return out


def _clock(sds):
  """Cycles per second implied by XLA:TPU's model: estimated_cycles of a large bf16
  matmul over its roofline optimal_seconds (the cost model puts it at the MXU peak)."""
  import jax
  import jax.numpy as jnp
  n = 8192
  a = sds((n, n), jnp.bfloat16)
  c = jax.jit(jnp.dot).lower(a, a).compile()
  cyc = sum(x for _, _, x, k in hlo_ops(c.as_text()) if x)
  secs = c.cost_analysis()["optimal_seconds"]
  return {"hz": cyc / secs, "matmul": n, "estimated_cycles": cyc, "optimal_seconds": secs,
          "flops": 2 * n ** 3}


def _calibration_kernels():
  """Lane-dense bf16 matmul kernels: (name, fn, args(sds)) for the vmatmul constant."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  def build(name, n, bm, bn, bk):
    def kern(a_ref, b_ref, o_ref, acc):
      @pl.when(pl.program_id(2) == 0)
      def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)
      acc[...] += jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)

      @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
      def _():
        o_ref[...] = acc[...].astype(o_ref.dtype)

    def f(a, b):
      return pl.pallas_call(
          kern, grid=(n // bm, n // bn, n // bk),
          in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
                    pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))],
          out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
          out_shape=jax.ShapeDtypeStruct((n, n), jnp.bfloat16),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
          compiler_params=pltpu.CompilerParams(
              dimension_semantics=("parallel", "parallel", "arbitrary")), name=name)(a, b)
    return name, f, n

  return [build("calib_matmul_512", 2048, 512, 512, 512),
          build("check_matmul_256x1024x512", 2048, 256, 1024, 512)]


def _compile_kernel_alone(fn, args, dump_dir, name):
  import jax
  for f in glob.glob(os.path.join(dump_dir, "*")):
    os.remove(f)
  compiled = jax.jit(fn).lower(*args).compile()
  llo = sorted(glob.glob(os.path.join(dump_dir, f"*{name}*post-finalize-llo.txt")))
  return compiled, open(llo[-1]).read() if llo else ""


def _export(fn, args, path):
  """Serialized jax.export of a kernel alone, for the static-profile worker."""
  import jax
  exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  with open(path, "wb") as f:
    f.write(exp.serialize())


def _reused(path, gen):
  """(kernels, calibration) records of generation `gen` in an earlier result JSON."""
  if not path:
    return {}, {}
  for g in json.load(open(path))["generations"]:
    if g["generation"] == gen:
      keep = ("name", "grid", "flops", "llo_ops_per_step", "llo_classes", "llo_exact",
              "vmem_bytes", "semantics", "profile_cycles")
      ks = {k: dict({f: v[f] for f in keep if f in v}, reused_from=path)
            for k, v in g["kernels"].items() if v.get("profile_cycles")}
      cal = {c["name"]: dict(c, reused_from=path) for c in g["calibration"]
             if c.get("profile_cycles")}
      return ks, cal
  return {}, {}


def worker_kernels(gen, configs, modes, batch, reuse=None):
  """Each distinct Pallas kernel of the pallas_tpu steps compiled alone. With `reuse` (an
  earlier result JSON), a kernel whose key (name, grid, input shapes) is there, with a
  profile, takes that record instead of being compiled and profiled again."""
  import jax
  import jax.numpy as jnp
  from jax._src.pallas import pallas_call as pc
  dump_dir, export_dir = os.environ["RIN_TPU_STATIC_DUMP"], os.environ["RIN_TPU_STATIC_EXPORT"]
  topo, sds = _placed(GENERATIONS[gen][0])
  out = {"calibration": [], "kernels": {}, "exports": []}
  reused_kernels, reused_cal = _reused(reuse, gen)
  for name, f, n in _calibration_kernels():
    if name in reused_cal:
      out["calibration"].append(reused_cal[name])
      continue
    a = sds((n, n), jnp.bfloat16)
    e = find_kernels(jax.make_jaxpr(f)(a, a))[0]
    flops, conds = kernel_flops_and_conds(e)
    compiled, text = _compile_kernel_alone(f, (a, a), dump_dir, name)
    llo = parse_llo(text, conds)
    steps = math.prod(llo["grid"]) or 1
    vm = op_classes(llo["ops"])["vmatmul"]
    path = os.path.join(export_dir, f"{len(out['exports']):04d}.bin")
    _export(f, (a, a), path)
    out["exports"].append(dict(key=name, path=path, name=name))
    out["calibration"].append(dict(name=name, flops=2.0 * n ** 3, jaxpr_flops=flops,
                                   grid=llo["grid"], vmatmul_per_step=vm,
                                   vmatmul_total=vm * steps))
  for cfg in configs:
    for mode in modes:
      fn, args = step_fn(cfg, "pallas_tpu", mode, batch, sds)
      for e in find_kernels(jax.make_jaxpr(fn)(*args)):
        key = kernel_key(e)
        if key in out["kernels"]:
          continue
        if key in reused_kernels:
          out["kernels"][key] = reused_kernels[key]
          print(f"[{gen}] kernel {key[:100]} reused from {reuse}", file=sys.stderr, flush=True)
          continue
        t0 = time.time()
        flops, conds = kernel_flops_and_conds(e)
        kargs = [sds(v.aval.shape, v.aval.dtype) for v in e.invars]
        params = dict(e.params)
        kfn = lambda *a, params=params: pc.pallas_call_p.bind(*a, **params)
        compiled, text = _compile_kernel_alone(kfn, kargs, dump_dir, params["name"])
        llo = parse_llo(text, conds)
        path = os.path.join(export_dir, f"{len(out['exports']):04d}.bin")
        _export(kfn, kargs, path)
        out["exports"].append(dict(key=key, path=path, name=params["name"]))
        cp = e.params["compiler_params"]
        cp = cp.get("mosaic_tpu", cp) if isinstance(cp, dict) else cp
        out["kernels"][key] = dict(
            name=params["name"], grid=llo["grid"] or list(e.params["grid_mapping"].grid),
            flops=flops, llo_ops_per_step=llo["ops"], llo_classes=op_classes(llo["ops"]),
            llo_exact=llo["exact"], vmem_bytes=_scoped_vmem(compiled.as_text()),
            semantics=list(getattr(cp, "dimension_semantics", None) or ()))
        print(f"[{gen}] kernel {key[:100]} ({time.time() - t0:.0f} s)", file=sys.stderr,
              flush=True)
  return out


def read_profile_cycles(prof_dir):
  """estimated_cycles of the static LLO profile in prof_dir, or None. Any profile there is
  the current kernel's (the directory is cleared before each kernel): the file is named
  after the jitted function (`_lambda_.1_TPU v5 lite_static_llo_profile.textproto`), not
  the kernel, so it cannot be matched by the kernel's name."""
  for p in glob.glob(os.path.join(prof_dir, "*static_llo_profile*")):
    m = re.search(r"estimated_cycles:\s*(\d+)", open(p, errors="replace").read())
    if m:
      return int(m.group(1))
  return None


def worker_profile(gen, exports, start, results_path):
  """Static LLO profile of each exported kernel, appended to results_path as JSON lines.

  Inputs and outputs take the layouts the kernel wants (Layout.AUTO), so XLA adds no layout
  copies (the profiler cannot model their DMAs and aborts). The profiler also aborts the
  process on some kernels after writing their profile: the file is read as soon as it
  appears, from a second thread, and the parent restarts this worker after an abort."""
  import threading
  import jax
  from jax.experimental.layout import Format, Layout
  topo, sds = _placed(GENERATIONS[gen][0])
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  prof_dir = os.environ["RIN_TPU_STATIC_PROF"]

  def record(**kw):
    with open(results_path, "a") as f:
      f.write(json.dumps(kw) + "\n")

  # The previous worker may have aborted right after the profiler wrote the previous
  # kernel's profile, before it was read: it is still in prof_dir (cleared per kernel).
  if start > 0:
    left = read_profile_cycles(prof_dir)
    if left is not None:
      record(index=start - 1, cycles=left)

  for i in range(start, len(exports)):
    x = exports[i]
    record(index=i, started=True)
    for p in glob.glob(os.path.join(prof_dir, "*")):
      os.remove(p)
    exp = jax.export.deserialize(bytearray(open(x["path"], "rb").read()))
    args = [sds(a.shape, a.dtype) for a in exp.in_avals]
    auto = Format(Layout.AUTO, sharding)
    fn = jax.jit(exp.call, in_shardings=tuple(auto for _ in args),
                 out_shardings=auto)
    done = threading.Event()
    th = threading.Thread(target=lambda: (fn.lower(*args).compile(), done.set()), daemon=True)
    th.start()
    cycles = None
    while cycles is None and not done.is_set():
      time.sleep(0.2)
      cycles = read_profile_cycles(prof_dir)
    if cycles is None:
      cycles = read_profile_cycles(prof_dir)
    record(index=i, cycles=cycles)
    print(f"[{gen}] profile {x['key'][:100]}: {cycles} cycles", file=sys.stderr, flush=True)
    th.join()


# ----------------------------------------------------------------------------
# Parent: run the workers, combine, write JSON + markdown.
# ----------------------------------------------------------------------------

def _worker_cmd(kind, gen, args, outf):
  return [sys.executable, "-m", "bench.tpu_static", "--_worker", kind, "--_out", outf,
          "--gens", gen, "--configs", ",".join(args.configs), "--modes", ",".join(args.modes),
          "--impls", ",".join(args.impls), "--batch", str(args.batch)] + (
              ["--reuse-kernels", args.reuse_kernels] if args.reuse_kernels else []) + (
              ["--hlo-dir", args.hlo_dir] if args.hlo_dir else [])


def run_generation(gen, args):
  """Steps worker, kernels worker (Mosaic dump) and profile worker(s) for one generation."""
  with tempfile.TemporaryDirectory() as tmp:
    dirs = {k: os.path.join(tmp, k) for k in ("dump", "prof", "export")}
    for d in dirs.values():
      os.makedirs(d)
    extra = {"RIN_TPU_STATIC_DUMP": dirs["dump"], "RIN_TPU_STATIC_PROF": dirs["prof"],
             "RIN_TPU_STATIC_EXPORT": dirs["export"]}
    res = {}
    for kind, flags in (("steps", ""), ("kernels", f"--xla_mosaic_dump_to={dirs['dump']}")):
      outf = os.path.join(tmp, kind + ".json")
      r = subprocess.run(_worker_cmd(kind, gen, args, outf),
                         env=dict(_libtpu_env(gen, flags), **extra), stdout=subprocess.DEVNULL)
      if r.returncode:
        raise RuntimeError(f"tpu_static {kind} worker for {gen} failed (exit {r.returncode})")
      res[kind] = json.load(open(outf))
    exports = res["kernels"]["exports"]
    json.dump(exports, open(os.path.join(tmp, "exports.json"), "w"))
    results = os.path.join(tmp, "profile.jsonl")
    cycles, start = {}, 0
    while start < len(exports):
      cmd = _worker_cmd("profile", gen, args, results) + ["--_start", str(start), "--_exports",
                                                          os.path.join(tmp, "exports.json")]
      subprocess.run(cmd, env=dict(_libtpu_env(
          gen, f"--xla_jf_dump_static_llo_profile_to={dirs['prof']}"), **extra),
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      last = start
      for line in open(results) if os.path.exists(results) else ():
        rec = json.loads(line)
        last = max(last, rec["index"])
        if "cycles" in rec:
          cycles[rec["index"]] = rec["cycles"]
      if cycles.get(last) is None:
        # Aborted after writing the profile (or before): read what it left.
        cycles[last] = read_profile_cycles(dirs["prof"])
      if cycles[last] is None:
        print(f"[{gen}] static profile aborted on {exports[last]['key'][:100]}",
              file=sys.stderr, flush=True)
      start = last + 1
    for i, x in enumerate(exports):
      target = (res["kernels"]["kernels"].get(x["key"])
                or next(c for c in res["kernels"]["calibration"] if c["name"] == x["key"]))
      target["profile_cycles"] = cycles.get(i)
    res["kernels"].pop("exports")
    return res["steps"], res["kernels"]


def combine(gen, steps, kern):
  """Per-generation result: calibration, kernels, per-step totals."""
  cal = kern["calibration"][0]
  vm_flops = cal["flops"] / cal["vmatmul_total"] if cal["vmatmul_total"] else float("nan")
  hz = steps["clock"]["hz"]
  kernels = {}
  for key, k in kern["kernels"].items():
    steps_n = math.prod(k["grid"]) or 1
    vm = k["llo_classes"]["vmatmul"] * steps_n
    k = dict(k, mxu_proxy=(k["flops"] / (vm * vm_flops)) if vm else None,
             grid_steps=steps_n,
             profile_us=(k["profile_cycles"] / hz * 1e6) if k["profile_cycles"] else None)
    kernels[key] = k
  checks = [dict(name=c["name"], mxu_proxy=c["flops"] / (c["vmatmul_total"] * vm_flops),
                 profile_cycles=c["profile_cycles"]) for c in kern["calibration"]]
  rows = []
  for s in steps["steps"]:
    s = dict(s)
    records = s.pop("op_records", None)
    if records is not None:
      keys = list(s["kernel_calls_jaxpr"])

      def call_cycles(r, keys=keys):
        k = kernels.get(kernel_key_of_call(r, keys) or "")
        return k["profile_cycles"] if k and k.get("profile_cycles") else None

      s["groups"] = group_costs(records, call_cycles)
      for g in s["groups"].values():
        g.update(xla_us=g["xla_cycles"] / hz * 1e6, kernel_us=g["kernel_cycles"] / hz * 1e6,
                 total_us=(g["xla_cycles"] + g["kernel_cycles"]) / hz * 1e6)
    kc = 0
    missing = []
    for key, n in s["kernel_calls_jaxpr"].items():
      k = kernels.get(key)
      if k is None or not k["profile_cycles"]:
        missing.append(key)
        continue
      kc += n * k["profile_cycles"]
    rows.append(step_totals(dict(s, kernel_cycles_jaxpr=kc, kernels_without_profile=missing),
                            hz))
  return dict(generation=gen, clock=steps["clock"], vmatmul_flops=vm_flops,
              calibration=kern["calibration"], calibration_checks=checks, kernels=kernels,
              steps=rows)


def step_totals(s, hz):
  """kernel/total cycles and ms of one step row. Kernel cycles: the sum over the kernel
  calls left in the compiled HLO (per group, group_costs) when every one of them has a
  profile; else n x profile over the jaxpr's calls (kernel_cycles_jaxpr), which also counts
  calls XLA removes as dead (the self-conditioning pass's last write block)."""
  kc = s["kernel_cycles_jaxpr"]
  source = "jaxpr calls"
  groups = s.get("groups")
  if groups and not any(g["kernel_calls_unknown"] for g in groups.values()):
    kc, source = sum(g["kernel_cycles"] for g in groups.values()), "hlo calls"
  total = s["xla_cycles"] + kc
  return dict(s, kernel_cycles=kc, kernel_cycles_source=source, total_cycles=total,
              xla_ms=s["xla_cycles"] / hz * 1e3, kernel_ms=kc / hz * 1e3,
              total_ms=total / hz * 1e3)


def remake(path):
  """Re-derives the step totals of a result JSON (step_totals) and rewrites it and its .md."""
  result = json.load(open(path))
  for g in result["generations"]:
    for i, s in enumerate(g["steps"]):
      s.setdefault("kernel_cycles_jaxpr", s["kernel_cycles"])
      g["steps"][i] = step_totals(s, g["clock"]["hz"])
  json.dump(result, open(path, "w"), indent=1)
  open(path[:-len(".json")] + ".md", "w").write(markdown(result))
  return result


def markdown(result) -> str:
  out = [f"# TPU static cost table: {result['tag']}", "",
         f"**{LABEL}.** libtpu {result['libtpu']}, jax {result['jax']}, batch {result['batch']} "
         f"per chip, bf16. Command: `{result['command']}`.", "",
         "Assumptions: a step costs the sum of its ops (no overlap); each kernel call costs its "
         "static LLO profile compiled alone with HBM inputs; ops without an estimate are free; "
         "cycles -> time at the clock XLA's model implies (estimated_cycles / optimal_seconds of "
         "an 8192^3 bf16 matmul). MXU proxy = matmul FLOPs / (vmatmul pushes x FLOPs of one "
         "full-tile vmatmul, calibrated on a 2048^3 lane-dense matmul kernel).", ""]
  for g in result["generations"]:
    gen = g["generation"]
    out += [f"## {gen}", "",
            f"Clock {g['clock']['hz'] / 1e9:.3f} GHz (implied); one full-tile vmatmul = "
            f"{g['vmatmul_flops']:.0f} FLOPs; calibration check: " + ", ".join(
                f"{c['name']} {100 * c['mxu_proxy']:.0f}%" for c in g["calibration_checks"]), "",
            "| config | mode | pallas_tpu ms (XLA + kernels) | xla ms | ratio | kernel calls |",
            "|---|---|---:|---:|---:|---:|"]
    by = {(s["config"], s["mode"], s["impl"]): s for s in g["steps"]}
    for (cfg, mode, impl), s in by.items():
      if impl != "pallas_tpu":
        continue
      x = by.get((cfg, mode, "xla"))
      ratio = f"{s['total_ms'] / x['total_ms']:.2f}x" if x else "-"
      out.append(f"| {cfg} | {mode} | {s['total_ms']:.2f} ({s['xla_ms']:.2f} + "
                 f"{s['kernel_ms']:.2f}) | {x['total_ms']:.2f} | {ratio} | "
                 f"{s['kernel_calls_hlo']} |" if x else
                 f"| {cfg} | {mode} | {s['total_ms']:.2f} | - | - | {s['kernel_calls_hlo']} |")
    for s in g["steps"]:
      if s.get("kernel_cycles_source") == "hlo calls" and (
          s["kernel_cycles"] != s.get("kernel_cycles_jaxpr", s["kernel_cycles"])):
        hz = g["clock"]["hz"]
        out += ["", f"{s['config']} {s['mode']} {s['impl']}: kernel time counts the "
                f"{s['kernel_calls_hlo']} kernel calls of the compiled HLO; the jaxpr has "
                f"{sum(s['kernel_calls_jaxpr'].values())} (XLA removes the dead ones), which "
                f"would give {s['kernel_cycles_jaxpr'] / hz * 1e3:.2f} ms of kernels, "
                f"{(s['xla_cycles'] + s['kernel_cycles_jaxpr']) / hz * 1e3:.2f} ms in all "
                "(how tables before scopes_v5e counted)."]
    out += ["", "Per kernel (one call; LLO op counts per grid step, loops and pl.when weighted):",
            "", "| kernel | grid | calls/step (cfg mode: n) | MFLOP | MXU proxy | vmatmul | "
            "vector ALU | vld | vst | DMA | VMEM KiB | cycles | us |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, k in g["kernels"].items():
      uses = ", ".join(f"{s['config']} {s['mode']}: {s['kernel_calls_jaxpr'][key]}"
                       for s in g["steps"] if key in s["kernel_calls_jaxpr"])
      c = k["llo_classes"]
      prox = f"{100 * k['mxu_proxy']:.0f}%" if k["mxu_proxy"] is not None else "-"
      if not k["llo_exact"]:
        prox += " (approx)"
      vm = f"{k['vmem_bytes'] / 1024:.0f}" if k["vmem_bytes"] else "-"
      us = f"{k['profile_us']:.1f}" if k["profile_us"] else "-"
      ins = key.split(" in=")[1]
      out.append(f"| {k['name']} `{ins}` | {k['grid']} | {uses} | {k['flops'] / 1e6:.1f} | "
                 f"{prox} | {c['vmatmul']:.0f} | {c['vector_alu']:.0f} | {c['vector_load']:.0f} "
                 f"| {c['vector_store']:.0f} | {c['dma']:.0f} | {vm} | "
                 f"{k['profile_cycles'] or '-'} | {us} |")
    out += group_markdown(g)
    out += ["", "Largest XLA ops of each step (estimated cycles):", ""]
    for s in g["steps"]:
      tops = ", ".join(f"{t['name']} {t['cycles']}" for t in s["top_xla_ops"][:5])
      out.append(f"- {s['config']} {s['mode']} {s['impl']}: {tops}")
    out.append("")
  return "\n".join(out)


KERNEL_GROUPS = ("read", "write", "latent_attn")


def group_markdown(g) -> list:
  """Per-group tables of one generation: each step's groups, then xla vs pallas_tpu side
  by side with the pallas path's largest XLA ops in the kernel-backed groups (its glue)."""
  hz = g["clock"]["hz"]
  us = lambda c: c / hz * 1e6
  out = []
  by = {(s["config"], s["mode"], s["impl"]): s for s in g["steps"] if "groups" in s}
  if not by:
    return out
  out += ["", "Per model op (ESTIMATES; each XLA op is put in the group its HLO op_name, the "
          "jax/flax name stack, names; a fusion carries the name of one of the ops it fuses; "
          "an op without a name (layout copy, parameter convert) takes its first named "
          "operand's group). Groups: " + "; ".join(f"{k}: {v}" for k, v in GROUP_DOC.items())
          + ".", ""]
  for (cfg, mode, impl), s in by.items():
    if impl != "pallas_tpu" or (cfg, mode, "xla") not in by:
      continue
    x = by[(cfg, mode, "xla")]
    out += [f"### {cfg} {mode}: xla vs pallas_tpu per op group (us per step, estimate)", "",
            "| group | xla path: XLA us (fwd + bwd) | pallas: kernel us (calls) | pallas: XLA "
            "us around them (fwd + bwd) | pallas total us | pallas - xla us |",
            "|---|---:|---:|---:|---:|---:|"]
    tot = [0.0, 0.0, 0.0]
    for name in OP_GROUPS:
      a, b = x["groups"][name], s["groups"][name]
      unk = f", {b['kernel_calls_unknown']} without profile" if b["kernel_calls_unknown"] else ""
      out.append(f"| {name} | {a['xla_us']:.0f} ({us(a['xla_fwd_cycles']):.0f} + "
                 f"{us(a['xla_bwd_cycles']):.0f}) | {b['kernel_us']:.0f} ({b['kernel_calls']}"
                 f"{unk}) | {b['xla_us']:.0f} ({us(b['xla_fwd_cycles']):.0f} + "
                 f"{us(b['xla_bwd_cycles']):.0f}) | {b['total_us']:.0f} | "
                 f"{b['total_us'] - a['total_us']:+.0f} |")
      tot[0] += a["total_us"]
      tot[1] += b["kernel_us"]
      tot[2] += b["xla_us"]
    out += [f"| all | {tot[0]:.0f} | {tot[1]:.0f} | {tot[2]:.0f} | {tot[1] + tot[2]:.0f} | "
            f"{tot[1] + tot[2] - tot[0]:+.0f} |", ""]
    for name in KERNEL_GROUPS:
      a, b = x["groups"][name], s["groups"][name]
      ks = ", ".join(f"{k} {us(c):.0f}" for k, c in sorted(b["kernels"].items(),
                                                          key=lambda kv: -kv[1]))
      out += [f"{name}: xla path {a['xla_us']:.0f} us of XLA ops in {a['xla_ops']} ops; pallas "
              f"path {b['kernel_us']:.0f} us of kernels ({ks or 'none'}) + {b['xla_us']:.0f} us "
              f"of XLA glue in {b['xla_ops']} ops. Largest glue ops (pallas path):", "",
              "| op | opcode | shape | dir | us | op_name |", "|---|---|---|---|---:|---|"]
      for t in b["top_xla_ops"][:10]:
        inh = " (inherited)" if t["inherited"] else ""
        out.append(f"| {t['name']} | {t['opcode']} | `{t['shape'][:60]}` | {t['direction']} | "
                   f"{us(t['cycles']):.1f} | `{t['op_name'][:90]}`{inh} |")
      out += ["", f"Largest XLA ops of {name} in the xla path: " + ", ".join(
          f"{t['name']} ({t['opcode']} `{t['shape'][:40]}` {t['direction']}) {us(t['cycles']):.1f}"
          for t in a["top_xla_ops"][:6]), ""]
  for (cfg, mode, impl), s in by.items():
    if (cfg, mode, "xla" if impl == "pallas_tpu" else "pallas_tpu") in by:
      continue
    out += [f"### {cfg} {mode} {impl} per op group (us per step, estimate)", "",
            "| group | XLA us | kernel us | total us |", "|---|---:|---:|---:|"]
    out += [f"| {n} | {s['groups'][n]['xla_us']:.0f} | {s['groups'][n]['kernel_us']:.0f} | "
            f"{s['groups'][n]['total_us']:.0f} |" for n in OP_GROUPS] + [""]
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gens", default="v5e,v5p,v6e", help=f"comma list of {list(GENERATIONS)}")
  ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list; 'tiny' for tests")
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
  ap.add_argument("--batch", type=int, default=32, help="batch per chip")
  ap.add_argument("--tag", default="latest", help="result file name")
  ap.add_argument("--out", default=os.path.join("bench", "results", "tpu_static"))
  ap.add_argument("--reuse-kernels", default=None, metavar="JSON",
                  help="earlier result JSON: kernels with the same key (name, grid, input "
                       "shapes) and the calibration kernels take its profiles instead of "
                       "being compiled and profiled again (said in the tables)")
  ap.add_argument("--hlo-dir", default=None, help="keep each step's compiled HLO (gzipped)")
  ap.add_argument("--remake", default=None, metavar="JSON",
                  help="re-derive the step totals of a result JSON and rewrite its .md")
  ap.add_argument("--write-wins", action="store_true",
                  help="write each kernel-backed op class's pallas_tpu and xla us per train "
                       "step into kernels/pallas_tpu/cost_table.py WINS (the TPU default)")
  ap.add_argument("--_worker", choices=("steps", "kernels", "profile"), help=argparse.SUPPRESS)
  ap.add_argument("--_out", help=argparse.SUPPRESS)
  ap.add_argument("--_start", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--_exports", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  split = lambda s: [x for x in s.split(",") if x]
  args.gens, args.configs = split(args.gens), split(args.configs)
  args.modes, args.impls = split(args.modes), split(args.impls)
  for g in args.gens:
    if g not in GENERATIONS:
      raise ValueError(f"--gens: {g!r} is not one of {list(GENERATIONS)}")
  for m in args.modes:
    if m not in MODES:
      raise ValueError(f"--modes: {m!r} is not one of {MODES}")
  for i in args.impls:
    if i not in IMPLEMENTATIONS:
      raise ValueError(f"--impls: {i!r} is not one of {IMPLEMENTATIONS}")
  if args.batch < 1:
    raise ValueError(f"--batch must be >= 1, got {args.batch}")

  if args.remake:
    result = remake(args.remake)
    if args.write_wins:
      print(len(write_wins(wins_rows(result))), "WINS entries")
    return 0
  if args._worker:
    gen = args.gens[0]
    if args._worker == "profile":
      worker_profile(gen, json.load(open(args._exports)), args._start, args._out)
      return 0
    if args._worker == "steps":
      res = worker_steps(gen, args.configs, args.modes, args.impls, args.batch, args.hlo_dir)
    else:
      res = worker_kernels(gen, args.configs, args.modes, args.batch, args.reuse_kernels)
    json.dump(res, open(args._out, "w"))
    return 0

  import importlib.metadata as md
  import jax
  result = dict(tag=args.tag, label=LABEL, batch=args.batch, jax=jax.__version__,
                libtpu=libtpu_version(),
                command="python -m bench.tpu_static " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:]),
                generations=[])
  for gen in args.gens:
    t0 = time.time()
    steps, kern = run_generation(gen, args)
    result["generations"].append(combine(gen, steps, kern))
    print(f"[{gen}] done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, args.tag)
  json.dump(result, open(base + ".json", "w"), indent=1)
  md_text = markdown(result)
  open(base + ".md", "w").write(md_text)
  if args.write_wins:
    print(len(write_wins(wins_rows(result))), "WINS entries", file=sys.stderr)
  print(md_text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
