"""implementation="cudnn": its argument errors on this (CPU) machine, its numerics through the
reference composition (the core swapped for the reference to run on CPU), and the GPU
default's choice among xla / cudnn / triton by evidence. Its GPU compile (one
`__cudnn$fmha` call forward and one backward per attention) is checked deviceless in
tests/bench/test_gpu_static.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import api, cudnn_gpu, reference
from tests.kernels import op_cases


def test_registered_with_the_same_argument_checks():
  assert "cudnn" in kernels.IMPLEMENTATIONS
  q = jnp.zeros((1, 2, 1, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="same head_dim"):         # api's shared checks first
    kernels.cross_attention(q, q[..., :4], q[..., :4], implementation="cudnn")


def test_clear_errors_on_cpu_dtype_and_head_dim():
  q = jnp.zeros((1, 16, 2, 32), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU.*'cpu'.*'xla'"):
    kernels.cross_attention(q, q, q, implementation="cudnn")
  with pytest.raises(TypeError, match="bfloat16 or float16.*float32"):
    kernels.cross_attention(q.astype(jnp.float32), q.astype(jnp.float32),
                            q.astype(jnp.float32), implementation="cudnn")
  q12 = jnp.zeros((1, 16, 2, 12), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim=12 must be a multiple of 8"):
    kernels.cross_attention(q12, q12, q12, implementation="cudnn")
  with pytest.raises(ValueError, match="interpret=True is not supported"):
    kernels.cross_attention(q, q, q, implementation="cudnn", interpret=True)
  with pytest.raises(ValueError, match="block_sizes must be None"):
    cudnn_gpu.cross_attention(q, q, q, block_sizes={"block_q": 64})
  (z, x, p), _ = op_cases.block_inputs(0, "read", 1, 8, 32, 16, 24, 32, 0, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
    kernels.read_block(z, x, p, num_heads=2, implementation="cudnn")
  with pytest.raises(ValueError, match="latent_attention_block: head_dim=4"):
    lp = op_cases.latent_params(jax.random.PRNGKey(0), 32, 32, jnp.bfloat16)
    kernels.latent_attention_block(z, lp, num_heads=8, implementation="cudnn")


@pytest.mark.parametrize("direction", ["read", "write", "latent"])
def test_blocks_compose_the_reference_over_the_cudnn_core(monkeypatch, direction):
  # On CPU the cuDNN call cannot run: swap the core for the reference one, so the
  # composition around it (LN, projections, MLP, residuals) is checked against "xla".
  monkeypatch.setattr(cudnn_gpu, "_target_platform", lambda: "gpu")
  monkeypatch.setattr(cudnn_gpu.jax.nn, "dot_product_attention",
                      lambda q, k, v, scale=None, implementation=None:
                      reference.cross_attention(q, k, v, scale=scale))
  dt = jnp.bfloat16
  if direction == "latent":
    (z, p), _ = op_cases.latent_inputs(0, 2, 8, 32, 32, dt)
    run = lambda impl: kernels.latent_attention_block(z, p, num_heads=2, residual=True,
                                                      implementation=impl)
  else:
    (a, b, p), _ = op_cases.block_inputs(0, direction, 2, 8, 32, 16, 24, 32,
                                         48 if direction == "write" else 0, dt)
    op = kernels.read_block if direction == "read" else kernels.write_block
    run = lambda impl: op(a, b, p, num_heads=2, implementation=impl)
  np.testing.assert_array_equal(np.asarray(run("cudnn"), np.float32),
                                np.asarray(run("xla"), np.float32))


def test_gpu_default_picks_the_fastest_by_measurement_else_estimate(monkeypatch):
  from kernels import gpu_cost_table
  from kernels.triton_gpu import autotune_table
  monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(api, "_backend", lambda name: None)       # every module "importable"
  key = "read:8x32x16x24x32:h2:bfloat16"
  monkeypatch.setattr(autotune_table, "WINS", {})
  monkeypatch.setattr(gpu_cost_table, "WINS", {})
  assert api.resolve_implementation(None, key) == "xla"          # no evidence
  monkeypatch.setattr(gpu_cost_table, "WINS", {key: dict(xla_us=3.0, cudnn_us=2.0,
                                                         triton_us=2.5)})
  assert api.resolve_implementation(None, key) == "cudnn"        # the estimate
  monkeypatch.setattr(autotune_table, "WINS", {key: dict(xla_us=3.0, triton_us=1.0)})
  assert api.resolve_implementation(None, key) == "triton"       # a measurement overrides
  monkeypatch.setattr(autotune_table, "WINS", {})
  f32 = "read:8x32x16x24x32:h2:float32"
  monkeypatch.setattr(gpu_cost_table, "WINS", {f32: dict(xla_us=3.0, cudnn_us=1.0)})
  assert api.resolve_implementation(None, f32) == "xla"          # cudnn cannot take fp32
  assert api.resolve_implementation("cudnn", key) == "cudnn"     # explicit always runs
