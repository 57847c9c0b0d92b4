"""Training loop: `python -m rin.train --config rin/configs/digits.py --workdir /tmp/rin`.

Per step: t ~ U(0,1) per example, x_t = sqrt(g) x0 + sqrt(1-g) eps; a first pass with
z_prev = 0 (dropout on) whose latents are kept per example with probability
`self_cond_rate` (stop-gradient); a second pass from those latents; MSE to the target.
LAMB + warm-up/cosine, EMA weights. Everything needed to resume (params, EMA, optimiser
state, step, RNG, data-iterator state) is checkpointed with orbax.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm.auto import tqdm

from rin import data as data_lib
from rin import diffusion
from rin.model import RIN
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
  impl = implementation or config.train.get("implementation") or None
  return RIN(**config.model.to_dict(), implementation=impl, interpret=interpret,
             dtype=_dtype(config.train.get("dtype")))


def _dummy_inputs(config: ConfigDict, batch: int = 1):
  m = config.model
  x = jnp.zeros((batch, m.image_size, m.image_size, m.channels), jnp.float32)
  return x, jnp.ones((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32)


def init_state(config: ConfigDict, model: RIN, rng) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = jax.jit(model.init)(init_rng, *_dummy_inputs(config))["params"]
  tx = make_optimizer(config.optim, config.train.num_steps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_rng)


def loss_and_metrics(params, model: RIN, config: ConfigDict, batch, rng):
  """The self-conditioned diffusion loss for one batch."""
  d = config.diffusion
  x0, labels = batch["image"], batch["label"]
  b = x0.shape[0]
  r_t, r_eps, r_keep, r_drop1, r_drop2 = jax.random.split(rng, 5)
  gamma = diffusion.get_schedule(d.train_schedule)(jax.random.uniform(r_t, (b,)))
  eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
  x_t = diffusion.add_noise(x0, eps, gamma)
  num_labels = labels if config.model.num_classes > 0 else None

  prev = None
  if d.self_cond_rate > 0:
    _, z = model.apply({"params": params}, x_t, gamma, num_labels, None, train=True,
                       rngs={"dropout": r_drop1})
    keep = jax.random.bernoulli(r_keep, d.self_cond_rate, (b, 1, 1))   # per example
    prev = jnp.where(keep, jax.lax.stop_gradient(z), 0.0)
  pred, _ = model.apply({"params": params}, x_t, gamma, num_labels, prev, train=True,
                        rngs={"dropout": r_drop2})
  target = diffusion.training_target(d.target, x0, eps, gamma)
  loss = jnp.mean(jnp.square(pred - target))
  return loss


def make_train_step(model: RIN, config: ConfigDict):
  """(state, batch) -> (state, metrics); not jitted (callers jit, with shardings)."""
  tx = make_optimizer(config.optim, config.train.num_steps)
  ema_decay = config.optim.ema_decay
  skip_nonfinite = config.train.get("nonfinite", "stop") == "skip"
  from rin.optim import learning_rate_schedule
  lr_fn = learning_rate_schedule(config.optim, config.train.num_steps)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(loss_and_metrics)(state.params, model, config, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                       state.ema_params, params)
    finite = jnp.isfinite(loss)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                        opt_state=opt_state)
    if skip_nonfinite:   # keep the old weights, still advance the step counter
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                         state.replace(step=state.step + 1))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": lr_fn(state.step), "finite": finite}
    return new, metrics

  return step_fn


def make_sample_fn(model: RIN, config: ConfigDict, *, num_steps: int | None = None,
                   sampler: str | None = None):
  """(params, rng, labels [B]) -> images [B,H,W,C] in [-1, 1]; jitted."""
  d, m = config.diffusion, config.model
  steps = num_steps or d.sample_steps
  sampler = sampler or d.sampler

  @jax.jit
  def sample_fn(params, rng, labels):
    b = labels.shape[0]
    lab = labels if m.num_classes > 0 else None
    denoise = lambda x_t, g, z: model.apply({"params": params}, x_t, g, lab, z, train=False)
    return diffusion.sample(
        denoise, rng, (b, m.image_size, m.image_size, m.channels), num_steps=steps,
        schedule=d.sample_schedule, sampler=sampler, target=d.target,
        latent_shape=(b, m.num_latents, m.latent_dim))

  return sample_fn


def draw_labels(rng, config: ConfigDict, n: int):
  """Class labels drawn uniformly (zeros for an unconditional model)."""
  k = config.model.num_classes
  if k <= 0:
    return jnp.zeros((n,), jnp.int32)
  return jax.random.randint(rng, (n,), 0, k, jnp.int32)


# ----------------------------------------------------------------------------
# Checkpoints and logs.
# ----------------------------------------------------------------------------

def _encode_iter_state(s) -> dict:
  if isinstance(s, (bytes, bytearray)):
    return {"bytes_b64": base64.b64encode(bytes(s)).decode()}
  return {"json": s}


def _decode_iter_state(d: dict):
  return base64.b64decode(d["bytes_b64"]) if "bytes_b64" in d else d["json"]


def checkpoint_manager(workdir: str, config: ConfigDict) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.train.get("keep_checkpoints", 3),
                                      create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=opts)


def save_checkpoint(mngr, state: TrainState, iterator) -> None:
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(_encode_iter_state(iterator.get_state()))))
  mngr.wait_until_finished()


def restore_checkpoint(mngr, abstract_state: TrainState, step: int | None = None):
  """(state, data-iterator state) of `step` (default latest)."""
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out.state, _decode_iter_state(out.data)


def check_config_matches(workdir: str, config: ConfigDict) -> None:
  """Writes config.json on first use; refuses a workdir trained with another model."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("model") != json.loads(config.model.to_json()):
      raise ValueError(
          f"workdir {workdir!r} holds checkpoints of a different model config "
          f"({path}); use a fresh --workdir or the original config")
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))


def save_image_grid(images, path: str) -> None:
  """images: [N, H, W, C] in [-1, 1] -> one PNG grid of ceil(sqrt(N)) columns."""
  from PIL import Image
  x = np.asarray(jnp.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)
  n, h, w, c = x.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  scale = max(1, 256 // grid.shape[0])
  img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img.save(path)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

def train(config: ConfigDict, workdir: str, *, implementation: str | None = None,
          interpret: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainState:
  """Trains (resuming from the latest checkpoint in `workdir` if any); returns the state.

  stop_after: end this call after that many steps (as if killed), for resume tests.
  """
  tc = config.train
  check_config_matches(workdir, config)
  dataset = data_lib.load_dataset(config.data.name, path=config.data.path or None,
                                  image_size=config.model.image_size)
  if dataset.images.shape[-1] != config.model.channels:
    raise ValueError(f"data set {config.data.name!r} has {dataset.images.shape[-1]} "
                     f"channels but config.model.channels={config.model.channels}")
  if config.model.num_classes > 0 and dataset.num_classes > config.model.num_classes:
    raise ValueError(f"data set has {dataset.num_classes} classes but "
                     f"config.model.num_classes={config.model.num_classes}")
  iterator = data_lib.make_train_iterator(dataset, batch_size=tc.batch_size, seed=tc.seed,
                                          random_flip=config.data.random_flip)
  model = create_model(config, implementation=implementation, interpret=interpret)
  state = init_state(config, model, jax.random.PRNGKey(tc.seed))
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state, iter_state = restore_checkpoint(mngr, state)
    iterator.set_state(iter_state)
    logging.info("resumed from step %d", int(state.step))

  step_fn = jax.jit(make_train_step(model, config), donate_argnums=(0,))
  sample_fn = make_sample_fn(model, config, num_steps=tc.sample_steps_during_training)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  start = int(state.step)
  bar = tqdm(total=tc.num_steps, initial=start, disable=not progress, desc="train",
             dynamic_ncols=True)
  t_last, n_last = time.perf_counter(), 0
  end = tc.num_steps if stop_after is None else min(tc.num_steps, start + stop_after)
  for step in range(start, end):
    batch = next(iterator)
    state, metrics = step_fn(state, {"image": jnp.asarray(batch["image"]),
                                     "label": jnp.asarray(batch["label"])})
    loss = float(metrics["loss"])
    if not np.isfinite(loss) and tc.get("nonfinite", "stop") == "stop":
      raise FloatingPointError(f"non-finite loss {loss} at step {step}; stopping "
                               f"(last checkpoint kept in {workdir})")
    n_last += 1
    done = step + 1
    if done % tc.log_every == 0 or done == tc.num_steps:
      dt = time.perf_counter() - t_last
      rec = {"step": done, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
             "lr": float(metrics["lr"]), "images_per_s": n_last * tc.batch_size / dt,
             "time": time.time()}
      with open(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['images_per_s']:.0f}")
      t_last, n_last = time.perf_counter(), 0
    bar.update(1)
    if done % tc.checkpoint_every == 0 or done == tc.num_steps:
      save_checkpoint(mngr, state, iterator)
    if done % tc.sample_every == 0 or done == tc.num_steps:
      rng = jax.random.PRNGKey(tc.seed + 1)
      labels = draw_labels(rng, config, tc.num_sample_images)
      images = sample_fn(state.ema_params, rng, labels)
      save_image_grid(images, os.path.join(workdir, "samples", f"step_{done:07d}.png"))
  bar.close()
  mngr.close()
  return state


def main():
  """CLI entry point; flags are defined here so importing rin.train defines none."""
  config = config_flags.DEFINE_config_file("config", "rin/configs/digits.py",
                                           "Path to a config file (get_config()).")
  workdir = flags.DEFINE_string("workdir", "runs/digits", "Checkpoints, metrics, samples.")
  impl = flags.DEFINE_string("implementation", None,
                             "Kernel implementation: xla, pallas_tpu, triton (default: "
                             "config.train.implementation, else the platform default).")
  interpret = flags.DEFINE_bool("interpret", False, "Run kernels in their interpreter (CPU).")

  def run(argv):
    del argv
    train(config.value, workdir.value, implementation=impl.value, interpret=interpret.value)

  app.run(run)


if __name__ == "__main__":
  main()
