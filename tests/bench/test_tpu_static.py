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
@pytest.mark.skipif(ts.libtpu_site() is None, reason="needs libtpu (scripts/setup.sh puts "
                    "it in .venv/libtpu_site; or pip install -e .[tpu-static])")
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
  for s in g["steps"]:                                    # the groups partition the step
    assert set(s["groups"]) == set(ts.OP_GROUPS)
    assert sum(x["xla_cycles"] for x in s["groups"].values()) == s["xla_cycles"]
    assert sum(x["kernel_cycles"] for x in s["groups"].values()) == s["kernel_cycles"]
  assert p["groups"]["read"]["kernel_calls"] > 0 and p["groups"]["io"]["kernel_calls"] == 0
  assert set(p["op_classes"]) == {"read", "write", "latent_attn"}
  assert all(len(v) == 1 for v in p["op_classes"].values())
  assert "xla vs pallas_tpu per op group" in open(tmp_path / "tiny.md").read()


def test_worker_env_names_the_target_generation():
  # The kernels size their VMEM budget by the target generation, and a deviceless compile's
  # default device is the CPU: each generation's workers name theirs.
  from kernels.pallas_tpu import common
  for gen in ts.GENERATIONS:
    env = ts._libtpu_env(gen)
    assert env["RIN_TPU_GENERATION"] == gen and env["JAX_PLATFORMS"] == "cpu"
    assert gen in common.VMEM_CAPACITY_MIB


# A hand-written compiled-HLO excerpt of a train step: a fused read-block op, a latent
# attention op in the backward pass, a read kernel call, a parameter convert without a name
# (inherits the read group through its parameter), a loss op and an op of no module.
_HLO = "\n".join([
    "%fused_computation.1 (p: f32[8]) -> f32[8] {",
    '  %p = f32[8]{0} parameter(0), metadata={op_name="jit(fn)/jvp(RIN)/RIN._blocks/block_0/write/add"}',
    '  ROOT %a = f32[8]{0} add(%p, %p), backend_config={"estimated_cycles":"99999"}',
    "}",
    "ENTRY %main.0 (p__block_0____read____wq__.0: f32[128,128], x: bf16[2,16,128]) -> f32[] {",
    '  %p__block_0____read____wq__.0 = f32[128,128]{1,0:T(8,128)} parameter(0), '
    'metadata={op_name="p[\'block_0\'][\'read\'][\'wq\']"}',
    '  %x = bf16[2,16,128]{2,1,0} parameter(1), metadata={op_name="x"}',
    '  %convert.3 = bf16[128,128]{1,0:T(8,128)(2,1)} convert(%p__block_0____read____wq__.0), '
    'backend_config={"window_config":{"estimated_cycles":"100"}}',
    '  %fusion.1 = bf16[2,16,128]{2,1,0:T(8,128)(2,1)} fusion(%x), kind=kLoop, '
    'calls=%fused_computation.1, metadata={op_name="jit(fn)/jvp(RIN)/RIN._blocks/block_0/read/'
    'ln/sub" stack_frame_id=3}, backend_config={"window_config":{"estimated_cycles":"1000"}}',
    '  %rin_read_block_fwd.2 = (bf16[2,16,128]{2,1,0}, f32[2,4,16,1]{3,2,1,0}) custom-call('
    '%fusion.1, %convert.3), custom_call_target="tpu_custom_call", operand_layout_constraints='
    '{bf16[2,16,128]{2,1,0}, bf16[128,128]{1,0}}, frontend_attributes={kernel_metadata={}}, '
    'metadata={op_name="jit(fn)/jvp(RIN)/RIN._blocks/block_0/read/rin_read_block_fwd/'
    'pallas_call" stack_frame_id=7}, backend_config={"custom_call_config":{"body":"xx"}}',
    '  %fusion.2 = bf16[2,16,4,32]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_computation.1, '
    'metadata={op_name="jit(fn)/transpose(jvp(RIN))/RIN._blocks/block_0/latent_attn_0/q/'
    'dot_general"}, backend_config={"window_config":{"estimated_cycles":"300"}}',
    '  %reduce.5 = f32[] reduce(%fusion.2), metadata={op_name="jit(fn)/jvp()/loss_and_metrics/'
    'reduce_sum"}, backend_config={"window_config":{"estimated_cycles":"7"}}',
    '  %fusion.4 = f32[128]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1, metadata='
    '{op_name="jit(fn)/transpose(jvp(RIN))/RIN._blocks/block_0/read_mlp/Dense_0/add"}, '
    'backend_config={"window_config":{"estimated_cycles":"20"}}',
    "  ROOT %tuple.9 = (f32[]) tuple(%reduce.5)",
    "}"])


def test_op_group_from_name_stacks():
  assert ts.op_group("jit(fn)/jvp(RIN)/RIN._blocks/block_2/read/div") == ("read", "fwd")
  assert ts.op_group("jit(fn)/transpose(jvp(RIN))/RIN._blocks/block_0/write/rin_write_block"
                     "_attn_bwd/pallas_call") == ("write", "bwd")
  assert ts.op_group("jit(fn)/jvp(RIN)/RIN._blocks/block_1/latent_attn_3/k/dot_general") == (
      "latent_attn", "fwd")
  assert ts.op_group("jit(fn)/jvp(RIN)/RIN._blocks/block_1/read_mlp_ln/sub")[0] == "latent_mlp"
  assert ts.op_group("jit(fn)/jvp(RIN)/RIN._blocks/block_1/latent_mlp_0/erf")[0] == "latent_mlp"
  assert ts.op_group("jit(fn)/jvp(RIN)/RIN._readout/readout_ln/add")[0] == "io"
  assert ts.op_group("jit(fn)/jvp()/loss_and_metrics/square") == ("other", "fwd")
  assert ts.op_group("") == ("other", "fwd")
  assert ts._param_group("p__block_0____read____wq__.0") == "read"
  assert ts._param_group("p__pos_latents__.0") == "io"


def test_hlo_records_group_costs_and_kernel_calls():
  recs = ts.attribute(ts.hlo_records(_HLO))
  by = {r["name"]: r for r in recs}
  assert "a" not in by                                   # fusion bodies are not scheduled ops
  assert (by["fusion.1"]["group"], by["fusion.1"]["direction"]) == ("read", "fwd")
  assert by["fusion.2"]["group"] == "latent_attn" and by["fusion.2"]["direction"] == "bwd"
  assert by["convert.3"]["group"] == "read" and by["convert.3"]["inherited"]
  assert by["convert.3"]["shape"] == "bf16[128,128]"
  k = by["rin_read_block_fwd.2"]
  assert k["kernel"] == "rin_read_block_fwd" and k["group"] == "read"
  assert k["in_shapes"] == "bfloat16[2, 16, 128],bfloat16[128, 128]"
  keys = ["rin_read_block_fwd grid=[2, 1] in=(bfloat16[2, 16, 128],bfloat16[128, 128])",
          "rin_read_block_fwd grid=[4, 1] in=(bfloat16[4, 16, 128],bfloat16[128, 128])",
          "rin_attention_fwd grid=[1] in=(bfloat16[2, 16, 4, 32])"]
  assert ts.kernel_key_of_call(k, keys) == keys[0]
  assert ts.kernel_key_of_call(dict(k, in_shapes="other"), keys) is None   # two candidates
  g = ts.group_costs(recs, lambda r: 5000 if ts.kernel_key_of_call(r, keys) == keys[0] else None)
  assert set(g) == set(ts.OP_GROUPS)
  assert g["read"]["xla_cycles"] == 1100 and g["read"]["xla_fwd_cycles"] == 1100
  assert g["read"]["kernel_cycles"] == 5000 and g["read"]["kernel_calls"] == 1
  assert g["read"]["kernels"] == {"rin_read_block_fwd (fwd)": 5000}
  assert [t["name"] for t in g["read"]["top_xla_ops"]] == ["fusion.1", "convert.3"]
  assert g["latent_attn"]["xla_bwd_cycles"] == 300 and g["latent_mlp"]["xla_cycles"] == 20
  assert g["other"]["xla_cycles"] == 7
  # hlo_ops keeps its old tuples over the same records.
  assert ("rin_read_block_fwd.2", "custom-call", None, "rin_read_block_fwd") in ts.hlo_ops(_HLO)


def test_step_totals_count_the_kernel_calls_left_in_the_hlo():
  grp = lambda kc, unk=0: dict(kernel_cycles=kc, kernel_calls_unknown=unk)
  s = dict(xla_cycles=100, kernel_cycles_jaxpr=70, groups={"read": grp(20), "write": grp(30)})
  r = ts.step_totals(s, hz=1e6)
  assert r["kernel_cycles"] == 50 and r["kernel_cycles_source"] == "hlo calls"
  assert r["total_cycles"] == 150 and r["total_ms"] == pytest.approx(0.15)
  s["groups"]["write"] = grp(0, unk=1)            # a call without a profile: jaxpr count
  r = ts.step_totals(s, hz=1e6)
  assert r["kernel_cycles"] == 70 and r["kernel_cycles_source"] == "jaxpr calls"


def test_wins_rows_compare_each_op_class_as_the_model_uses_it(tmp_path):
  grp = lambda us: {g: dict(total_us=us.get(g, 0.0)) for g in ts.OP_GROUPS}
  classes = {"read": ["read:a:bfloat16"], "latent_attn": ["attention:b:bfloat16"],
             "write": ["write:c:bfloat16", "write:d:bfloat16"]}      # two classes: no row
  steps = [dict(config="cifar10", mode="train", impl="pallas_tpu", op_classes=classes,
                groups=grp({"read": 90.0, "latent_attn": 300.0, "write": 10.0})),
           dict(config="cifar10", mode="train", impl="xla", op_classes=classes,
                groups=grp({"read": 100.0, "latent_attn": 200.0, "write": 20.0}))]
  result = dict(tag="t", batch=32, generations=[dict(generation="v5e", steps=steps)])
  rows = ts.wins_rows(result)
  assert set(rows) == {"read:a:bfloat16", "attention:b:bfloat16"}
  assert rows["read:a:bfloat16"]["pallas_tpu_us"] == 90.0
  assert rows["attention:b:bfloat16"]["xla_us"] == 200.0
  assert "ESTIMATE" in rows["read:a:bfloat16"]["device"]
  from kernels.pallas_tpu import cost_table
  path = tmp_path / "cost_table.py"
  path.write_text(open(cost_table.__file__).read())
  ts.write_wins(rows, str(path))
  ns = {}
  exec(path.read_text(), ns)
  assert ns["WINS"] == rows and ns["__doc__"] == cost_table.__doc__
