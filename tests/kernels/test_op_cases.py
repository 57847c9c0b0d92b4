"""The op test base's comparison rule (op_cases.assert_close): it passes rounding-level
differences and fails a 10% error at every tolerance in its table, forward or gradient."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels import op_cases as oc

_TOLS = sorted({oc.tolerance(b, d, grad=g) for b, t in oc.TOLERANCES.items() for d in t
                for g in (False, True)})


def _want(seed=0):
  rng = np.random.default_rng(seed)
  return {"big": rng.normal(size=(64, 32)) * 100.0, "small": rng.normal(size=(128,)) * 1e-3,
          "zero": np.zeros((16,))}


@pytest.mark.parametrize("tol", _TOLS)
def test_rule_passes_rounding_and_fails_a_ten_percent_error(tol):
  want = _want()
  near = {k: v * (1 + 0.5 * tol) for k, v in want.items()}   # within tol, relatively
  oc.assert_close(near, want, tol=tol, zero_scaled_by={"['zero']": "['small']"})
  for leaf in ("big", "small"):
    off = dict(want, **{leaf: want[leaf] * 1.1})          # 10% too large, everywhere
    with pytest.raises(AssertionError, match=leaf):
      oc.assert_close(off, want, tol=tol, zero_scaled_by={"['zero']": "['small']"})
    one = dict(want)                                      # one value off by 10% of the rms
    one[leaf] = want[leaf].copy()
    one[leaf].flat[3] += 0.1 * np.sqrt(np.mean(want[leaf] ** 2)) + 0.1 * abs(want[leaf].flat[3])
    with pytest.raises(AssertionError, match=leaf):
      oc.assert_close(one, want, tol=tol, zero_scaled_by={"['zero']": "['small']"})
  # A leaf that should be zero is held to the named leaf's scale, not its own.
  bad_zero = dict(want, zero=np.full((16,), 0.2 * np.sqrt(np.mean(want["small"] ** 2))))
  with pytest.raises(AssertionError, match="zero"):
    oc.assert_close(bad_zero, want, tol=tol, zero_scaled_by={"['zero']": "['small']"})
  with pytest.raises(AssertionError, match="non-finite"):
    oc.assert_close(dict(want, big=want["big"] * np.nan), want, tol=tol)


def test_tolerance_table():
  assert oc.tolerance("triton", jnp.float16, grad=True) == 4 * oc.tolerance("triton", jnp.float16)
  assert oc.tolerance("pallas_tpu", jnp.bfloat16) == 3e-2
  assert max(_TOLS) < 0.1
