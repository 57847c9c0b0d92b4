"""Smallest end-to-end check that the Bazel test setup imports the project and
its venv dependencies: kernels.cross_attention against a hand computation."""
import math

import numpy as np
import pytest

import jax.numpy as jnp

from kernels import api


def _hand_attention(scale):
  # one query [1, 0]; keys [1, 0] and [0, 1]; values [1, 2] and [3, 4]
  s0, s1 = 1.0 * scale, 0.0 * scale
  p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
  p1 = 1.0 - p0
  return [p0 * 1 + p1 * 3, p0 * 2 + p1 * 4]


@pytest.mark.parametrize("scale", [None, 1.0, 3.0])
def test_cross_attention_matches_hand_computation(scale):
  q = jnp.array([[[[1.0, 0.0]]]], jnp.float32)                # [B=1, L=1, H=1, Dh=2]
  k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]], jnp.float32)  # [1, 2, 1, 2]
  v = jnp.array([[[[1.0, 2.0]], [[3.0, 4.0]]]], jnp.float32)
  out = api.cross_attention(q, k, v, implementation="xla", scale=scale)
  want = _hand_attention(2 ** -0.5 if scale is None else scale)
  assert out.shape == (1, 1, 1, 2)
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], want, rtol=1e-6, atol=1e-6)


def test_unknown_implementation_is_rejected():
  q = jnp.zeros((1, 1, 1, 2), jnp.float32)
  with pytest.raises(ValueError, match="implementation"):
    api.cross_attention(q, q, q, implementation="no_such_backend")
