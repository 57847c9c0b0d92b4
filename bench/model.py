"""Whole-model benchmark: train-step and sampling-step throughput of a RIN config.

One file over 400 lines on purpose: our step and rin-pytorch's are timed by the same
interleaved loop and written to one report, so both sides sit next to each other.

    python -m bench.model --config cifar10 --batch 32 [--implementations xla,triton]
                          [--rin-pytorch] [--steps N] [--sample-steps N] [--out DIR]
                          [--no-interleave]

For each implementation: train-step images/s (the full step of rin/train_step.py: the
self-conditioning pass, the loss pass, backward, LAMB, EMA), sampling-step images/s
(one denoiser call with carried latents, as each sampler step makes), compile time,
peak memory (device memory_stats on GPU/TPU; on CPU XLA's compiled memory_analysis and
the process peak RSS), and MFU = (compiled FLOPs per step / step time) / matmul ceiling
measured in the same run. With --rin-pytorch (and the package installed) the same is
measured for lucidrains' rin-pytorch at a matching configuration (differences listed
in the output). Video configs (rin/configs/moving_digits.py, kinetics600.py) time whole
clips: their "img/s" columns count videos per second (the row's "unit").

Every candidate is compiled and warmed up first; then the timed steps run round-robin
(one step of each candidate per round), because this shared 2-core VM has slow spells of tens of
seconds (identical runs a minute apart: 2.8 vs 4.0 s per step) that would otherwise land
on one candidate only. The ratios then include the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rin import xla_cpu
from bench import report, timing
from bench.report import load_config


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_peak_bytes():
  d = jax.devices()[0]
  try:
    s = d.memory_stats() or {}
  except Exception:  # CPU has none
    s = {}
  return s.get("peak_bytes_in_use")


def _memory_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return {}
  if m is None:
    return {}
  out = {}
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes"):
    v = getattr(m, k, None)
    if v is not None:
      out[k] = int(v)
  if out:
    out["total_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                          - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
  return out


def _flops(lowered) -> float | None:
  """FLOPs of a jitted step from XLA's cost analysis of the *lowered* (pre-optimisation)
  program: after optimisation, dots that XLA:CPU hands to oneDNN are custom calls that
  the cost model counts as zero FLOPs (bf16 step: 850 instead of 1117 GFLOP)."""
  try:
    ca = lowered.cost_analysis()
  except Exception:
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  f = (ca or {}).get("flops")
  return float(f) if f and f > 0 else None


def _is_video(config) -> bool:
  return "num_frames" in config.model


def _batches(config, batch: int, n: int):
  m = config.model
  out = []
  # Video configs: whole clips [B, F, H, W, C] (conditioning frames first), so the rates
  # below count videos per second.
  shape = (batch,) + ((m.num_frames,) if _is_video(config) else ()) + (
      m.image_size, m.image_size, m.channels)
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
    img = jax.random.uniform(k1, shape, jnp.float32, -1.0, 1.0)
    lab = jax.random.randint(k2, (batch,), 0, max(m.num_classes, 1), jnp.int32)
    out.append({"image": img, "label": lab})
  return out


@dataclasses.dataclass
class Candidate:
  """One model set up and warmed up for timing.

  row: its result row (filled further by `time_candidates`).
  train_step(i): runs train step i on batch i % 2 and waits for it.
  sample_step(): runs one sampling step and waits for it.
  """
  row: dict
  train_step: Callable[[int], Any]
  sample_step: Callable[[], Any]
  finish: Callable[[], None] = lambda: None


def prepare_jax(config, impl: str, batch: int, *, interpret: bool = False) -> Candidate:
  """Compiles (timed) and warms up rin/train_step.py's step and a sampling step for `impl`."""
  from rin import train_state, train_step
  row = {"framework": "jax", "implementation": impl, "batch": batch,
         "unit": "videos" if _is_video(config) else "images",
         "compute_dtype": config.train.dtype or "float32",
         "onednn_dots": xla_cpu.onednn_dots_requested() if jax.default_backend() == "cpu"
         else None, "freed_memory_kept": xla_cpu.freed_memory_kept()}
  model = train_state.create_model(config, implementation=impl, interpret=interpret)
  state = train_state.init_state(config, model, jax.random.PRNGKey(0))
  row["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  batches = _batches(config, batch, 2)

  step = jax.jit(train_step.make_train_step(model, config), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, batches[0])
  compiled = lowered.compile()
  row["train_compile_s"] = time.perf_counter() - t0
  row["train_flops_per_step"] = _flops(lowered)
  row["train_memory_analysis"] = _memory_analysis(compiled)
  live = {"state": state, "metrics": None}

  def train_step(i):
    live["state"], live["metrics"] = compiled(live["state"], batches[i % len(batches)])
    return jax.block_until_ready((live["state"], live["metrics"]))
  train_step(0)                          # warm-up, not timed

  # One sampling step: a denoiser call with carried latents (eval mode, EMA weights).
  m = config.model
  lab = batches[0]["label"] if m.num_classes > 0 else None
  x_shape = batches[0]["image"].shape
  if _is_video(config):   # the conditioning frames take the labels' slot (rin.video)
    lab = batches[0]["image"][:, :m.cond_frames]
    x_shape = (batch, m.num_frames - m.cond_frames) + x_shape[2:]

  @jax.jit
  def sample_fn(params, x_t, gamma, z):
    out, z = model.apply({"params": params}, x_t, gamma, lab, z, train=False)
    return out, z
  x_t = jax.random.normal(jax.random.PRNGKey(7), x_shape)
  gamma = jnp.full((batch,), 0.5)
  live["z"] = jnp.zeros((batch, m.num_latents, m.latent_dim), jnp.float32)
  t0 = time.perf_counter()
  sample_lowered = sample_fn.lower(live["state"].ema_params, x_t, gamma, live["z"])
  sc = sample_lowered.compile()
  row["sample_compile_s"] = time.perf_counter() - t0
  row["sample_flops_per_step"] = _flops(sample_lowered)

  def sample_step():
    _, live["z"] = sc(live["state"].ema_params, x_t, gamma, live["z"])
    return jax.block_until_ready(live["z"])
  sample_step()                          # warm-up, not timed

  def finish():
    row["train_loss_finite"] = bool(np.isfinite(float(live["metrics"]["loss"])))
    row["device_peak_bytes"] = _device_peak_bytes()
    row["process_peak_rss_bytes"] = _peak_rss_bytes()
  return Candidate(row, train_step, sample_step, finish)


def time_candidates(cands: list[Candidate], steps: int, sample_steps: int, ceiling: dict, *,
                    interleave: bool = True) -> None:
  """Times `steps` train steps and `sample_steps` sampling steps of every candidate.

  interleave: round-robin (A B A B ...) instead of all of A then all of B, so that a slow
  spell of this shared machine hits every candidate alike; each row then also gets its
  per-round times, from which `_comparisons` takes paired ratios.
  """
  def run(kind, n, call):
    times = [[] for _ in cands]
    order = ([(i, c) for i in range(n) for c in range(len(cands))] if interleave else
             [(i, c) for c in range(len(cands)) for i in range(n)])
    for i, c in order:
      t0 = time.perf_counter()
      call(cands[c], i + 1)
      times[c].append(time.perf_counter() - t0)
    for cand, t in zip(cands, times):
      tt = timing.summarize(t)
      r = cand.row
      r[f"{kind}_step"] = tt.as_dict()
      r[f"{kind}_step_times_s"] = t
      r[f"{kind}_images_per_s"] = r["batch"] / tt.median
      r[f"{kind}_load"] = timing.load_average()
      if r.get(f"{kind}_flops_per_step"):
        r[f"{kind}_tflops"] = r[f"{kind}_flops_per_step"] / tt.median / 1e12
        r[f"{kind}_mfu_pct"] = 100 * r[f"{kind}_flops_per_step"] / tt.median / ceiling[
            "matmul_flops_per_s"]

  run("train", steps, lambda c, i: c.train_step(i))
  run("sample", sample_steps, lambda c, i: c.sample_step())
  for c in cands:
    c.row["timing_order"] = "interleaved" if interleave and len(cands) > 1 else "sequential"
    c.finish()
    c.row["load_after"] = timing.load_average()


def bench_jax(config, impl: str, batch: int, steps: int, sample_steps: int,
              ceiling: dict, *, interpret: bool = False) -> dict:
  """Train and sampling step of rin/train_step.py's model for one implementation."""
  cand = prepare_jax(config, impl, batch, interpret=interpret)
  time_candidates([cand], steps, sample_steps, ceiling)
  return cand.row


# ----------------------------------------------------------------------------
# rin-pytorch at a matching configuration.
# ----------------------------------------------------------------------------

RIN_PYTORCH_DIFFERENCES = [
    "rin-pytorch has one heads/dim_head for every attention: 16 x 32 here, so the latent "
    "self-attention matches (width 512) but read/write attention is 512 wide, not 256 (8 heads)",
    "its interface FFN after the write uses mult 4 (ours: interface_mlp_ratio 2)",
    "time enters by adaptive LayerNorm scale/shift in every attention and FFN (time_cond) "
    "instead of a time latent token; no class token (unconditional)",
    "its latents number num_latents=128 learned tokens (ours: 126 + time + class = 128)",
    "its interface gets a PEG depthwise conv per block, LayerNorm on cross-attention context, "
    "the x self-conditioning image concatenated to the input (6 channels) and axial MLP "
    "positions; attention projections have no biases",
    "no dropout / drop-path (ours: 0.1 / 0.1 in the latent tower)",
    "optimizer torch.optim.Adam (no LAMB in torch), no EMA update in the timed step (ours: "
    "LAMB + EMA)",
    "self-conditioning: rin-pytorch decides per batch with random() < p; timed here with "
    "train_prob_self_cond=1.0 so every step runs the extra no-grad pass as ours does (ours "
    "decides per example and always runs the pass); its default 0.9 would skip it on ~10% "
    "of steps",
    "objective 'eps' and sigmoid schedule set to match; min-SNR loss weighting is its default",
]


def rin_pytorch_available() -> str | None:
  """None if importable, else the reason."""
  try:
    import rin_pytorch  # noqa: F401
    import torch  # noqa: F401
  except ImportError as e:
    return f"rin-pytorch not installed ({e})"
  return None


def build_rin_pytorch(config):
  import torch
  from rin_pytorch import RIN as TRIN, GaussianDiffusion
  m = config.model
  head_dim = m.latent_dim // m.latent_heads
  layers = m.latent_layers_per_block
  if not isinstance(layers, int):
    layers = max(layers)
  net = TRIN(dim=m.interface_dim, image_size=m.image_size, patch_size=m.patch_size,
             channels=m.channels, depth=m.num_blocks, latent_self_attn_depth=layers,
             dim_latent=m.latent_dim, num_latents=m.num_latents, patches_self_attn=False,
             heads=m.latent_heads, dim_head=head_dim)
  diff = GaussianDiffusion(net, timesteps=1000, noise_schedule="sigmoid", objective="eps",
                           schedule_kwargs=dict(start=-3, end=3, tau=0.9),
                           train_prob_self_cond=1.0)
  return net, diff


def prepare_rin_pytorch(config, batch: int, compute_dtype: str = "float32") -> Candidate:
  """rin-pytorch at the matching config (see RIN_PYTORCH_DIFFERENCES), warmed up.

  compute_dtype bfloat16/float16: torch.autocast around the forward passes, the
  matching precision for our config.train.dtype (weights and Adam stay float32)."""
  import contextlib

  import torch
  row = {"framework": "torch", "implementation": "rin-pytorch", "batch": batch,
         "compute_dtype": compute_dtype if compute_dtype in ("bfloat16", "float16")
         else "float32"}
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if compute_dtype in ("bfloat16", "float16"):
    row["autocast"] = compute_dtype
    autocast = lambda: torch.autocast(dev, dtype=getattr(torch, compute_dtype))
  else:
    autocast = contextlib.nullcontext
  if dev == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  row["torch_threads"] = torch.get_num_threads()
  torch.manual_seed(0)
  net, diff = build_rin_pytorch(config)
  net.to(dev)
  diff.to(dev)
  row["params"] = int(sum(p.numel() for p in net.parameters()))
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  m = config.model
  imgs = [torch.rand(batch, m.channels, m.image_size, m.image_size, device=dev) for _ in range(2)]
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def train_step(i):
    with autocast():
      loss = diff(imgs[i % len(imgs)])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss

  # FLOPs of one train step, counted by torch's profiler (outside the timed calls).
  # (FlopCounterMode's module tracker asserts on rin-pytorch's no-grad self-cond pass.)
  try:
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts, with_flops=True) as prof:
      train_step(0)
    flops = sum(float(e.flops or 0) for e in prof.events())
    if flops > 0:
      row["train_flops_per_step"] = flops
  except Exception as e:  # noqa: BLE001
    row["train_flops_note"] = f"flop count failed: {type(e).__name__}"
  t0 = time.perf_counter()
  train_step(0)
  row["train_first_step_s"] = time.perf_counter() - t0

  x_t = torch.randn(batch, m.channels, m.image_size, m.image_size, device=dev)
  times_ = torch.full((batch,), 0.5, device=dev)
  carried = {"lat": None, "x": None}

  @torch.no_grad()
  def sample_step():
    net.eval()                       # eval for this call only: train steps interleave
    with autocast():
      out, lat = net(x_t, times_, carried["x"], carried["lat"], return_latents=True)
    carried["lat"], carried["x"] = lat.float(), out.float().clamp(-1, 1)
    sync()
    net.train()
    return out
  sample_step()                      # warm-up, not timed
  # Its train steps have reached their peak by now. main() prepares rin-pytorch before our
  # candidates, so this high-water mark is its own (plus the interpreter and imports).
  row["process_peak_rss_bytes"] = _peak_rss_bytes()

  def finish():
    if dev == "cuda":
      row["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    row["differences"] = RIN_PYTORCH_DIFFERENCES
  return Candidate(row, train_step, sample_step, finish)


# ----------------------------------------------------------------------------

COLUMNS = [("implementation", "implementation"), ("compute_dtype", "compute"),
           ("batch", "B"), ("params", "params"), ("unit", "per-s unit"),
           ("train_images_per_s", "train img/s"), ("train_median_s", "train step s"),
           ("train_iqr_s", "IQR s"), ("train_compile_s", "train compile s"),
           ("train_gflops", "GFLOP/step"), ("train_mfu_pct", "train MFU %"),
           ("sample_images_per_s", "sample-step img/s"), ("sample_median_s", "sample step s"),
           ("sample_compile_s", "sample compile s"), ("peak_mem_gb", "peak mem GB"),
           ("mem_kind", "peak mem source"), ("load", "load 1m"), ("status", "status"),
           ("note", "note")]


def _table_row(r: dict) -> dict:
  t = dict(r)
  if "train_step" in r:
    t["train_median_s"], t["train_iqr_s"] = r["train_step"]["median_s"], r["train_step"]["iqr_s"]
  if "sample_step" in r:
    t["sample_median_s"] = r["sample_step"]["median_s"]
  if r.get("train_flops_per_step"):
    t["train_gflops"] = r["train_flops_per_step"] / 1e9
  if r.get("device_peak_bytes"):
    t["peak_mem_gb"], t["mem_kind"] = r["device_peak_bytes"] / 1e9, "device memory_stats"
  elif r.get("train_memory_analysis", {}).get("total_bytes"):
    t["peak_mem_gb"] = r["train_memory_analysis"]["total_bytes"] / 1e9
    shared = f", {r['process_peak_rss_note']}" if r.get("process_peak_rss_note") else ""
    t["mem_kind"] = (f"XLA memory_analysis (process peak RSS "
                     f"{r.get('process_peak_rss_bytes', 0) / 1e9:.1f} GB{shared})")
  elif r.get("process_peak_rss_bytes"):
    t["peak_mem_gb"] = r["process_peak_rss_bytes"] / 1e9
    t["mem_kind"] = ("process peak RSS after its warm-up" if r["framework"] == "torch"
                     else "process peak RSS")
  if r.get("train_load"):
    t["load"] = r["train_load"][0]
  return t


def default_implementations(platform: str) -> list[str]:
  import kernels
  avail = kernels.available_implementations()
  out = ["xla"]
  if platform == "gpu" and "triton" in avail:
    out.append("triton")
  if platform == "gpu":
    out.append("cudnn")     # cuDNN fused attention, blocks composed in XLA: Triton's peer
  if platform == "tpu" and "pallas_tpu" in avail:
    out.append("pallas_tpu")
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="cifar10", help="rin/configs/<name>.py or a path")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--implementations", default=None,
                  help="comma list (default: xla plus the platform's kernels when available)")
  ap.add_argument("--rin-pytorch", action="store_true",
                  help="also time rin-pytorch at a matching config (if installed)")
  ap.add_argument("--steps", type=int, default=None, help="timed train steps")
  ap.add_argument("--sample-steps", type=int, default=None, help="timed sampling steps")
  ap.add_argument("--dtype", default=None, help="compute dtype (config.train.dtype)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="a config.model field, e.g. conv_kernel_size=3 (repeatable)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                  help="time the candidates round-robin (default) so that this shared "
                       "machine's slow spells hit all alike")
  args = ap.parse_args(argv)
  config = load_config(args.config)
  for item in args.set:
    field, sep, value = item.partition("=")
    if not sep or field not in config.model:
      ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD a config.model field")
    try:
      config.model[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      config.model[field] = value
  if args.dtype:
    config.train.dtype = args.dtype
  # Before the first computation (rin/xla_cpu.py): oneDNN dots, malloc keeps freed memory.
  xla_cpu.configure(config.train.dtype)
  platform = jax.default_backend()
  cpu = platform == "cpu"
  steps = args.steps or (3 if cpu else 20)
  sample_steps = args.sample_steps or (3 if cpu else 20)
  impls = ([s.strip() for s in args.implementations.split(",")] if args.implementations
           else default_implementations(platform))
  out_dir = args.out or os.environ.get("OUT") or report.default_out_dir("model")
  env = timing.environment()
  print(f"[bench.model] {env['device']} load {env['load_average_1_5_15']} -> {out_dir}",
        flush=True)
  cdt = config.train.dtype or "float32"
  ceiling = timing.measure_ceilings(cdt, repeats=5 if cpu else 10)
  print(f"  ceiling {cdt}: matmul {ceiling['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s", flush=True)
  rows, cands = [], []

  def failed(framework, impl, e):
    return {"framework": framework, "implementation": impl, "batch": args.batch,
            "status": "error",
            "note": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}

  # rin-pytorch first, so that its peak RSS is read before our programs exist.
  if args.rin_pytorch:
    why = rin_pytorch_available() or (
        "rin-pytorch has no video model" if _is_video(config) else None)
    if why:
      rows.append({"framework": "torch", "implementation": "rin-pytorch", "batch": args.batch,
                   "status": "unavailable", "note": why})
      print(f"  rin-pytorch: {_summary(rows[-1])}", flush=True)
    else:
      try:
        cands.append(prepare_rin_pytorch(config, args.batch, cdt))
      except Exception as e:  # noqa: BLE001
        rows.append(failed("torch", "rin-pytorch", e))
        print(f"  rin-pytorch: {_summary(rows[-1])}", flush=True)
  for impl in impls:
    try:
      cands.append(prepare_jax(config, impl, args.batch))
      print(f"  {impl}: compiled in {cands[-1].row['train_compile_s']:.1f}s", flush=True)
    except Exception as e:  # noqa: BLE001
      rows.append(failed("jax", impl, e))
      print(f"  {impl}: {_summary(rows[-1])}", flush=True)
  if cands:
    print(f"  timing {steps} train + {sample_steps} sampling steps each, "
          f"{'interleaved' if args.interleave else 'one after another'}", flush=True)
    time_candidates(cands, steps, sample_steps, ceiling, interleave=args.interleave)
  shared = any(c.row["framework"] == "torch" for c in cands)
  for c in sorted(cands, key=lambda c: c.row["framework"] != "jax"):   # ours first
    if shared and c.row["framework"] == "jax":
      c.row["process_peak_rss_note"] = "the process also held rin-pytorch"
    c.row["status"] = "ok"
    rows.append(c.row)
    print(f"  {c.row['implementation']}: {_summary(c.row)}", flush=True)
  record = {"benchmark": "bench.model", "config": args.config, "environment": env,
            "ceilings": {cdt: ceiling}, "settings": {"batch": args.batch, "steps": steps,
                                                     "sample_steps": sample_steps,
                                                     "implementations": impls,
                                                     "compute_dtype": cdt},
            "rows": rows, "comparisons": _comparisons(rows),
            "notes": ["train step = the whole rin/train_step.py step (self-conditioning pass, loss "
                      "pass, backward, optimizer, EMA); images/s = batch / median step time",
                      "sampling step = one denoiser call with carried latents (eval mode)",
                      "MFU = FLOPs per step (XLA cost_analysis of the lowered program; torch profiler "
                      "with_flops for rin-pytorch) / time / matmul ceiling measured in this run",
                      "the first train step is a warm-up and not timed",
                      ("timed steps run round-robin, one step of each candidate per round "
                       "(rin-pytorch, then ours); *_paired_median = median over rounds of rin-pytorch's "
                       "step time / ours in the same round" if args.interleave else
                       "timed steps run one candidate after another (--no-interleave)"),
                      f"malloc keeps freed memory (rin/xla_cpu.py keep_freed_memory): "
                      f"{xla_cpu.freed_memory_kept()}; one process, so rin-pytorch runs "
                      f"under the same malloc settings"]}
  write_outputs(record, out_dir)
  return record


def _summary(r: dict) -> str:
  if r.get("status") != "ok":
    return f"{r.get('status')}: {r.get('note')}"
  u = "videos/s" if r.get("unit") == "videos" else "img/s"
  return (f"train {r['train_images_per_s']:.2f} {u} (step {r['train_step']['median_s']:.2f}s, "
          f"compile {r.get('train_compile_s', float('nan')):.1f}s, MFU "
          f"{r.get('train_mfu_pct', float('nan')):.1f}%), sample-step "
          f"{r['sample_images_per_s']:.1f} {u}, load {r.get('train_load')}")


def _paired_ratio(r: dict, base: dict, kind: str) -> float | None:
  """Median over interleaved rounds of base's step time / r's step time in that round."""
  if r.get("timing_order") != "interleaved" or base.get("timing_order") != "interleaved":
    return None
  a, b = r.get(f"{kind}_step_times_s"), base.get(f"{kind}_step_times_s")
  if not a or not b or len(a) != len(b):
    return None
  return float(np.median(np.asarray(b) / np.asarray(a)))


def _comparisons(rows):
  ok = {r["implementation"]: r for r in rows if r.get("status") == "ok"}
  out = {}
  base = ok.get("rin-pytorch")
  for name, r in ok.items():
    if base and name != "rin-pytorch":
      out[f"{name}_train_speedup_vs_rin_pytorch"] = r["train_images_per_s"] / base[
          "train_images_per_s"]
      out[f"{name}_sample_speedup_vs_rin_pytorch"] = r["sample_images_per_s"] / base[
          "sample_images_per_s"]
      paired = _paired_ratio(r, base, "train")
      if paired is not None:
        out[f"{name}_train_speedup_vs_rin_pytorch_paired_median"] = paired
    if name not in ("xla", "rin-pytorch") and "xla" in ok:
      out[f"{name}_train_speedup_vs_xla"] = r["train_images_per_s"] / ok["xla"][
          "train_images_per_s"]
  return out


def write_outputs(record: dict, out_dir: str) -> dict:
  name = os.path.splitext(os.path.basename(record["config"]))[0]   # a name or a .py path
  stem = f"model_{name}_b{record['settings']['batch']}"
  paths = {"json": report.write_json(os.path.join(out_dir, stem + ".json"), record)}
  sections = [("Train and sampling steps",
               report.markdown_table([_table_row(r) for r in record["rows"]], COLUMNS))]
  if record["comparisons"]:
    sections.append(("Ratios", "\n".join(f"- {k}: {v:.2f}x"
                                         for k, v in record["comparisons"].items())))
  diffs = next((r.get("differences") for r in record["rows"] if r.get("differences")), None)
  if diffs:
    sections.append(("rin-pytorch configuration differences", "\n".join(f"- {d}" for d in diffs)))
  paths["md"] = report.write_markdown(os.path.join(out_dir, stem + ".md"),
                                      f"bench.model: {record['config']}, batch "
                                      f"{record['settings']['batch']}", record["environment"],
                                      sections, record["ceilings"].values(), record["notes"])
  print(f"[bench.model] wrote {', '.join(paths.values())}", flush=True)
  return paths


if __name__ == "__main__":
  main()
  sys.exit(0)
