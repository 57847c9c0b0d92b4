"""bench/costs.py and bench/roofline.py: the FLOP / byte counts the TPU timings are held
to, against hand counts and XLA's own count, at the shapes table's CIFAR-10 row."""
import jax
import jax.numpy as jnp
import pytest

from bench import costs, roofline
from kernels import reference, shapes
from tests.kernels import op_cases as oc


def test_costs_match_hand_counts_and_roofline_writes_json(tmp_path):
  c = costs.cross_attention(2, 3, 5, 7, 8, "bfloat16")
  assert c.flops == 4 * 2 * 3 * 5 * 7 * 8
  assert c.bytes == 2 * (2 * 2 * 3 * 7 * 8 + 2 * 2 * 5 * 7 * 8) + 4 * 2 * 7 * 3
  assert costs.cross_attention(2, 3, 5, 7, 8, backward=True).flops == 2 * c.flops
  # Block FLOPs agree with XLA's own count of the reference's matmuls (fp32 inputs).
  o = shapes.op_shape(shapes.CIFAR10, "write_block")
  (x, z, p), _ = oc.block_inputs(0, "write", 1, o.lk, o.ckv, o.lq, o.cq, o.width, o.mlp,
                                 jnp.float32)
  xla = jax.jit(lambda x, z, p: reference.write_block(x, z, p, num_heads=o.heads)
                ).lower(x, z, p).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  ours = costs.op_cost(o, 1, "float32")
  assert abs(ours.flops - xla["flops"]) / xla["flops"] < 0.05, (ours.flops, xla["flops"])
  out = tmp_path / "roofline.json"
  rs = roofline.main(["--batch", "4", "--out", str(out)])
  assert out.exists() and len(rs) == len(shapes.PUBLISHED) * 2 * len(shapes.OPS)
  r = rs[0]
  assert r["v5e_roofline_us"] == pytest.approx(
      1e6 * max(r["flops"] / 197e12, r["bytes"] / 819e9))
