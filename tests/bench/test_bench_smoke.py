"""Smoke tests of the benchmarks: tiny runs whose JSON / markdown must be well formed.

No timing assertions (the machine is shared): only that every number that should be
a positive time or rate is one, that unavailable implementations say why, and that
the files carry device, versions and date.
"""
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from bench import kernels as bk
from bench import model as bm
from bench import report, timing
from kernels import shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_summarize_and_time_calls():
  t = timing.summarize([3.0, 1.0, 2.0, 4.0])
  assert t.median == 2.5 and t.min == 1.0 and t.n == 4 and t.iqr > 0
  calls = []
  f = jax.jit(lambda a: a * 2)
  sets = [(jnp.ones(4),), (jnp.zeros(4),)]
  t = timing.time_calls(lambda a: calls.append(1) or f(a), sets, warmup=2, repeats=5)
  assert len(calls) == 7 and t.n == 5 and _positive(t.median)
  with pytest.raises(ValueError):
    timing.time_calls(f, [], repeats=1)


def test_rotation_count_exceeds_cache():
  n = timing.rotation_count(1 << 20, cache=8 << 20, max_sets=64)
  assert n * (1 << 20) >= 2 * (8 << 20)
  assert timing.rotation_count(1 << 30, cache=8 << 20) == 1


def test_environment_and_ceilings():
  env = timing.environment()
  assert env["device"]["platform"] == jax.default_backend()
  assert env["packages"]["jax"] == jax.__version__
  assert env["date_utc"][:2] == "20"
  c = timing.measure_ceilings("float32", repeats=2, max_seconds=1.0)
  assert _positive(c["matmul_flops_per_s"]) and _positive(c["copy_bytes_per_s"])
  # achieved/ideal <= 1 for a time at or above the roofline
  f = timing.roofline_fraction(1e9, 1e6, 10 * 1e9 / c["matmul_flops_per_s"], c)
  assert 0.09 < f < 0.11


def test_markdown_table_escapes_and_formats():
  md = report.markdown_table([{"a": 1.23456, "b": "x|y"}, {"a": None}], [("a", "A"), ("b", "B")])
  lines = md.splitlines()
  assert lines[0] == "| A | B |" and lines[1] == "|---|---|"
  assert "1.23" in lines[2] and "x\\|y" in lines[2]
  assert lines[3] == "|  |  |"


def test_kernels_bench_tiny(tmp_path):
  out = tmp_path / "k"
  rec = bk.main(["--quick", "--dtypes", "fp32", "--configs", "cifar10", "--batch", "1",
                 "--sweep-n", "64,128", "--sweep-m", "16", "--sweep-batch", "1",
                 "--repeats", "2", "--impls", "xla,dpa:xla,pallas_tpu,triton,dpa:cudnn",
                 "--out", str(out)])
  data = json.loads((out / "kernels.json").read_text())
  assert data["environment"]["device"]["platform"] == jax.default_backend()
  assert data["environment"]["packages"]["jax"] == jax.__version__
  assert _positive(data["ceilings"]["float32"]["matmul_flops_per_s"])
  rows = data["rows"]
  assert len(rows) == len(rec["rows"])
  ok = [r for r in rows if r["status"] == "ok"]
  ops = {r["op"] for r in ok}
  assert ops == set(bk.ATTENTION_OPS + bk.BLOCK_OPS)
  for r in ok:
    for k in ("median_s", "min_s", "tflops", "gbps", "pct_roofline", "flops", "min_bytes"):
      assert _positive(r[k]), (k, r)
    assert r["iqr_s"] >= 0
  # Both passes and both sweeps ran for the reference.
  xla = [r for r in ok if r["impl"] == "xla"]
  assert {r["pass"] for r in xla} == {"fwd", "fwd+bwd"}
  assert {r["N"] for r in xla if r["suite"] == "sweep_interface"} == {64, 128}
  assert {r["M"] for r in xla if r["suite"] == "sweep_latents"} == {16}
  # Implementations that cannot run here are listed with the reason, never timed.
  if jax.default_backend() == "cpu":
    unavail = {r["impl"].split("+")[0]: r for r in rows if r["status"] == "unavailable"}
    assert "TPU" in unavail["pallas_tpu"]["note"] and "interpret" in unavail["pallas_tpu"]["note"]
    assert "GPU" in unavail["triton"]["note"]
    assert not any(r["impl"].startswith(("pallas_tpu", "triton")) and r["status"] == "ok"
                   for r in rows)
  # fwd+bwd costs more than fwd at the same shape.
  f = next(r for r in xla if r["op"] == "read_block" and r["pass"] == "fwd"
           and r["suite"] == "published")
  fb = next(r for r in xla if r["op"] == "read_block" and r["pass"] == "fwd+bwd"
            and r["suite"] == "published")
  assert fb["flops"] > 2 * f["flops"]
  md = (out / "kernels.md").read_text()
  assert md.startswith("# bench.kernels") and "| implementation |" in md
  assert "measured ceiling (float32)" in md
  assert md.count("| read_block |") >= 4
  assert (out / "kernels_sweep_interface.png").stat().st_size > 1000


def test_dpa_block_matches_reference():
  """The 'dpa+xla' block the benchmark times computes the same op as ours."""
  case = bk.Case("published", "cifar10", "write_block", "fwd", "float32", 1, 8, 16,
                 shapes.ModelShapes("t", "", (), m=8, d=32, n=16, t=16, rw_heads=2,
                                    rw_width=16, mlp_ratio=2.0, latent_heads=2, num_blocks=1,
                                    latent_layers=1))
  args = case.make_inputs(jax.random.PRNGKey(0))
  impls = {i.name: i for i in bk.implementations()}
  ref = case.function(impls["xla"])(*args)
  alt = case.function(impls["dpa:xla"])(*args)
  assert jnp.allclose(ref, alt, atol=1e-4, rtol=1e-4)


def test_model_bench_tiny(tmp_path):
  from tests.rin.tiny import tiny_config
  cfg = tiny_config()
  ceiling = timing.measure_ceilings("float32", repeats=2, max_seconds=1.0)
  row = bm.bench_jax(cfg, "xla", 2, 2, 2, ceiling)
  for k in ("train_images_per_s", "sample_images_per_s", "train_compile_s",
            "train_flops_per_step", "train_mfu_pct", "process_peak_rss_bytes"):
    assert _positive(row[k]), k
  assert row["train_loss_finite"]
  assert _positive(row["train_memory_analysis"].get("total_bytes", 0))
  row["status"] = "ok"
  rows = [row, {"framework": "torch", "implementation": "rin-pytorch", "batch": 2,
                "status": "unavailable", "note": "not installed (test)"}]
  rec = {"benchmark": "bench.model", "config": "tiny", "environment": timing.environment(),
         "ceilings": {"float32": ceiling},
         "settings": {"batch": 2, "steps": 2, "sample_steps": 2, "implementations": ["xla"],
                      "compute_dtype": "float32"},
         "rows": rows, "comparisons": bm._comparisons(rows), "notes": ["test"]}
  paths = bm.write_outputs(rec, str(tmp_path))
  data = json.loads(open(paths["json"]).read())
  assert data["rows"][0]["train_images_per_s"] == row["train_images_per_s"]
  md = open(paths["md"]).read()
  assert "| xla | float32 | 2 |" in md and "| rin-pytorch |" in md and "unavailable" in md


@pytest.mark.skipif(bm.rin_pytorch_available() is not None, reason="rin-pytorch not installed")
def test_rin_pytorch_matching_config_builds():
  """The matching rin-pytorch model builds from our config and runs one loss."""
  import torch
  from tests.rin.tiny import tiny_config
  cfg = tiny_config()
  net, diff = bm.build_rin_pytorch(cfg)
  loss = diff(torch.rand(2, cfg.model.channels, cfg.model.image_size, cfg.model.image_size))
  assert torch.isfinite(loss)
  assert diff.train_prob_self_cond == 1.0 and diff.objective == "eps"


def test_gpu_suite_dry_run():
  r = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_suite.sh"), "--dry-run"],
                     capture_output=True, text=True, cwd=REPO, timeout=60,
                     env={**os.environ, "OUT": "/tmp/bench_dry_run_out"})
  assert r.returncode == 0, r.stderr
  out = r.stdout
  for needle in ("pip install --no-index --find-links", "bench.triton_gpu_check", "bench.kernels",
                 "bench.model", "timeout", "/tmp/bench_dry_run_out"):
    assert needle in out, needle
  assert not os.path.exists("/tmp/bench_dry_run_out/kernels.json")


def test_candidates_are_timed_round_robin_with_paired_ratios():
  """--interleave runs A B A B ...; the paired ratio is the median of per-round ratios."""
  calls = []

  def fake(name, seconds):
    def step(*_):
      calls.append(name)
      time.sleep(seconds)
    return bm.Candidate({"implementation": name, "batch": 4, "train_flops_per_step": 1e9},
                        step, step)
  ours, theirs = fake("xla", 0.01), fake("rin-pytorch", 0.03)
  ceiling = {"matmul_flops_per_s": 1e12}
  bm.time_candidates([ours, theirs], 3, 2, ceiling, interleave=True)
  assert calls == ["xla", "rin-pytorch"] * 5
  for c in (ours, theirs):
    c.row["status"] = "ok"
    assert len(c.row["train_step_times_s"]) == 3 and c.row["timing_order"] == "interleaved"
  comp = bm._comparisons([ours.row, theirs.row])
  assert 2.0 < comp["xla_train_speedup_vs_rin_pytorch_paired_median"] < 4.5
  calls.clear()
  bm.time_candidates([ours, theirs], 2, 1, ceiling, interleave=False)
  assert calls == ["xla", "xla", "rin-pytorch", "rin-pytorch", "xla", "rin-pytorch"]
  assert "xla_train_speedup_vs_rin_pytorch_paired_median" not in bm._comparisons(
      [ours.row, theirs.row])
