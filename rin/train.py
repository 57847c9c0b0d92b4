"""Training loop: `python -m rin.train --config rin/configs/digits.py --workdir /tmp/rin`.

Per step: t ~ U(0,1) per example, x_t = sqrt(g) x0 + sqrt(1-g) eps; a first pass with
z_prev = 0 (dropout on) whose latents are kept per example with probability
`self_cond_rate` (stop-gradient); a second pass from those latents; MSE to the target.
LAMB + warm-up/cosine, EMA weights. Everything needed to resume (params, EMA, optimiser
state, step, RNG, data-iterator state of every host) is checkpointed with orbax.

Scaling: the step is jitted over a 1-D device mesh ("data") spanning every device of every
process (`rin.distributed`): the batch is split over it, the weights are replicated (or
FSDP-sharded with config.train.fsdp) and XLA inserts the gradient all-reduce. The model's
apply runs under `jax.shard_map` on each device's slice of the batch, so the fused kernels
(custom calls) are never handed to the SPMD partitioner. Multi-host: --coordinator,
--num_processes, --process_id (or JAX's environment) start `jax.distributed`; each host
reads its own shard of the data.

Fault tolerance: atomic checkpoints every config.train.checkpoint_every steps and on
SIGTERM/SIGINT (the loop finishes its step, saves, and exits 0); resume picks the newest
readable checkpoint (a corrupt one is reported, moved aside, and the previous one used);
a NaN/Inf loss stops the run with its step number (config.train.nonfinite="stop") or
skips that update ("skip"). Evaluation (digits metric, FID/IS with a user-supplied
Inception file) every config.train.eval_every steps; metrics in metrics.jsonl and
TensorBoard.
"""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
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

from rin import checkpoint as ckpt_lib
from rin import data as data_lib
from rin import diffusion
from rin import distributed
from rin import logging_utils
from rin import video as video_lib
from rin import xla_cpu
from rin.model import RIN, VideoRIN
from rin.optim import learning_rate_schedule, make_optimizer


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
  cls = VideoRIN if video_lib.is_video(config) else RIN
  return cls(**config.model.to_dict(), implementation=impl, interpret=interpret,
             dtype=_dtype(config.train.get("dtype")))


def _dummy_inputs(config: ConfigDict, batch: int = 1):
  if video_lib.is_video(config):
    return video_lib.dummy_inputs(config, batch)
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


DROPOUT_RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def dropout_rng_impl(config: ConfigDict) -> str:
  """config.train.dropout_rng (default "threefry" for configs that predate it), checked."""
  impl = config.train.get("dropout_rng", "threefry")
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(f"config.train.dropout_rng must be one of {DROPOUT_RNG_IMPLS}, got "
                     f"{impl!r}")
  return impl


def dropout_key(rng, impl: str = "threefry"):
  """The key dropout and drop-path draw their masks from, as an `impl` PRNG key (one of
  DROPOUT_RNG_IMPLS).

  "rbg"/"unsafe_rbg" generate the mask bits with XLA's RngBitGenerator instead of
  threefry hashing, which on CPU took ~20% of a CIFAR-10 train step (README, "Scaling and
  fault tolerance": bf16 6.69 -> 5.08 s at batch 32). The key is derived from `rng`
  (deterministic, so resumed runs repeat the same masks); only the masks' random stream
  differs between impls, not their distribution. "rbg" keeps threefry for splitting/folding
  (flax folds a per-layer path into the key), "unsafe_rbg" uses the bit generator for that too.
  """
  if impl == "threefry":
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=impl)


def batch_chunks(config: ConfigDict, mesh=None) -> int:
  """config.train.batch_chunks resolved: an int >= 1, or 0 = auto: 2 on a single CPU device
  and 1 elsewhere (an int, so --config.train.batch_chunks=N overrides it; default 1 for
  configs that predate it).

  Why chunks on CPU: most of XLA:CPU's fusions in a RIN step run on one thread (a profile
  of the bf16 CIFAR-10 step had one of the two cores idle ~60% of the time), so the batch
  is cut into independent chunks whose forward and backward passes the runtime can run side
  by side. The loss and gradients are those of the whole batch (the loss is a mean over
  examples); only the dropout masks differ, each chunk folding its index into the key.
  """
  chunks = config.train.get("batch_chunks", 1)
  if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
    raise ValueError(f"config.train.batch_chunks must be an int >= 1, or 0 for auto; got "
                     f"{chunks!r}")
  if chunks == 0:
    single = mesh is None or mesh.size == 1
    return 2 if single and jax.default_backend() == "cpu" else 1
  return chunks


def make_apply(model: RIN, mesh=None, *, dropout_rng: str = "threefry", chunks: int = 1):
  """(params, x_t, gamma, labels|None, prev|None, dropout_rng) -> (pred, z), train mode.

  With a multi-device mesh the apply runs under shard_map, once per device on its slice of
  the batch (weights replicated into it), so kernel custom calls stay per-device; each
  device folds its index into the dropout key. dropout_rng: the PRNG implementation of the
  masks (dropout_key). chunks (unsharded only): apply the model to that many slices of the
  batch, independently (batch_chunks), and concatenate.
  """
  def apply(params, x_t, gamma, labels, prev, rng):
    return model.apply({"params": params}, x_t, gamma, labels, prev, train=True,
                       rngs={"dropout": dropout_key(rng, dropout_rng)})

  def chunked(params, x_t, gamma, labels, prev, rng):
    b = x_t.shape[0]
    if b < chunks:
      raise ValueError(f"config.train.batch_chunks={chunks} exceeds the batch size {b}")
    bounds = [round(i * b / chunks) for i in range(chunks + 1)]
    part = lambda a, i: None if a is None else a[bounds[i]:bounds[i + 1]]
    outs = [apply(params, part(x_t, i), part(gamma, i), part(labels, i), part(prev, i),
                  jax.random.fold_in(rng, i)) for i in range(chunks)]
    return tuple(jnp.concatenate(pieces) for pieces in zip(*outs))

  if mesh is None or mesh.size == 1:
    return apply if chunks == 1 else chunked

  def per_device(params, rng, x_t, gamma, labels, prev):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(distributed.DATA_AXIS))
    return apply(params, x_t, gamma, labels, prev, rng)

  sharded = distributed.shard_map_apply(per_device, mesh, num_replicated=2, num_batched=4,
                                        num_out=2)
  return lambda params, x_t, gamma, labels, prev, rng: sharded(params, rng, x_t, gamma,
                                                               labels, prev)


_COND_DROPOUT_FOLD = 0x4346   # "CF": the label-dropout key is fold_in(step key, this)


def check_cond_dropout(config: ConfigDict) -> float:
  """config.diffusion.cond_dropout (default 0 for configs that predate it), checked."""
  p = config.diffusion.get("cond_dropout", 0.0)
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
    raise ValueError(f"config.diffusion.cond_dropout must be a number in [0, 1), got {p!r}")
  if p > 0 and config.model.num_classes <= 0:
    raise ValueError(f"config.diffusion.cond_dropout={p} needs a class-conditional model "
                     f"(config.model.num_classes > 0)")
  return float(p)


def loss_and_metrics(params, model: RIN, config: ConfigDict, batch, rng, *, mesh=None):
  """The self-conditioned diffusion loss for one batch (float32 whatever the compute dtype).

  All randomness (t, noise, self-conditioning coins) is drawn for the global batch, so a
  sharded run draws the same numbers as an unsharded one.
  """
  d = config.diffusion
  apply = make_apply(model, mesh, dropout_rng=dropout_rng_impl(config),
                     chunks=batch_chunks(config, mesh))
  x0, labels = batch["image"], batch["label"]
  if video_lib.is_video(config):   # the conditioning frames take the labels' argument slot
    labels, x0 = video_lib.split_clip(x0, config.model.cond_frames)
  b = x0.shape[0]
  r_t, r_eps, r_keep, r_drop1, r_drop2 = jax.random.split(rng, 5)
  gamma = diffusion.get_schedule(d.train_schedule)(jax.random.uniform(r_t, (b,)))
  eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
  x_t = diffusion.add_noise(x0, eps, gamma)
  num_labels = labels if config.model.num_classes > 0 or video_lib.is_video(config) else None
  cond_dropout = d.get("cond_dropout", 0.0)
  if config.model.num_classes > 0 and cond_dropout > 0:
    # Classifier-free guidance training: per example, the label is replaced by the
    # unconditional token (a zero one-hot, as the authors' labels * 0) with probability
    # cond_dropout. Its key is folded off `rng` and only drawn here, so cond_dropout = 0
    # draws exactly the numbers it drew before this option existed.
    drop = jax.random.uniform(jax.random.fold_in(rng, _COND_DROPOUT_FOLD), (b,)) < cond_dropout
    num_labels = jnp.where(drop, diffusion.NULL_LABEL, num_labels)

  prev = None
  if d.self_cond_rate > 0:
    # The first pass is never differentiated (its latents are stop-gradiented below):
    # stop-gradient its params too, so kernels run their undifferentiated forwards.
    _, z = apply(jax.lax.stop_gradient(params), x_t, gamma, num_labels, None, r_drop1)
    keep = jax.random.bernoulli(r_keep, d.self_cond_rate, (b, 1, 1))   # per example
    prev = jnp.where(keep, jax.lax.stop_gradient(z), 0.0).astype(z.dtype)
  pred, _ = apply(params, x_t, gamma, num_labels, prev, r_drop2)
  estimate, truth = diffusion.loss_pair(d.get("loss_type", d.target), d.target,
                                       pred.astype(jnp.float32), x0, eps, x_t, gamma)
  loss = jnp.mean(jnp.square(estimate - truth))
  return loss


def make_train_step(model: RIN, config: ConfigDict, *, mesh=None):
  """(state, batch) -> (state, metrics); not jitted (callers jit, with shardings).

  mesh: run the model apply per device under shard_map (see make_apply).
  """
  dropout_rng_impl(config)     # a bad name fails here, before tracing
  check_cond_dropout(config)
  batch_chunks(config, mesh)
  tx = make_optimizer(config.optim, config.train.num_steps)
  ema_decay = config.optim.ema_decay
  skip_nonfinite = config.train.get("nonfinite", "stop") == "skip"
  lr_fn = learning_rate_schedule(config.optim, config.train.num_steps)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(loss_and_metrics)(state.params, model, config, batch, rng,
                                                       mesh=mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                       state.ema_params, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    new = state.replace(step=state.step + 1, params=params, ema_params=ema,
                        opt_state=opt_state)
    if skip_nonfinite:   # keep the old weights, still advance the step counter
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                         state.replace(step=state.step + 1))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": lr_fn(state.step), "finite": finite}
    return new, metrics

  return step_fn


def sample_options(config: ConfigDict, **overrides) -> dict:
  """The sampler keyword arguments of rin.diffusion.sample from config.diffusion, with
  `overrides` (None values ignored) on top: num_steps, sampler, schedule, time_delay,
  time_grid, guidance, guidance_interval, guidance_latents."""
  d = config.diffusion
  opts = dict(num_steps=d.sample_steps, sampler=d.sampler, schedule=d.sample_schedule,
              time_delay=d.get("time_delay", 0.0), time_grid=d.get("time_grid", "uniform"),
              guidance=d.get("guidance", 0.0), guidance_interval=d.get("guidance_interval", None),
              guidance_latents=d.get("guidance_latents", "shared"))
  unknown = set(overrides) - set(opts)
  if unknown:
    raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; expected {sorted(opts)}")
  opts.update({k: v for k, v in overrides.items() if v is not None})
  if opts["guidance_interval"] is not None:
    opts["guidance_interval"] = tuple(float(v) for v in opts["guidance_interval"])
  if opts["guidance"] != 0 and config.model.num_classes <= 0:
    raise ValueError(f"guidance={opts['guidance']} needs a class-conditional model "
                     "(config.model.num_classes > 0)")
  return opts


def make_sample_fn(model: RIN, config: ConfigDict, *, num_steps: int | None = None,
                   sampler: str | None = None, out_sharding=None, **options):
  """(params, rng, labels [B]) -> images [B,H,W,C] in [-1, 1]; jitted. Video configs:
  (params, rng, conditioning frames [B,Fc,H,W,C]) -> predicted frames [B,F-Fc,H,W,C].

  options: schedule, time_delay, time_grid, guidance, guidance_interval, guidance_latents
  (see sample_options; defaults from config.diffusion).
  out_sharding: e.g. a replicated NamedSharding, so every process can read the images.
  """
  d, m = config.diffusion, config.model
  opts = sample_options(config, num_steps=num_steps, sampler=sampler, **options)

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def sample_fn(params, rng, labels):
    b = labels.shape[0]
    shape = (b, m.image_size, m.image_size, m.channels)
    if video_lib.is_video(config):
      # The conditioning frames ride in the labels slot; guidance needs class labels.
      if opts["guidance"]:
        raise ValueError("guidance needs a class-conditional image model; video configs "
                         "condition on frames")
      shape = shape[:1] + (video_lib.pred_frames(config),) + shape[1:]
      denoise = lambda x_t, g, z, lab=None: model.apply({"params": params}, x_t, g, labels, z,
                                                        train=False)
      return diffusion.sample(denoise, rng, shape, target=d.target,
                              latent_shape=(b, m.num_latents, m.latent_dim), **opts)
    denoise = lambda x_t, g, z, lab=None: model.apply({"params": params}, x_t, g, lab, z,
                                                      train=False)
    return diffusion.sample(
        denoise, rng, shape, target=d.target, latent_shape=(b, m.num_latents, m.latent_dim),
        labels=labels if m.num_classes > 0 else None, **opts)

  return sample_fn


EVAL_PROTOCOLS = ("", "authors")


def protocol_options(protocol: str, steps: int | None = None) -> dict:
  """Sampler overrides of an evaluation protocol: "" (none) or "authors", the paper's FID
  protocol: DDPM, cosine schedule, 1000 steps (or `steps`, e.g. 400), no guidance."""
  if protocol not in EVAL_PROTOCOLS:
    raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of "
                     f"{EVAL_PROTOCOLS}")
  if not protocol:
    return {} if steps is None else {"num_steps": steps}
  return dict(sampler="ddpm", schedule="cosine", num_steps=steps or 1000, time_delay=0.0,
              time_grid="uniform", guidance=0.0)


def eval_sample_options(config: ConfigDict, steps: int | None) -> dict:
  """Sampling options of training-time evaluation: config.eval.protocol ("authors": the
  paper's DDPM/cosine/config.eval.protocol_steps protocol) or config.eval.sample_steps."""
  ev = config.get("eval", ConfigDict())
  protocol = ev.get("protocol", "")
  if protocol:
    return protocol_options(protocol, ev.get("protocol_steps", 1000))
  opts = protocol_options("", steps)
  if ev.get("sampler"):          # "" = the diffusion sampler
    opts["sampler"] = ev.sampler
  return opts


def draw_labels(rng, config: ConfigDict, n: int):
  """Class labels drawn uniformly (zeros for an unconditional model)."""
  k = config.model.num_classes
  if k <= 0:
    return jnp.zeros((n,), jnp.int32)
  return jax.random.randint(rng, (n,), 0, k, jnp.int32)


# ----------------------------------------------------------------------------
# Checkpoints and logs (implemented in rin.checkpoint; the names stay importable here).
# ----------------------------------------------------------------------------

checkpoint_manager = ckpt_lib.checkpoint_manager
save_checkpoint = ckpt_lib.save_checkpoint
restore_checkpoint = ckpt_lib.restore_checkpoint
restore_latest = ckpt_lib.restore_latest
check_config_matches = ckpt_lib.check_config_matches
CheckpointError = ckpt_lib.CheckpointError


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
# Evaluation.
# ----------------------------------------------------------------------------

def has_eval_metric(config: ConfigDict) -> bool:
  """Whether Evaluator(config) has any metric (same answer on every process)."""
  if video_lib.is_video(config):
    return True     # prediction vs the true continuation needs no download
  ev = config.get("eval", ConfigDict())
  digits = (config.data.name == "digits" and config.model.channels == 1
            and ev.get("digits", True))
  return bool(digits or ev.get("inception_path", ""))


def fid_reference_images(dataset, n: int, *, seed: int) -> np.ndarray:
  """A seeded random subset of min(n, len) training images as floats in [-1, 1].

  Random, not the first n: image folders list class by class, so a prefix would
  cover only the first classes and bias FID.
  """
  n = min(len(dataset), int(n))
  pick = np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False))
  return dataset.images[pick].astype(np.float32) / 127.5 - 1.0


class Evaluator:
  """Sample-quality metrics for a config: the digits metric on the embedded digits data,
  FID/IS when config.eval.inception_path names an Inception weights file."""

  def __init__(self, config: ConfigDict, dataset=None):
    from rin import metrics
    ev = config.get("eval", ConfigDict())
    self.parts = []
    m = config.model
    if config.data.name == "digits" and m.channels == 1 and ev.get("digits", True):
      self.parts.append(("", metrics.DigitsEvaluator(m.image_size)))
    path = ev.get("inception_path", "")
    if path:
      ref = ev.get("fid_reference", "")
      if not ref:
        if dataset is None:
          raise ValueError("config.eval.inception_path is set: give config.eval.fid_reference "
                           "(an .npz with mu and sigma) or training data for reference stats")
        ref = fid_reference_images(dataset, ev.get("fid_reference_images", 10_000),
                                   seed=config.train.seed)
        if ref.shape[-1] == 1:
          ref = np.repeat(ref, 3, axis=-1)
      self.parts.append(("", _RGBWrapper(metrics.FIDEvaluator(ref, weights_path=path))))
    if not self.parts:
      logging.warning("no evaluation metric for data set %r without config.eval.inception_path",
                      config.data.name)

  def __bool__(self):
    return bool(self.parts)

  def __call__(self, samples, labels=None) -> dict:
    """Scores samples [N,H,W,C] in [-1, 1] (labels: the classes they were drawn for)."""
    from rin import metrics
    out = {}
    for prefix, ev in self.parts:
      res = ev(samples, labels) if isinstance(ev, metrics.DigitsEvaluator) else ev(samples)
      out.update({prefix + k: v for k, v in res.items()})
    return out


class _RGBWrapper:
  """Grey images -> 3 channels for the Inception network."""

  def __init__(self, ev):
    self.ev = ev

  def __call__(self, samples):
    x = np.asarray(samples)
    return self.ev(np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x)


def evaluate(config: ConfigDict, evaluator, sample_fn, params, *, seed: int,
             num_samples: int, batch_size: int):
  """Draws `num_samples` EMA samples (all processes) and scores them (primary only)."""
  rng = jax.random.PRNGKey(seed)
  labels = draw_labels(jax.random.fold_in(rng, 1), config, num_samples)
  images = []
  for i, s in enumerate(range(0, num_samples, batch_size)):
    images.append(distributed.to_host(sample_fn(params, jax.random.fold_in(rng, 2 + i),
                                                labels[s:s + batch_size])))
  images = np.concatenate(images)
  if not distributed.is_primary():
    return {}, images
  res = evaluator(images, np.asarray(labels) if config.model.num_classes > 0 else None)
  return res, images


# ----------------------------------------------------------------------------
# Input checks (before anything is written to the workdir).
# ----------------------------------------------------------------------------

def load_and_check_data(config: ConfigDict):
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


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------

class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the end of its step."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:   # second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("received %s: will checkpoint and stop after this step",
                    signal.Signals(signum).name)

  def uninstall(self):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


def abstract_train_state(config: ConfigDict, model: RIN, mesh=None):
  """ShapeDtypeStructs (with shardings when mesh is given) of the train state."""
  abstract = jax.eval_shape(lambda: init_state(config, model, jax.random.PRNGKey(0)))
  if mesh is None:
    return abstract, None
  shardings = distributed.state_shardings(abstract, mesh, fsdp=config.train.get("fsdp", False),
                                          min_size=config.train.get("fsdp_min_size", 0))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def train(config: ConfigDict, workdir: str, *, implementation: str | None = None,
          interpret: bool = False, progress: bool = True,
          stop_after: int | None = None, stop_at_step: int | None = None,
          mesh=None) -> TrainState:
  """Trains (resuming from the newest readable checkpoint in `workdir`); returns the state.

  stop_after: end this call after that many steps (as if killed), for resume tests.
  stop_at_step: end this call (with a checkpoint) once the global step reaches it.
  mesh: the device mesh (default: every device of every process).
  """
  tc = config.train
  # Everything that can be checked is checked before the workdir is touched.
  dataset = load_and_check_data(config)
  mesh = distributed.make_mesh() if mesh is None else mesh
  distributed.check_batch_divisible(tc.batch_size, mesh)
  if tc.get("nonfinite", "stop") not in ("stop", "skip"):
    raise ValueError(f"config.train.nonfinite must be 'stop' or 'skip', got {tc.nonfinite!r}")
  model = create_model(config, implementation=implementation, interpret=interpret)
  check_config_matches(workdir, config)

  iterator = data_lib.make_train_iterator(
      dataset, batch_size=tc.batch_size, seed=tc.seed, random_flip=config.data.random_flip,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.get("worker_count", 0))
  abstract, shardings = abstract_train_state(config, model, mesh)
  writer = logging_utils.MetricWriter(workdir, tensorboard=tc.get("tensorboard", True))
  mngr = checkpoint_manager(workdir, config)
  try:   # until the loop's own try/finally takes over, a failure must still close them
    restored = restore_latest(mngr, abstract, workdir, validate_iter=None)
    if restored is not None:
      state, iter_state, step0 = restored
      iterator.set_state(iter_state)
      dropped = writer.truncate_after(step0)
      logging.info("resumed from step %d%s", step0,
                   f" (dropped {dropped} metric records written after it)" if dropped else "")
    else:
      state = jax.jit(lambda k: init_state(config, model, k), out_shardings=shardings)(
          jax.random.PRNGKey(tc.seed))
      writer.truncate_after(0)

    rep = distributed.replicated(mesh)
    batch_sh = distributed.batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(model, config, mesh=mesh),
                      in_shardings=(shardings, {"image": batch_sh, "label": batch_sh}),
                      out_shardings=(shardings, rep), donate_argnums=(0,))
    sample_fn = make_sample_fn(model, config, num_steps=tc.sample_steps_during_training,
                               out_sharding=rep)
    ev_cfg = config.get("eval", ConfigDict())
    eval_every = tc.get("eval_every", 0) if has_eval_metric(config) else 0
    evaluator = None
    eval_sample_fn = None

    def run_eval(step_now):
      nonlocal evaluator, eval_sample_fn
      if eval_sample_fn is None:
        if video_lib.is_video(config):   # every process samples; the primary scores
          evaluator = video_lib.VideoEvaluator(config)
        else:
          evaluator = Evaluator(config, dataset) if distributed.is_primary() else None
        eval_sample_fn = make_sample_fn(
            model, config, out_sharding=rep,
            **eval_sample_options(config, ev_cfg.get("sample_steps",
                                                     tc.sample_steps_during_training)))
      t0 = time.perf_counter()
      if video_lib.is_video(config):
        res, _ = evaluator(eval_sample_fn, state.ema_params, seed=tc.seed + 2,
                           batch_size=ev_cfg.get("batch_size", 256))
      else:
        res, _ = evaluate(config, evaluator, eval_sample_fn, state.ema_params, seed=tc.seed + 2,
                          num_samples=ev_cfg.get("num_samples", 256),
                          batch_size=ev_cfg.get("batch_size", 256))
      if res:
        res["eval_seconds"] = time.perf_counter() - t0
        writer.write(step_now, res, prefix="eval/")
        logging.info("eval at step %d: %s", step_now,
                     {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})

    start = int(distributed.to_host(state.step))
    end = tc.num_steps
    if stop_after is not None:
      end = min(end, start + stop_after)
    if stop_at_step is not None:
      end = min(end, stop_at_step)
    if eval_every and start == 0 and ev_cfg.get("at_start", True) and end > 0:
      run_eval(0)
  except BaseException:
    writer.close()
    mngr.close()
    raise

  stop = _StopFlag().install()
  bar = tqdm(total=tc.num_steps, initial=start, disable=not progress or not distributed.is_primary(),
             desc="train", dynamic_ncols=True)
  t_last, n_last = time.perf_counter(), 0
  skipped = consecutive_skips = 0
  max_skips = tc.get("max_consecutive_skips", 100)
  saved_at = start
  per_host = tc.batch_size // jax.process_count()
  try:
    for step in range(start, end):
      local = next(iterator)
      if local["image"].shape[0] != per_host:
        raise ValueError(f"data iterator yielded {local['image'].shape[0]} images, expected "
                         f"{per_host} per process")
      batch = distributed.global_batch({"image": local["image"], "label": local["label"]}, mesh)
      state, metrics = step_fn(state, batch)
      loss = float(metrics["loss"])
      done = step + 1
      if not bool(metrics["finite"]):
        gnorm = float(metrics["grad_norm"])
        if tc.get("nonfinite", "stop") == "stop":
          writer.write(done, {"event": "nonfinite_stop", "loss": loss, "grad_norm": gnorm})
          raise FloatingPointError(
              f"non-finite loss {loss} (grad norm {gnorm}) at step {done}; stopping. The last "
              f"checkpoint (step {saved_at}) is kept in {workdir}; set "
              "config.train.nonfinite='skip' to skip such steps instead")
        skipped += 1
        consecutive_skips += 1
        logging.warning("non-finite loss %s (grad norm %s) at step %d: update skipped "
                        "(%d skipped so far)", loss, gnorm, done, skipped)
        writer.write(done, {"event": "nonfinite_skip", "loss": loss, "skipped_steps": skipped})
        if consecutive_skips > max_skips:
          raise FloatingPointError(
              f"{consecutive_skips} consecutive non-finite steps up to step {done}; stopping "
              f"(config.train.max_consecutive_skips={max_skips}); last checkpoint: step "
              f"{saved_at} in {workdir}")
      else:
        consecutive_skips = 0
      n_last += 1
      if done % tc.log_every == 0 or done == tc.num_steps:
        dt = time.perf_counter() - t_last
        rec = {"loss": loss, "grad_norm": float(metrics["grad_norm"]),
               "lr": float(metrics["lr"]), "images_per_s": n_last * tc.batch_size / dt,
               "time": time.time()}
        if skipped:
          rec["skipped_steps"] = skipped
        writer.write(done, rec)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['images_per_s']:.0f}")
        t_last, n_last = time.perf_counter(), 0
      bar.update(1)
      stopping = distributed.any_process(stop.signum is not None)
      if done % tc.checkpoint_every == 0 or done == tc.num_steps or done == end or stopping:
        save_checkpoint(mngr, state, iterator)
        saved_at = done
      if stopping:
        logging.warning("stopped by signal at step %d; checkpoint saved in %s", done,
                        ckpt_lib.checkpoint_dir(workdir))
        writer.write(done, {"event": "stopped_by_signal"})
        break
      if eval_every and (done % eval_every == 0 or done == tc.num_steps):
        run_eval(done)
      if tc.num_sample_images > 0 and (done % tc.sample_every == 0 or done == tc.num_steps):
        rng = jax.random.PRNGKey(tc.seed + 1)
        if video_lib.is_video(config):
          video_lib.write_training_samples(config, sample_fn, state.ema_params, rng, workdir,
                                           done, writer)
          continue
        labels = draw_labels(rng, config, tc.num_sample_images)
        images = distributed.to_host(sample_fn(state.ema_params, rng, labels))
        if distributed.is_primary():
          path = os.path.join(workdir, "samples", f"step_{done:07d}.png")
          save_image_grid(images, path)
          writer.image("samples", path, done)
  finally:
    stop.uninstall()
    bar.close()
    writer.close()
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
  coordinator = flags.DEFINE_string(
      "coordinator", None, "Multi-host: address host:port of process 0 (or "
      "JAX_COORDINATOR_ADDRESS); starts jax.distributed.")
  num_processes = flags.DEFINE_integer("num_processes", None,
                                       "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
  process_id = flags.DEFINE_integer("process_id", None,
                                    "Multi-host: this process's index (or JAX_PROCESS_ID).")
  stop_at = flags.DEFINE_integer("stop_at_step", None,
                                 "Checkpoint and exit once this global step is reached "
                                 "(the schedule still follows config.train.num_steps).")
  progress = flags.DEFINE_bool("progress", True, "Show the progress bar.")

  def run(argv):
    del argv
    # Before the first computation starts the backend: oneDNN dots (bf16: every dot) and
    # malloc settings that keep XLA's per-step temporaries mapped (rin/xla_cpu.py).
    xla_cpu.configure(config.value.train.get("dtype"))
    distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    if jax.process_count() > 1:
      logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                   jax.process_count(), jax.local_device_count(), jax.device_count())
    try:
      train(config.value, workdir.value, implementation=impl.value, interpret=interpret.value,
            stop_at_step=stop_at.value, progress=progress.value)
    except FloatingPointError as e:
      logging.error("%s", e)
      print(f"rin.train: {e}", flush=True)
      raise SystemExit(3)
    if jax.process_count() > 1:
      distributed.exit_process(0)     # everything is saved (the checkpoint save is a barrier)

  app.run(run)


if __name__ == "__main__":
  main()
