"""bench.tpu_static: the LLO / jaxpr / HLO readers (fast, no libtpu) and one tiny run (libtpu)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bench import tpu_static as ts

# A hand-written final-LLO excerpt: 1 vmatmul every step, 2 per iteration of a 4-trip loop,
# 8 inside a pl.when region and 3 in its else branch.
_LLO = """module @k attributes {stable_mosaic.version = 18 : i64} {
  func.func @k(%arg0: i32 {llo.type = i32}) attributes {iteration_bounds = array<i64: 2, 4>, window_params = []} {
    %c0 = llo.constant {value = 0 : i32} : i32
    %c1 = llo.constant {value = 1 : i32} : i32
    %c4 = llo.constant {value = 4 : i32} : i32
    "llo.vmatmul"(%x) <{data_format = #llo.matmul_data_format<bf16>}> : (vector<8x128x2xbf16>) -> ()
    scf.for %i = %c0 to %c4 step %c1  : i32 {
      "llo.vmatmul"(%x) <{mxu_id = 0 : i32}> : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) <{mxu_id = 0 : i32}> : (vector<8x128x2xbf16>) -> ()
      %a = llo.vadd.f32 %x, %x : vector<8x128xf32>
    } {in_layout = []}
    scf.if %p {
      %b = llo.vector_load %r : i32 -> vector<8x128xf32>
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
    } else {
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
      "llo.vmatmul"(%x) : (vector<8x128x2xbf16>) -> ()
    }
    llo.vector_store %r, %a : i32, vector<8x128xf32>
  }
}
"""


def test_parse_llo_weights_loops_and_when_branches():
  r = ts.parse_llo(_LLO, [0.25])
  assert r["grid"] == [2, 4] and r["exact"]
  assert r["ops"]["llo.vmatmul"] == pytest.approx(1 + 4 * 2 + 0.25 * 8 + 0.75 * 3)
  assert r["ops"]["llo.vadd.f32"] == pytest.approx(4)
  assert r["ops"]["llo.vector_load"] == pytest.approx(0.25)
  c = ts.op_classes(r["ops"])
  assert c["vmatmul"] == pytest.approx(13.25) and c["vector_store"] == 1
  # A pl.when count that cannot be matched is reported as not exact (every branch counted).
  r = ts.parse_llo(_LLO, [0.25, 0.5])
  assert not r["exact"] and r["ops"]["llo.vmatmul"] == pytest.approx(1 + 8 + 8 + 3)


def test_kernel_flops_and_when_frequencies_from_the_jaxpr():
  import kernels.pallas_tpu as P
  b, lq, lk, h, d = 2, 256, 256, 3, 32
  q = jnp.zeros((b, lq, h, d), jnp.bfloat16)
  k = jnp.zeros((b, lk, h, d), jnp.bfloat16)
  bs = P.AttentionBlockSizes(block_q=128, block_k=128, block_b=1)
  jx = jax.make_jaxpr(lambda q, k: P.cross_attention(q, k, k, block_sizes=bs))(q, k)
  (e,) = ts.find_kernels(jx)
  assert e.params["name"] == "rin_attention_fwd"
  assert "grid=[2, 1, 2, 2]" in ts.kernel_key(e)        # all 3 heads in one grid step
  flops, conds = ts.kernel_flops_and_conds(e)
  assert flops == 2 * 2 * b * h * lq * lk * d            # QK^T and PV, every grid step
  assert conds == [0.5, 0.5]                              # j == 0, j == last of 2 key blocks


def test_hlo_ops_reads_estimated_cycles_and_kernel_calls():
  text = "\n".join([
      "ENTRY %main (a: f32[8]) -> f32[8] {",
      '  %fusion.3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation, '
      'backend_config={"window_config":{"estimated_cycles":"1234"}}',
      '  %rin_read_block_fwd.1 = bf16[8]{0} custom-call(%fusion.3), '
      'custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{}}',
      "  ROOT %bitcast.1 = f32[8]{0} bitcast(%rin_read_block_fwd.1)", "}"])
  ops = ts.hlo_ops(text)
  assert ("fusion.3", "fusion", 1234, None) in ops
  assert ("rin_read_block_fwd.1", "custom-call", None, "rin_read_block_fwd") in ops
  assert ("bitcast.1", "bitcast", None, None) in ops


def test_bad_arguments_are_clear_errors():
  with pytest.raises(ValueError, match="--gens"):
    ts.main(["--gens", "v9z"])
  with pytest.raises(ValueError, match="--batch"):
    ts.main(["--batch", "0"])
  with pytest.raises(ValueError, match="config must be one of"):
    ts.make_config("cifar100")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu "
                    "(pip install -e .[tpu-static])")
def test_tiny_run_with_libtpu(tmp_path):
  r = subprocess.run([sys.executable, "-m", "bench.tpu_static", "--gens", "v5e", "--configs",
                      "tiny", "--modes", "sample", "--batch", "2", "--tag", "tiny", "--out",
                      str(tmp_path)], capture_output=True, text=True, timeout=3000)
  assert r.returncode == 0, r.stderr[-4000:]
  res = json.load(open(tmp_path / "tiny.json"))
  assert "ESTIMATES" in res["label"] and "ESTIMATES" in open(tmp_path / "tiny.md").read()
  (g,) = res["generations"]
  assert g["vmatmul_flops"] == 524288                    # v5e: one full-tile bf16 vmatmul
  for c in g["calibration_checks"]:                       # lane-dense matmuls: ~100%
    assert 0.95 <= c["mxu_proxy"] <= 1.05, c
  assert g["kernels"]
  for k in g["kernels"].values():
    assert k["flops"] > 0 and 0 < k["mxu_proxy"] <= 1.05 and k["vmem_bytes"] > 0
  steps = {s["impl"]: s for s in g["steps"]}
  assert steps["xla"]["kernel_calls_hlo"] == 0 and steps["xla"]["total_cycles"] > 0
  p = steps["pallas_tpu"]
  assert p["kernel_calls_hlo"] == sum(p["kernel_calls_jaxpr"].values()) > 0
  assert p["total_cycles"] == p["xla_cycles"] + p["kernel_cycles"]


def test_worker_env_names_the_target_generation():
  # The kernels size their VMEM budget by the target generation, and a deviceless compile's
  # default device is the CPU: each generation's workers name theirs.
  from kernels.pallas_tpu import common
  for gen in ts.GENERATIONS:
    env = ts._libtpu_env(gen)
    assert env["RIN_TPU_GENERATION"] == gen and env["JAX_PLATFORMS"] == "cpu"
    assert gen in common.VMEM_CAPACITY_MIB
