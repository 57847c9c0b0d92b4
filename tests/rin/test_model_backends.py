"""The whole model on each kernel backend equals implementation="xla": rin.RIN on the tiny
digits config, forward (prediction and latents) and every parameter gradient, with the
kernels run in their CPU interpreters (Pallas' interpret=True, Triton's interpreter)."""
import functools

import jax
import jax.numpy as jnp
import pytest

import rin
from rin.configs import digits
from tests.kernels import op_cases as oc

# Key-bias gradients are exactly zero in exact arithmetic (softmax ignores a per-query
# constant): held to the matching key kernel's scale.
ZERO = {"['k']['bias']": "['k']['kernel']", "['bk']": "['wk']"}
# (output, gradient) tolerance of the comparison rule (op_cases.assert_close) per backend:
# fp32 against the fp32 xla model, so both sides round.
TOL = {"pallas_tpu": (1e-4, 1e-4), "triton": (1e-4, 1e-3)}


@pytest.mark.parametrize("implementation", [
    pytest.param("pallas_tpu", marks=pytest.mark.slow),
    "triton",
])
def test_whole_model_matches_xla_digits(implementation):
  m = digits.get_config().model
  b = 2
  x = jax.random.normal(jax.random.PRNGKey(0), (b, m.image_size, m.image_size, m.channels))
  gamma = jnp.array([0.3, 0.8])
  labels = jnp.arange(b, dtype=jnp.int32) % m.num_classes
  prev = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (b, m.num_latents, m.latent_dim))
  ref = rin.RIN(**m, implementation="xla")
  fast = rin.RIN(**m, implementation=implementation, interpret=True)
  params = ref.init(jax.random.PRNGKey(2), x, gamma, labels, prev)
  # LN0 of self-conditioning starts at zero; make it non-zero so prev matters.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 if "self_cond_ln0" in jax.tree_util.keystr(p) else a, params)

  def loss(model, params):
    out, z = model.apply(params, x, gamma, labels, prev)
    return jnp.mean(out ** 2) + jnp.mean(z ** 2), (out, z)

  (l_ref, (o_ref, z_ref)), g_ref = jax.value_and_grad(
      functools.partial(loss, ref), has_aux=True)(params)
  (l_fast, (o_fast, z_fast)), g_fast = jax.value_and_grad(
      functools.partial(loss, fast), has_aux=True)(params)
  assert jax.tree.structure(g_ref) == jax.tree.structure(g_fast)
  tol_out, tol_grad = TOL[implementation]
  oc.assert_close(o_fast, o_ref, tol=tol_out, what="model output")
  oc.assert_close(z_fast, z_ref, tol=tol_out, what="model latents")
  assert abs(float(l_fast) - float(l_ref)) <= tol_out * max(1.0, abs(float(l_ref)))
  oc.assert_close(g_fast, g_ref, tol=tol_grad, what="parameter gradients",
                  zero_scaled_by=ZERO)
