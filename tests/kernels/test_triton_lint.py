"""Static performance lint of the Triton kernels a real train / sample step launches
(bench/triton_compile_report.py), compiled for sm_90 on this CPU-only machine with
jax-triton's pointer specialisation.

Gate: the CIFAR-10 bf16 train and sample steps (B=256): every dot-bearing variant of the
train step uses wgmma, every train-step launch has >= 132 CTAs, nothing spills or
overflows shared memory, and the fused kernels the sample step launches are launched by
the train step too. Slow tier: ImageNet-64 (patch 4, B=128), the N=4096 read, sm_80.
"""
import dataclasses

import pytest

from bench import triton_compile_report as cr


def _lint(steps, archs=(90,)):
  rows = cr.run(steps, archs)
  for r, step in rows:
    print(f"{step:18s} {r.kernel:24s} sm_{r.arch} grid={r.grid} regs={r.regs} "
          f"spill={r.spill_bytes} smem={r.shared_bytes} ctas/sm={r.ctas_per_sm} {r.mma}")
  return rows, cr.lint(rows)


def test_cifar10_train_and_sample_steps_pass_the_lint():
  rows, bad = _lint(("cifar10_train", "cifar10_sample"))
  assert not bad, "\n".join(bad)
  train = {r.kernel for r, s in rows if s == "cifar10_train"}
  # The train step runs the fused read attention (with STORE_KV) and the attention
  # forward/backward kernels; every dot among them is wgmma (asserted by the lint).
  assert {"_read_attn_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel",
          "_attn_bwd_dkdv_kernel"} <= train, train
  assert all(r.mma == "wgmma" for r, s in rows if r.has_dot)


@pytest.mark.slow
def test_other_steps_pass_the_lint_sm90_and_compile_on_sm80():
  _, bad = _lint(("imagenet64_train", "imagenet64_sample", "read_n4096"))
  assert not bad, "\n".join(bad)
  rows, _ = _lint(("cifar10_train",), archs=(80,))
  assert all(r.spill_bytes == 0 for r, _ in rows)


def _row(**kw):
  base = cr.Result("_attn_fwd_kernel", 90, (2, 4096, 1), 4, 2, 100, 0, 20000, "wgmma", True,
                   False, "")
  return dataclasses.replace(base, **kw)


def test_lint_flags_each_rule():
  ok = _row()
  assert cr.lint([(ok, "cifar10_train")]) == []
  assert "spills" in cr.lint([(_row(spill_bytes=8), "cifar10_sample")])[0]
  assert "without wgmma" in cr.lint([(_row(mma="mma"), "cifar10_train")])[0]
  assert cr.lint([(_row(mma="mma"), "cifar10_sample")]) == []   # sampling: not a rule
  assert "CTAs" in cr.lint([(_row(grid=(1, 32, 1)), "imagenet64_train")])[0]
  assert "shared memory" in cr.lint([(_row(shared_bytes=300_000), "x_train")])[0]
  fused = _row(kernel="_read_attn_kernel")
  bad = cr.lint([(fused, "cifar10_sample"), (ok, "cifar10_train")])
  assert bad == ["_read_attn_kernel runs in cifar10_sample but not in its train step"]
  assert cr.lint([(fused, "cifar10_sample"), (fused, "cifar10_train")]) == []


def test_ctas_per_sm_from_registers_smem_and_warps():
  assert _row(regs=128, num_warps=4, shared_bytes=20000).ctas_per_sm == 4    # registers
  assert _row(regs=32, num_warps=4, shared_bytes=100_000).ctas_per_sm == 2   # smem
  assert _row(regs=32, num_warps=8, shared_bytes=0).ctas_per_sm == 8         # warps
