"""The train step: the self-conditioned diffusion loss and one optimiser/EMA update.

Per step: t ~ U(0,1) per example, x_t = sqrt(g) x0 + sqrt(1-g) eps; a first pass with
z_prev = 0 (dropout on) whose latents are kept per example with probability
`self_cond_rate` (stop-gradient); a second pass from those latents; MSE to the target.
LAMB + warm-up/cosine, EMA weights.

The model's apply runs under `jax.shard_map` on each device's slice of the batch when the
mesh has several devices, so the fused kernels (custom calls) are never handed to the SPMD
partitioner; XLA inserts the gradient all-reduce around it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from rin import diffusion
from rin import distributed
from rin import video as video_lib
from rin.model import RIN
from rin.optim import learning_rate_schedule, make_optimizer
from rin.train_state import TrainState


DROPOUT_RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def dropout_rng_impl(config: ConfigDict) -> str:
  """config.train.dropout_rng, checked."""
  impl = config.train.dropout_rng
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(f"config.train.dropout_rng must be one of {DROPOUT_RNG_IMPLS}, got "
                     f"{impl!r}")
  return impl


def dropout_key(rng, impl: str = "threefry"):
  """The key dropout and drop-path draw their masks from, as an `impl` PRNG key (one of
  DROPOUT_RNG_IMPLS).

  "rbg"/"unsafe_rbg" generate the mask bits with XLA's RngBitGenerator instead of
  threefry hashing, a large share of a CPU train step (bench/results/README.md has the
  measurement). The key is derived from `rng`
  (deterministic, so resumed runs repeat the same masks); only the masks' random stream
  differs between impls, not their distribution. "rbg" keeps threefry for splitting/folding
  (flax folds a per-layer path into the key), "unsafe_rbg" uses the bit generator for that too.
  """
  if impl == "threefry":
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=impl)


def batch_chunks(config: ConfigDict, mesh=None) -> int:
  """config.train.batch_chunks resolved: an int >= 1, or 0 = auto: 2 on a single CPU device
  and 1 elsewhere (an int, so --config.train.batch_chunks=N overrides it).

  Why chunks on CPU: most of XLA:CPU's fusions in a RIN step run on one thread, leaving
  the other cores of a small CPU idle much of the step, so the batch
  is cut into independent chunks whose forward and backward passes the runtime can run side
  by side. The loss and gradients are those of the whole batch (the loss is a mean over
  examples); only the dropout masks differ, each chunk folding its index into the key.
  """
  chunks = config.train.batch_chunks
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
  """config.diffusion.cond_dropout, checked."""
  p = config.diffusion.cond_dropout
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
  cond_dropout = d.cond_dropout
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
  estimate, truth = diffusion.loss_pair(d.loss_type, d.target,
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
  skip_nonfinite = config.train.nonfinite == "skip"
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
