"""CIFAR-10 32x32, the authors' published configuration (30.95M parameters).

The base config (rin/configs/base.py) holds the authors' CIFAR-10 sweep values; this file
adds the CIFAR-10-only ones.
"""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(dropout=0.1, drop_path=0.1)
  c.diffusion.update(train_schedule="sigmoid@-3,3,0.9")
  c.data.update(name="cifar10")
  return c
