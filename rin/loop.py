"""The training loop: `train(config, workdir)` (rin.train is its command line).

Scaling: the step is jitted over a 1-D device mesh ("data") spanning every device of every
process (`rin.distributed`): the batch is split over it, the weights are replicated (or
FSDP-sharded with config.train.fsdp). Multi-host: each host reads its own shard of the data.

Fault tolerance: atomic checkpoints every config.train.checkpoint_every steps and on
SIGTERM/SIGINT (the loop finishes its step, saves, and returns); resume picks the newest
readable checkpoint (a corrupt one is reported, moved aside, and the previous one used);
a NaN/Inf loss stops the run with its step number (config.train.nonfinite="stop") or
skips that update ("skip"). Everything needed to resume (params, EMA, optimiser state,
step, RNG, data-iterator state of every host) is in the checkpoint (rin.checkpoint).

Periodic actions after each step, in this order: log (metrics.jsonl, TensorBoard, the
progress bar), checkpoint, evaluate (rin.evaluation, every config.train.eval_every steps),
write sample images (every config.train.sample_every steps).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import jax
from absl import logging
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from rin import checkpoint as ckpt_lib
from rin import data as data_lib
from rin import distributed
from rin import evaluation
from rin import images as images_lib
from rin import logging_utils
from rin import sampling
from rin import video as video_lib
from rin.train_state import (TrainState, abstract_train_state, create_model, init_state,
                             load_and_check_data)
from rin.train_step import make_train_step


class StopFlag:
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


class NonfiniteGuard:
  """config.train.nonfinite: "stop" raises FloatingPointError at a NaN/Inf loss or gradient;
  "skip" counts the skipped updates (the step already kept the old weights) and raises after
  more than config.train.max_consecutive_skips in a row."""

  def __init__(self, tc: ConfigDict, writer, workdir: str):
    self.stop = tc.nonfinite == "stop"
    self.max_skips = tc.max_consecutive_skips
    self.writer, self.workdir = writer, workdir
    self.skipped = self.consecutive = 0

  def check(self, done: int, loss: float, metrics, saved_at: int) -> None:
    if bool(metrics["finite"]):
      self.consecutive = 0
      return
    gnorm = float(metrics["grad_norm"])
    if self.stop:
      self.writer.write(done, {"event": "nonfinite_stop", "loss": loss, "grad_norm": gnorm})
      raise FloatingPointError(
          f"non-finite loss {loss} (grad norm {gnorm}) at step {done}; stopping. The last "
          f"checkpoint (step {saved_at}) is kept in {self.workdir}; set "
          "config.train.nonfinite='skip' to skip such steps instead")
    self.skipped += 1
    self.consecutive += 1
    logging.warning("non-finite loss %s (grad norm %s) at step %d: update skipped "
                    "(%d skipped so far)", loss, gnorm, done, self.skipped)
    self.writer.write(done, {"event": "nonfinite_skip", "loss": loss,
                             "skipped_steps": self.skipped})
    if self.consecutive > self.max_skips:
      raise FloatingPointError(
          f"{self.consecutive} consecutive non-finite steps up to step {done}; stopping "
          f"(config.train.max_consecutive_skips={self.max_skips}); last checkpoint: step "
          f"{saved_at} in {self.workdir}")


class TrainLog:
  """Every config.train.log_every steps: loss, gradient norm, learning rate and images/s since
  the previous record, to metrics.jsonl/TensorBoard and the progress bar."""

  def __init__(self, tc: ConfigDict, writer, bar):
    self.batch_size, self.writer, self.bar = tc.batch_size, writer, bar
    self.t_last, self.n_last = time.perf_counter(), 0

  def step_done(self) -> None:
    self.n_last += 1

  def write(self, done: int, loss: float, metrics, skipped: int) -> None:
    dt = time.perf_counter() - self.t_last
    rec = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": float(metrics["lr"]),
           "images_per_s": self.n_last * self.batch_size / dt, "time": time.time()}
    if skipped:
      rec["skipped_steps"] = skipped
    self.writer.write(done, rec)
    self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['images_per_s']:.0f}")
    self.t_last, self.n_last = time.perf_counter(), 0


def write_training_samples(config: ConfigDict, sample_fn, params, workdir: str, step: int,
                           writer) -> None:
  """samples/step_N.png (images: config.train.num_sample_images of them) or .gif (video)."""
  rng = jax.random.PRNGKey(config.train.seed + 1)
  if video_lib.is_video(config):
    video_lib.write_training_samples(config, sample_fn, params, rng, workdir, step, writer)
    return
  labels = sampling.draw_labels(rng, config, config.train.num_sample_images)
  samples = distributed.to_host(sample_fn(params, rng, labels))
  if distributed.is_primary():
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    images_lib.save_image_grid(samples, path)
    writer.image("samples", path, step)


class TrainingEvaluation:
  """Evaluation every config.train.eval_every steps (0: never; never without a metric).
  The evaluator and its sampler are built at the first evaluation."""

  def __init__(self, config: ConfigDict, model, dataset, writer, out_sharding):
    self.config, self.model, self.dataset = config, model, dataset
    self.writer, self.out_sharding = writer, out_sharding
    self.every = config.train.eval_every if evaluation.has_eval_metric(config) else 0
    self.evaluator = self.sample_fn = None

  def due(self, done: int) -> bool:
    return bool(self.every) and _due(done, self.every, self.config.train.num_steps)

  def __call__(self, params, step: int) -> None:
    c = self.config
    if self.sample_fn is None:
      self.evaluator = evaluation.make_evaluator(c, self.dataset)
      self.sample_fn = sampling.make_sample_fn(
          self.model, c, out_sharding=self.out_sharding,
          **sampling.eval_sample_options(c, c.eval.sample_steps))
    t0 = time.perf_counter()
    res, _ = self.evaluator(self.sample_fn, params, seed=c.train.seed + 2,
                            batch_size=c.eval.batch_size)
    if res:
      res["eval_seconds"] = time.perf_counter() - t0
      self.writer.write(step, res, prefix="eval/")
      logging.info("eval at step %d: %s", step,
                   {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})


def _due(done: int, every: int, num_steps: int) -> bool:
  """A periodic action runs every `every` steps and after the last step of the schedule."""
  return done % every == 0 or done == num_steps


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
  if tc.nonfinite not in ("stop", "skip"):
    raise ValueError(f"config.train.nonfinite must be 'stop' or 'skip', got {tc.nonfinite!r}")
  model = create_model(config, implementation=implementation, interpret=interpret)
  ckpt_lib.check_config_matches(workdir, config)

  iterator = data_lib.make_train_iterator(
      dataset, batch_size=tc.batch_size, seed=tc.seed, random_flip=config.data.random_flip,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.worker_count)
  abstract, shardings = abstract_train_state(config, model, mesh)
  writer = logging_utils.MetricWriter(workdir, tensorboard=tc.tensorboard)
  mngr = ckpt_lib.checkpoint_manager(workdir, config)
  try:   # until the loop's own try/finally takes over, a failure must still close them
    restored = ckpt_lib.restore_latest(mngr, abstract, workdir)
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
    sample_fn = sampling.make_sample_fn(model, config, num_steps=tc.sample_steps_during_training,
                                        out_sharding=rep)
    evaluate = TrainingEvaluation(config, model, dataset, writer, rep)

    start = int(distributed.to_host(state.step))
    end = tc.num_steps
    if stop_after is not None:
      end = min(end, start + stop_after)
    if stop_at_step is not None:
      end = min(end, stop_at_step)
    if evaluate.every and start == 0 and config.eval.at_start and end > 0:
      evaluate(state.ema_params, 0)
  except BaseException:
    writer.close()
    mngr.close()
    raise

  stop = StopFlag().install()
  bar = tqdm(total=tc.num_steps, initial=start, disable=not progress or not distributed.is_primary(),
             desc="train", dynamic_ncols=True)
  log = TrainLog(tc, writer, bar)
  nonfinite = NonfiniteGuard(tc, writer, workdir)
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
      nonfinite.check(done, loss, metrics, saved_at)
      log.step_done()

      if _due(done, tc.log_every, tc.num_steps):
        log.write(done, loss, metrics, nonfinite.skipped)
      bar.update(1)
      stopping = distributed.any_process(stop.signum is not None)
      if _due(done, tc.checkpoint_every, tc.num_steps) or done == end or stopping:
        ckpt_lib.save_checkpoint(mngr, state, iterator)
        saved_at = done
      if stopping:
        logging.warning("stopped by signal at step %d; checkpoint saved in %s", done,
                        ckpt_lib.checkpoint_dir(workdir))
        writer.write(done, {"event": "stopped_by_signal"})
        break
      if evaluate.due(done):
        evaluate(state.ema_params, done)
      if tc.num_sample_images > 0 and _due(done, tc.sample_every, tc.num_steps):
        write_training_samples(config, sample_fn, state.ema_params, workdir, done, writer)
  finally:
    stop.uninstall()
    bar.close()
    writer.close()
    mngr.close()
  return state
