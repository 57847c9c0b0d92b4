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


def test_bf16_bound_follows_xlas_own_error_per_row_and_has_no_floor():
  # A value off by more than the tolerance passes only where XLA's own bf16 result is off
  # by at least half as much in the same row (XLA_BF16_FACTOR = 2); nowhere else, and a
  # 10% error of a whole leaf fails whatever XLA does.
  tol = oc.tolerance("pallas_tpu", jnp.bfloat16, grad=True)
  rng = np.random.default_rng(1)
  want = {"g": rng.normal(size=(8, 32))}
  rms = np.sqrt(np.mean(want["g"] ** 2))
  err = 3 * tol * (abs(want["g"][2, 5]) + rms)              # 3x the tolerance bound
  got = {"g": want["g"].copy()}
  got["g"][2, 5] += err
  with pytest.raises(AssertionError, match="1 of 256 values off"):
    oc.assert_close(got, want, tol=tol)                    # no XLA baseline: fails
  xla_near = {"g": want["g"].copy()}                       # XLA exact in that row: fails
  with pytest.raises(AssertionError, match="XLA's bf16 bound"):
    oc.assert_close(got, want, tol=tol, xla=xla_near)
  xla_off = {"g": want["g"].copy()}
  xla_off["g"][2, 30] -= 0.6 * err                         # XLA as bad in that row: passes
  oc.assert_close(got, want, tol=tol, xla=xla_off)
  xla_other_row = {"g": want["g"].copy()}
  xla_other_row["g"][3, 5] -= 0.6 * err                    # ... but only in that row
  with pytest.raises(AssertionError, match="values off"):
    oc.assert_close(got, want, tol=tol, xla=xla_other_row)
  with pytest.raises(AssertionError, match="rms err"):      # 10% everywhere: fails
    oc.assert_close({"g": want["g"] * 1.1}, want, tol=tol, xla={"g": want["g"] * 1.05})
