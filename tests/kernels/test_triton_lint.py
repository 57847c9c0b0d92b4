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


def test_int64_base_offsets_in_compiled_ttir():
  """B=1024, N=16384, W=256: 4.3e9 elements, beyond int32. The compiled TTIR of the
  attention forward and the fused read must offset their base pointers with i64."""
  import re
  import jax
  import jax.numpy as jnp
  from kernels import triton_gpu as tg
  from kernels.params import ReadBlockParams
  from kernels.triton_gpu.launch import clear_caches, record_launches
  sds = jax.ShapeDtypeStruct
  big = sds((1024, 16384, 8, 32), jnp.bfloat16)
  lat = sds((1024, 128, 8, 32), jnp.bfloat16)
  w = lambda *s: sds(s, jnp.float32)
  p = ReadBlockParams(w(512), w(512), w(512, 256), w(256), w(256, 256), w(256), w(256, 256),
                      w(256), w(256, 512), w(512))
  clear_caches()
  with record_launches() as recs:
    jax.make_jaxpr(lambda q, k: tg.cross_attention(q, k, k))(big, lat)     # write direction
    jax.make_jaxpr(lambda z, x, p: tg.read_block(z, x, p, num_heads=8))(
        sds((1024, 128, 512), jnp.bfloat16), sds((1024, 16384, 256), jnp.bfloat16), p)
  kinds = {r.kernel.__name__: r for r in recs}
  for name in ("_attn_fwd_kernel", "_read_attn_kernel"):
    ttir = cr.compile_asm(kinds[name], 90)["asm"]["ttir"]
    assert re.search(r"tt\.addptr %\S+, %\S+ : !tt\.ptr<bf16>, i64", ttir), name


def test_slab_beyond_int32_is_a_clear_error():
  import jax.numpy as jnp
  import jax
  from kernels import triton_gpu as tg
  q = jax.ShapeDtypeStruct((1, 2 ** 22, 16, 64), jnp.bfloat16)   # 2^32 elements in one slab
  with pytest.raises(ValueError, match="2\\^31"):
    jax.eval_shape(lambda a: tg.cross_attention(a, a, a), q)
