"""Integer helpers of the backends' tilings (grid sizes, padded lengths)."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
  """ceil(a / b) for positive integers."""
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  """The smallest multiple of b that is >= a."""
  return cdiv(a, b) * b


def next_pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, int(n - 1).bit_length())
