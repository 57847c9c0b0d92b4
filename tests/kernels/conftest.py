"""Fixtures shared by the kernel tests."""
import jax
import pytest


@pytest.fixture
def float64_oracle():
  """float64 for the jax.numpy reference, scoped to one test; kernels still get fp32/fp16/bf16.
  Use per module with `pytestmark = pytest.mark.usefixtures("float64_oracle")`."""
  with jax.enable_x64(True):
    yield
