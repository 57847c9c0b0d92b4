"""kernels/shapes.py, the one table of kernel shapes, against the config files it comes from:
each row equals what rin/configs builds (the model's own num_patches for N, its read/write
width rule min(T, D)), so a config change that moves a kernel shape fails here."""
import importlib

import jax.numpy as jnp
import pytest

import rin
from kernels import shapes


def _from_config(row: shapes.ModelShapes) -> shapes.ModelShapes:
  m = dict(importlib.import_module(f"rin.configs.{row.config}").get_config().model)
  m.update(row.overrides)
  model = (rin.VideoRIN if "num_frames" in m else rin.RIN)(**m)
  layers = model.latent_layers_per_block
  assert isinstance(layers, int), f"{row.name}: per-block latent layers {layers!r}"
  t, d = model.interface_dim, model.latent_dim
  return shapes.ModelShapes(
      row.name, row.config, row.overrides, m=model.num_latents, d=d, n=model.num_patches,
      t=t, rw_heads=model.rw_heads, rw_width=model.rw_width or min(t, d),
      mlp_ratio=float(model.interface_mlp_ratio), latent_heads=model.latent_heads,
      num_blocks=model.num_blocks, latent_layers=layers)


@pytest.mark.parametrize("row", shapes.ALL, ids=lambda r: r.name)
def test_table_matches_the_config_files(row):
  assert row == _from_config(row)


def test_op_shapes_and_abstract_args():
  s = shapes.CIFAR10
  ops = {o.op: o for o in shapes.op_shapes(s)}
  assert set(ops) == set(shapes.OPS)
  assert (ops["read_attention"].lq, ops["read_attention"].lk) == (128, 256)
  assert (ops["write_attention"].lq, ops["write_attention"].lk) == (256, 128)
  assert ops["latent_self_attention"].head_dim == 32 and ops["write_block"].mlp == 512
  q, k, v = shapes.abstract_args(ops["read_attention"], 4, jnp.bfloat16)
  assert q.shape == (4, 128, 8, 32) and k.shape == (4, 256, 8, 32) and q.dtype == jnp.bfloat16
  x, z, p = shapes.abstract_args(ops["write_block"], 2, jnp.bfloat16, jnp.float32)
  assert x.shape == (2, 256, 256) and z.shape == (2, 128, 512)
  assert p.w1.shape == (256, 512) and p.wk.shape == (512, 256) and p.w1.dtype == jnp.float32
  _, _, rp = shapes.abstract_args(ops["read_block"], 1, jnp.float32)
  assert rp.wq.shape == (512, 256) and rp.wk.shape == (256, 256)
  assert shapes.op_shape(s, "read_block", n=4096).lk == 4096
