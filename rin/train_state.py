"""What a config builds before a step runs: the checked data set, the model, the train state
(fresh, abstract for a restore, or a checkpoint's EMA weights)."""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from rin import checkpoint as ckpt_lib
from rin import data as data_lib
from rin import distributed
from rin import video as video_lib
from rin.model import RIN, VideoRIN
from rin.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array          # raw uint32 key; each step uses fold_in(rng, step)


def _dtype(name: str | None):
  return None if not name or name == "float32" else jnp.dtype(name)


def create_model(config: ConfigDict, *, implementation: str | None = None,
                 interpret: bool = False) -> RIN:
  """The RIN of `config.model`; implementation defaults to config.train.implementation."""
  impl = implementation or config.train.implementation or None
  cls = VideoRIN if video_lib.is_video(config) else RIN
  return cls(**config.model.to_dict(), implementation=impl, interpret=interpret,
             dtype=_dtype(config.train.dtype))


def dummy_inputs(config: ConfigDict, batch: int = 1):
  """Zero model inputs of the config's shapes (for init and shape evaluation)."""
  if video_lib.is_video(config):
    return video_lib.dummy_inputs(config, batch)
  m = config.model
  x = jnp.zeros((batch, m.image_size, m.image_size, m.channels), jnp.float32)
  return x, jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)


def init_state(config: ConfigDict, model: RIN, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = jax.jit(model.init)(init_rng, *dummy_inputs(config))["params"]
  tx = make_optimizer(config.optim, config.train.num_steps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_rng)


def abstract_train_state(config: ConfigDict, model: RIN, mesh=None):
  """ShapeDtypeStructs (with shardings when mesh is given) of the train state."""
  abstract = jax.eval_shape(lambda: init_state(config, model, jax.random.PRNGKey(0)))
  if mesh is None:
    return abstract, None
  shardings = distributed.state_shardings(abstract, mesh, fsdp=config.train.fsdp,
                                          min_size=config.train.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def load_ema_params(config: ConfigDict, workdir: str, model, *, write_config: bool = True):
  """(EMA weights, step) of the newest readable checkpoint in workdir (a clear error when
  there is none). write_config: write config.json into a workdir that lacks one (as
  rin.sample always did; rin.visualize only reads)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir!r} ({ckpt_dir} is missing)")
  ckpt_lib.check_config_matches(workdir, config, write=write_config)
  mngr = ckpt_lib.checkpoint_manager(workdir, config)
  try:
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint found in {ckpt_dir}")
    abstract = jax.eval_shape(lambda: init_state(config, model, jax.random.PRNGKey(0)))
    state, _, step = ckpt_lib.restore_latest(mngr, abstract, workdir)
  finally:
    mngr.close()
  logging.info("loaded step %d from %s", step, ckpt_dir)
  return state.ema_params, step


def load_and_check_data(config: ConfigDict):
  """The training data set of `config`, checked against the model config (before anything
  is written to the workdir)."""
  if video_lib.is_video(config):
    return video_lib.load_and_check_data(config)
  m = config.model
  if m.image_size % m.patch_size:
    raise ValueError(f"config.model.image_size={m.image_size} is not divisible by "
                     f"config.model.patch_size={m.patch_size}")
  dataset = data_lib.load_dataset(config.data.name, path=config.data.path or None,
                                  image_size=m.image_size)
  h, w, c = dataset.image_shape
  if (h, w) != (m.image_size, m.image_size):
    raise ValueError(f"data set {config.data.name!r} yields {h}x{w} images but "
                     f"config.model.image_size={m.image_size}")
  if c != m.channels:
    raise ValueError(f"data set {config.data.name!r} has {c} channels but "
                     f"config.model.channels={m.channels}")
  if m.num_classes > 0 and dataset.num_classes > m.num_classes:
    raise ValueError(f"data set has {dataset.num_classes} classes but "
                     f"config.model.num_classes={m.num_classes}")
  if config.train.batch_size > len(dataset):
    raise ValueError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                     f"{len(dataset)} training images of {config.data.name!r}")
  return dataset
