"""bench/triton_estimate.py's cost model (analytic: nothing is traced or compiled here)."""

import pytest

from bench import triton_estimate as te


def test_fused_linear_weight_gradient_grid_scales_its_time():
  # dW of CIFAR-10's q projection: [T=256, B*N] @ [B*N, W=256] -> 4 x 4 = 16 CTAs of 132.
  r, k, n = 256 * 256, 256, 256
  dw = te.gemm_fl(k, r, n, out_b=te.F32)
  assert dw.flops == 2.0 * r * k * n
  assert dw.eff_flops == pytest.approx(dw.flops * 132 / 16)
  # The forward's grid ([B*N / 64] x [W / 64] = 4096 CTAs) fills the chip: no scaling.
  fwd = te.gemm_fl(r, k, n)
  assert fwd.eff_flops == fwd.flops
  assert (dw + fwd).eff_flops == dw.eff_flops + fwd.eff_flops
  assert (dw * 3).eff_flops == 3 * dw.eff_flops
  assert dw.seconds == pytest.approx(max(dw.eff_flops / te.PEAK_FLOPS, dw.bytes / te.HBM_BPS))


def test_xla_and_triton_paths_unchanged_by_the_fused_linear_model():
  # Costs built without eff_flops count their FLOPs once.
  c = te.gemm(1024, 256, 512)
  assert c.eff_flops == c.flops == 2.0 * 1024 * 256 * 512


@pytest.mark.parametrize("md", te.MODELS, ids=lambda m: m.name)
def test_fused_linear_loses_training_steps_and_break_even_is_consistent(md):
  train = te.step_estimate(md, "train")
  assert set(train) == set(te.PATHS)
  tot = {p: sum(c.seconds for c in ops.values()) for p, ops in train.items()}
  assert tot["triton_fused_linear"] > tot["triton"]       # the decision of 331d782
  assert te.break_even_efficiency(md, "train") is None
  e = te.break_even_efficiency(md, "sample")
  assert e is not None and 0 < e <= 1
  assert te.FL_EFFICIENCY == 1.0                         # restored after the search
  # Just below the break-even efficiency the fused_linear sampling step is slower.
  te.FL_EFFICIENCY = max(e - 0.01, 1e-3)
  try:
    s = te.step_estimate(md, "sample")
    assert (sum(c.seconds for c in s["triton_fused_linear"].values())
            > sum(c.seconds for c in s["triton"].values()))
  finally:
    te.FL_EFFICIENCY = 1.0
