"""Does a video model use its conditioning frames? Two diagnostics behind issue 16's findings.

    python -m bench.video_conditioning probe --workdir W            # a trained run's EMA weights
    python -m bench.video_conditioning regress --steps 1200 \\
        --set tape_pos_encoding=sin_cos_plus_learned --set interface_dim=128

probe: one denoiser call on the first test clips at fixed noise levels; PSNR (per predicted
frame, averaged) of the x0 estimate against the true continuation with the clips' own
conditioning frames, with conditioning frames shuffled across clips (another clip's digit),
and with zeroed ones. A model that uses its conditioning scores higher with its own frames
at high noise (t -> 1, where the noisy frames carry nothing); equal scores mean it ignores
their content.

regress: the easiest conditional task as plain regression, no diffusion: x_t is pure noise
(gamma = 0), the output is read as the continuation, MSE to it; moving digits at the config's
frame size with `--speed` px/frame (0: static digits, so the continuation is a copy of the
conditioning frames). It isolates whether the architecture (and optimiser) can route the
conditioning frames into the prediction at all, minutes instead of a training run. Prints
the running loss and the test PSNR beside copying the last frame and the mean frame.
`--noisy_input zeros` feeds zeros instead of noise as the frames to predict.

conv: the regress task (same data, batch, Adam, loss, PSNR) with a small 2-D conv net, a
control for whether the task is learnable at a regress-sized budget at all.

    python -m bench.video_conditioning conv --steps 1500 --speed 1.5
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import numpy as np

from bench.report import load_config

DEFAULT_CONFIG = "rin/configs/moving_digits.py"


def _psnr(a, b) -> float:
  """PSNR in dB of [-1, 1] videos from their MSE pooled over all frames and clips. This is not
  rin.video_metrics.per_frame_mse_psnr (eval/psnr), which averages per-clip PSNRs; every
  figure this tool prints (model and baselines) uses this one definition."""
  mse = float(np.mean(((np.asarray(a) + 1) / 2 - (np.asarray(b) + 1) / 2) ** 2))
  return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def probe(workdir: str, *, num_clips: int = 64, times=(0.2, 0.5, 0.8, 0.95, 1.0),
          seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp
  from ml_collections import ConfigDict
  from rin import diffusion, train_state, video

  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ConfigDict(json.load(f))
  model = train_state.create_model(cfg)
  params, step = train_state.load_ema_params(cfg, workdir, model, write_config=False)
  clips, _ = video.test_clips(cfg, num_clips)
  cond, truth = video.split_clip(jnp.asarray(clips), cfg.model.cond_frames)
  eps = jax.random.normal(jax.random.PRNGKey(seed), truth.shape)
  variants = {"own": cond, "shuffled": jnp.roll(cond, 1, axis=0), "zero": jnp.zeros_like(cond)}
  rows = []
  for t in times:
    g = diffusion.get_schedule(cfg.diffusion.sample_schedule)(jnp.full((truth.shape[0],), t))
    x_t = diffusion.add_noise(truth, eps, g)
    row = {"t": float(t), "gamma": float(g[0])}
    for name, c in variants.items():
      pred, _ = model.apply({"params": params}, x_t, g, c, None)
      x0, _ = diffusion.prediction_to_x0_eps(cfg.diffusion.target, pred, x_t, g)
      row[name] = round(_psnr(x0, truth), 2)
    rows.append(row)
  return {"workdir": workdir, "step": int(step), "num_clips": int(truth.shape[0]),
          "x0_psnr": rows}


def _parse_sets(sets) -> dict:
  out = {}
  for s in sets or ():
    if "=" not in s:
      raise ValueError(f"--set {s!r}: expected name=value (a config.model field)")
    k, v = s.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _moving_digits(cfg, size: int, frames: int, speed: float):
  """(train, test) moving-digits splits at the config's digit size and count, `speed` px/frame."""
  from rin import video_data
  if speed < 0:
    raise ValueError(f"--speed must be >= 0 px/frame, got {speed}")
  kw = dict(num_frames=frames, image_size=size, digit_size=cfg.data.digit_size,
            num_digits=cfg.data.num_digits, speed=(min(0.5, speed), speed))
  return (video_data.make_moving_digits("train", num_videos=4096, **kw),
          video_data.make_moving_digits("test", num_videos=128, **kw))


def _fit_and_score(predict, params, tx, train, test, cond_frames: int, *, steps: int,
                   batch_size: int, seed: int, log_every: int) -> dict:
  """The regression both `regress` and `conv_control` run: `predict(params, cond, key)` ->
  continuation, MSE, `steps` steps of `tx` on random training batches; then the loss curve
  and the test PSNR beside copying the last frame and the mean frame."""
  import jax
  import jax.numpy as jnp
  import optax

  fc = cond_frames
  as_float = lambda u8: jnp.asarray(u8, jnp.float32) * (2 / 255) - 1

  @jax.jit
  def step_fn(p, s, clip, key):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((predict(p, clip[:, :fc], key) - clip[:, fc:]) ** 2))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng, opt_state = jax.random.PRNGKey(seed), tx.init(params)
  order = np.random.default_rng(seed)
  losses, curve, t0 = [], [], time.time()
  for i in range(steps):
    idx = order.integers(0, len(train.images), batch_size)
    params, opt_state, loss = step_fn(params, opt_state, as_float(train.images[idx]),
                                      jax.random.fold_in(rng, i))
    losses.append(float(loss))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      curve.append((i + 1, round(float(np.mean(losses[-log_every:])), 4)))
      print(f"step {i + 1}: loss {curve[-1][1]} ({time.time() - t0:.0f} s)", flush=True)
  clip = as_float(test.images)
  cond, truth = clip[:, :fc], clip[:, fc:]
  out = jnp.clip(predict(params, cond, rng), -1, 1)
  return {"loss_curve": curve, "test_psnr": round(_psnr(out, truth), 2),
          "copy_last_psnr": round(_psnr(jnp.repeat(cond[:, -1:], truth.shape[1], 1), truth), 2),
          "mean_frame_psnr": round(_psnr(jnp.broadcast_to(truth.mean(0, keepdims=True),
                                                          truth.shape), truth), 2),
          "seconds": round(time.time() - t0, 1)}


def regress(config_path: str = DEFAULT_CONFIG, *, steps: int = 1200, batch_size: int = 16,
            optimizer: str = "adam", learning_rate: float = 1e-3, speed: float = 0.0,
            model_overrides: dict | None = None, seed: int = 0, log_every: int = 100,
            noisy_input: str = "noise") -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from rin.model import VideoRIN

  cfg = load_config(config_path)
  fields = cfg.model.to_dict()
  for k in (model_overrides or {}):
    if k not in fields:
      raise ValueError(f"--set {k}=...: config.model has no field {k!r}")
  fields.update(model_overrides or {})
  model = VideoRIN(**fields)
  if optimizer not in ("adam", "lamb"):
    raise ValueError(f"--optimizer must be 'adam' or 'lamb', got {optimizer!r}")
  if noisy_input not in ("noise", "zeros"):
    raise ValueError(f"--noisy_input must be 'noise' or 'zeros', got {noisy_input!r}")
  draw = jax.random.normal if noisy_input == "noise" else (lambda key, shape: jnp.zeros(shape))
  size, frames, fc = model.image_size, model.num_frames, model.cond_frames
  train, test = _moving_digits(cfg, size, frames, speed)
  shape = (batch_size, frames - fc, size, size, model.channels)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros(shape), jnp.zeros(batch_size),
                      jnp.zeros((batch_size, fc) + shape[2:]))["params"]
  tx = optax.adam(learning_rate) if optimizer == "adam" else optax.lamb(learning_rate,
                                                                        weight_decay=0.0)

  def predict(p, cond, key):
    b = cond.shape[0]
    out, _ = model.apply({"params": p}, draw(key, (b,) + shape[1:]), jnp.zeros(b), cond)
    return out

  res = _fit_and_score(predict, params, tx, train, test, fc, steps=steps,
                       batch_size=batch_size, seed=seed, log_every=log_every)
  return dict({"config": config_path, "model_overrides": model_overrides or {},
               "steps": steps, "optimizer": optimizer, "learning_rate": learning_rate,
               "speed": speed, "noisy_input": noisy_input}, **res)


def conv_control(config_path: str = DEFAULT_CONFIG, *, steps: int = 1500,
                 batch_size: int = 16, learning_rate: float = 1e-3, speed: float = 1.5,
                 width: int = 64, seed: int = 0, log_every: int = 100) -> dict:
  """The regress task with a small 2-D conv net instead of VideoRIN: the conditioning frames
  stacked as channels, four 5x5 conv + GELU layers of `width` channels, a 3x3 conv to the
  predicted frames. Same data, batch, optimiser (Adam), loss and PSNR as `regress`: it shows
  whether the task is learnable in a regress-sized budget by a model with local receptive
  fields, which VideoRIN (all mixing through its latents) lacks."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import optax

  cfg = load_config(config_path)
  m = cfg.model
  size, frames, fc = m.image_size, m.num_frames, m.cond_frames
  if m.channels != 1:
    raise ValueError(f"conv control: moving digits are grey, config.model.channels={m.channels}")
  train, test = _moving_digits(cfg, size, frames, speed)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, cond):                        # [B, Fc, H, W, 1] -> [B, F - Fc, H, W, 1]
      x = jnp.moveaxis(cond[..., 0], 1, -1)
      for _ in range(4):
        x = nn.gelu(nn.Conv(width, (5, 5))(x))
      return jnp.moveaxis(nn.Conv(frames - fc, (3, 3))(x), -1, 1)[..., None]

  net = Net()
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, fc, size, size, 1)))
  res = _fit_and_score(lambda p, cond, key: net.apply(p, cond), params,
                       optax.adam(learning_rate), train, test, fc, steps=steps,
                       batch_size=batch_size, seed=seed, log_every=log_every)
  return dict({"config": config_path, "model": f"conv 4x5x5x{width}", "steps": steps,
               "learning_rate": learning_rate, "speed": speed}, **res)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bench.video_conditioning", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("probe", help="x0-estimate PSNR with own / shuffled / zeroed conditioning")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num_clips", type=int, default=64)
  r = sub.add_parser("regress", help="conditioning frames -> continuation, plain regression")
  r.add_argument("--config", default=DEFAULT_CONFIG)
  r.add_argument("--steps", type=int, default=1200)
  r.add_argument("--batch_size", type=int, default=16)
  r.add_argument("--optimizer", default="adam")
  r.add_argument("--learning_rate", type=float, default=1e-3)
  r.add_argument("--speed", type=float, default=0.0)
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--noisy_input", default="noise",
                 help="what fills the frames to predict: 'noise' (gamma=0, as diffusion at t=1) "
                      "or 'zeros' (isolates whether the noise tokens block the routing)")
  r.add_argument("--set", action="append", metavar="FIELD=VALUE",
                 help="a config.model field, e.g. interface_dim=128 (repeatable)")
  c = sub.add_parser("conv", help="the regress task with a small conv net (a control)")
  c.add_argument("--config", default=DEFAULT_CONFIG)
  c.add_argument("--steps", type=int, default=1500)
  c.add_argument("--speed", type=float, default=1.5)
  c.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.cmd == "probe":
    res = probe(args.workdir, num_clips=args.num_clips)
  elif args.cmd == "conv":
    res = conv_control(args.config, steps=args.steps, speed=args.speed, seed=args.seed)
  else:
    res = regress(args.config, steps=args.steps, batch_size=args.batch_size,
                  optimizer=args.optimizer, learning_rate=args.learning_rate, speed=args.speed,
                  model_overrides=_parse_sets(args.set), seed=args.seed,
                  noisy_input=args.noisy_input)
  print(json.dumps(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
