"""Every Triton kernel variant at the published RIN shapes compiles for sm_90
(Hopper) and sm_80 (Ampere) on this CPU-only machine, without register spills and
within the per-block shared-memory limit. Figures are printed (pytest -s) and
kept in bench/results/triton_compile_report.md (python -m kernels.triton_gpu.compile_report).
"""
import jax.numpy as jnp
import pytest

from kernels.triton_gpu import compile_report as cr

CIFAR = tuple(s for s in cr.PUBLISHED if s.name.startswith("cifar10"))
# The CIFAR-10 write block (forward + backward) launches every kernel and every
# fused-linear epilogue; it is the default-suite case, the rest run as slow tests.
CIFAR_WRITE = tuple(s for s in cr.PUBLISHED if s.name == "cifar10/write")
OTHERS = tuple(s for s in cr.PUBLISHED if s.name != "cifar10/write")


def _compile_and_check(shapes, dtypes):
  rows = cr.run(shapes=shapes, dtypes=dtypes)
  kernels_seen = {r.kernel for r, _ in rows}
  for r, where in rows:
    print(f"{r.kernel:28s} sm_{r.arch} regs={r.regs:3d} spill={r.spill_bytes} "
          f"smem={r.shared_bytes:6d}  {r.key}")
    assert r.regs > 0
  bad = cr.violations(rows)
  assert not bad, "\n".join(bad)
  return kernels_seen


def test_recorder_sees_every_kernel():
  # An undifferentiated and a differentiated call of one write block (with MLP) and one
  # read block launch all 10 kernels: the one-kernel write forward and the fused K/V read
  # attention serve the undifferentiated calls; gradients use the composed ops.
  recs = cr.unique_records(shapes=CIFAR, dtypes=("bfloat16",))
  names = {r.kernel.__name__ for r in recs}
  assert names == {"_write_block_fwd_kernel", "_read_attn_kernel",
                   "_attn_fwd_kernel", "_attn_combine_kernel", "_attn_bwd_delta_kernel",
                   "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_fused_linear_kernel",
                   "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"}, names


def test_cifar10_write_block_compiles_bf16():
  seen = _compile_and_check(CIFAR_WRITE, ("bfloat16",))
  assert len(seen) == 9, seen


@pytest.mark.slow
def test_other_published_shapes_compile_bf16():
  _compile_and_check(OTHERS, ("bfloat16",))


@pytest.mark.slow
def test_all_shapes_compile_fp32():
  _compile_and_check(cr.PUBLISHED, ("float32",))


def test_violations_flag_spills_and_shared_memory():
  ok = cr.Result("k", 90, 4, 2, 64, 0, 1000, "")
  spill = cr.Result("k", 80, 4, 2, 255, 16, 1000, "")
  smem = cr.Result("k", 80, 4, 2, 64, 0, 170 * 1024, "")
  assert cr.violations([(ok, [])]) == []
  assert len(cr.violations([(spill, []), (smem, [])])) == 2
