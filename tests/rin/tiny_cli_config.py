"""tests/rin/tiny.py's tiny_config as a config file for `python -m rin.train --config`."""
from tests.rin.tiny import tiny_config


def get_config():
  cfg = tiny_config()
  cfg.train.update(tensorboard=False)
  return cfg
