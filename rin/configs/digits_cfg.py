"""The digits config trained for classifier-free guidance: labels dropped with probability
0.1 (config.diffusion.cond_dropout), so `rin.sample --guidance W` has an unconditional
model to extrapolate from. Everything else is rin/configs/digits.py."""
from rin.configs import digits


def get_config():
  c = digits.get_config()
  c.diffusion.cond_dropout = 0.1
  return c
