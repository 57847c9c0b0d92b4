"""bench.gpu_static: the HLO readers and cost model (fast, no plugin) and the CI rung: a
tiny-shape deviceless XLA:GPU compile of the xla, cudnn and triton paths (jax's CUDA
plugin, installed by the `test` extra)."""
import json
import os
import subprocess
import sys
import zlib

import pytest

from bench import gpu_static as gs

# A fusion whose body holds a [8,32] x [32,16] dot, called from the entry; a cuDNN forward
# attention call; a jax-triton call; views that launch nothing.
_HLO = """HloModule m

%gemm_body (p0: bf16[8,32], p1: bf16[32,16]) -> bf16[8,16] {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (q0: bf16[8,32], q1: bf16[32,16]) -> bf16[8,16] {
  %q0 = bf16[8,32]{1,0} parameter(0)
  %q1 = bf16[32,16]{1,0} parameter(1)
  ROOT %inner = bf16[8,16]{1,0} fusion(%q0, %q1), kind=kCustom, calls=%gemm_body
}

ENTRY %main (a: bf16[8,32], b: bf16[32,16], q: bf16[2,64,4,32], k: bf16[2,128,4,32]) -> bf16[8,16] {
  %a = bf16[8,32]{1,0} parameter(0), metadata={op_name="p['block_0']['read']['wq']"}
  %b = bf16[32,16]{1,0} parameter(1)
  %q = bf16[2,64,4,32]{3,2,1,0} parameter(2)
  %k = bf16[2,128,4,32]{3,2,1,0} parameter(3)
  %bc = bf16[8,32]{1,0} bitcast(%a)
  %gemm_fusion_dot = bf16[8,16]{1,0} fusion(%bc, %b), kind=kCustom, calls=%outer, metadata={op_name="jit(fn)/jvp(RIN)/RIN._blocks/block_0/read/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"2","output_tiles":[{"sizes":["8","16"]}],"num_stages":1}}}
  %fmha = (bf16[2,4,64,32]{3,1,2,0}, f32[2,4,64]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(fn)/transpose(jvp(RIN))/RIN._blocks/block_0/latent_attn_0/dot_product_attention"}, backend_config={"cudnn_fmha_backend_config":{"bmm1_dot_dimension_numbers":{"lhs_contracting_dimensions":["3"],"rhs_contracting_dimensions":["3"],"lhs_batch_dimensions":["0","2"],"rhs_batch_dimensions":["0","2"]}}}
  %tc = (bf16[2,64,4,32]{3,2,1,0}) custom-call(%q, %k, %k), custom_call_target="triton_kernel_call_ffi", metadata={op_name="jit(fn)/jvp(RIN)/RIN._blocks/block_0/write/triton_kernel_call"}, backend_config={opaque = "OPAQUE"}
  ROOT %t = (bf16[8,16]{1,0}) tuple(%gemm_fusion_dot)
}
"""


def _hlo_escape(b: bytes) -> str:
  return "".join(chr(c) if 32 <= c < 127 and chr(c) not in '"\\' else f"\\{c:02X}" for c in b)


def _module():
  blob = zlib.compress(b"\n\x10_attn_fwd_kernel\x12 ... wgmma.mma_async.sync ...")
  return _HLO.replace("OPAQUE", _hlo_escape(blob))


def test_shapes_bytes_and_dot_flops_through_nested_fusions():
  assert gs.arrays("(bf16[2,3]{1,0}, f32[4]{0}, u8[0]{0})") == [
      ("bf16", [2, 3]), ("f32", [4]), ("u8", [0])]
  assert gs.nbytes("(bf16[2,3]{1,0}, f32[4]{0})") == 2 * 6 + 4 * 4
  entry, comps = gs.hlo_computations(_module(), keep_line=True)
  assert entry == "main"
  assert gs.dot_flops(comps, "outer", {}) == 2 * 8 * 16 * 32


def test_analyse_costs_every_kernel_kind_and_its_group():
  import types
  launch = types.SimpleNamespace(
      kernel=types.SimpleNamespace(__name__="_attn_fwd_kernel"), grid=(1, 8, 1), in_dtypes=("bfloat16",) * 3, out_dtypes=("bfloat16",),
      constexprs=(("B", 2), ("D_PAD", 32), ("H", 4), ("LK", 128), ("LQ", 64)), num_warps=4,
      num_stages=2, in_shapes=((2, 64, 4, 32), (2, 128, 4, 32), (2, 128, 4, 32)),
      out_shapes=((2, 64, 4, 32),))
  ceil = dict(peak_flops=1e12, hbm_bps=1e9)
  ks = {k["name"]: k for k in gs.analyse(_module(), ceil, [launch])}
  assert set(ks) == {"gemm_fusion_dot", "fmha", "tc"}        # views and parameters are free
  g = ks["gemm_fusion_dot"]
  assert (g["kind"], g["group"], g["direction"]) == ("xla_triton_gemm", "read", "fwd")
  assert g["flops"] == 2 * 8 * 16 * 32 and g["tile"] == "8x16" and g["stages"] == 1
  assert g["bytes"] == 2 * (8 * 32 + 32 * 16 + 8 * 16)
  assert g["seconds"] == pytest.approx(g["bytes"] / 1e9 + gs.LAUNCH_S)
  f = ks["fmha"]
  assert (f["kind"], f["group"], f["direction"]) == ("cudnn", "latent_attn", "bwd")
  assert f["flops"] == 4 * (2 * 4) * 64 * 128 * 32           # QK^T and PV
  t = ks["tc"]
  assert (t["kind"], t["kernel"], t["wgmma"], t["launch_matched"]) == (
      "jax_triton", "_attn_fwd_kernel", True, True)
  assert t["flops"] == 2 * (2.0 * 2 * 4 * 64 * 128 * 32) and t["group"] == "write"
  # A call without a recorded launch is said so (and counts no FLOPs).
  t2 = {k["name"]: k for k in gs.analyse(_module(), ceil, [])}["tc"]
  assert not t2["launch_matched"] and t2["flops"] == 0
  groups, total = gs.summarise(list(ks.values()))
  assert total["kernels"] == 3 and groups["read"]["kernels"] == 1
  assert total["seconds"] == pytest.approx(sum(k["seconds"] for k in ks.values()))


def test_cudnn_backward_counts_five_score_matmuls():
  line = ('custom_call_target="__cudnn$fmhaSoftmaxBackward", "lhs_contracting_dimensions":'
          '["3"],"lhs_batch_dimensions":["0","2"]')
  fwd = 4.0 * 8 * 64 * 128 * 32
  assert gs.cudnn_flops(line, [[2, 64, 4, 32], [2, 128, 4, 32]]) == 2.5 * fwd


def test_target_protos_parse_as_the_plugin_expects():
  for name, t in gs.TARGETS.items():
    assert "cuda_compute_capability { major: 9 minor: 0 }" in t["proto"]
    assert t["peak_flops"] > 0 and t["hbm_bps"] > 0
  assert "4800000000000" in gs.TARGETS["h200"]["proto"]


def test_main_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="--impls"):
    gs.main(["--impls", "pallas_tpu"])
  with pytest.raises(ValueError, match="--targets"):
    gs.main(["--targets", "a100"])


@pytest.mark.skipif(not gs.plugin_available(),
                    reason="jax's CUDA plugin is not installed (scripts/setup.sh "
                           "installs jax-cuda13-plugin into .venv/xla_gpu_plugin; CI must have it)")
def test_deviceless_gpu_compile_of_the_xla_cudnn_and_triton_paths():
  """The CI rung: read, latent attention and write blocks, fwd + bwd, compiled by XLA:GPU
  for an H100 in a fresh process (the plugin reads its environment once)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = gs.gpu_env(gs.CI_FLAGS)
  # gpu_env's PYTHONPATH carries the plugin's folder (scripts/setup.sh installs it there).
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")] +
                                      [p for p in sys.path if p])
  r = subprocess.run([sys.executable, "-m", "bench.gpu_static", "--ops-check"], env=env,
                     cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  xla, cudnn, triton = res["xla"], res["cudnn"], res["triton"]
  # xla: attention unfused (no cuDNN, no jax-triton); GEMMs present.
  assert not any("cudnn" in t or "triton_kernel" in t for t in xla["targets"])
  assert xla["kinds"].get("cublas_gemm", 0) + xla["kinds"].get("xla_triton_gemm", 0) > 0
  # cudnn: one fused call forward and one backward per attention (3 ops).
  assert cudnn["targets"]["__cudnn$fmhaSoftmax"] == 3
  assert cudnn["targets"]["__cudnn$fmhaSoftmaxBackward"] == 3
  # triton: the attention kernels, the fused read and both backward paths (three kernels
  # for the read's 256 keys, one pass for 16 latent keys), every call matched to its
  # launch, the 64-row kernels on wgmma (sm_90a).
  assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
          "_attn_bwd_fused_kernel", "_read_attn_kernel"} <= set(triton["triton_kernels"])
  assert triton["unmatched"] == 0 and triton["wgmma"] > 0
  assert min(xla["flops"], cudnn["flops"], triton["flops"]) > 0
