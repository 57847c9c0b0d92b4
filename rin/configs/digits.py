"""Small default: sklearn's embedded 8x8 digits at their native 8x8; trains on 2 CPU cores in minutes.

`python -m rin.train --config rin/configs/digits.py` took 14.6 min on this 2-core machine
(2026-11-28, ~110 images/s, evaluation included; digits FD 215.7 -> 29.1): native 8x8 images with 2x2 patches (16 interface tokens; the
earlier 16x16 upsampling only added cost, not information), 1500 steps of batch 64, and
an EMA decay of 0.995 (a 200-step horizon: with 0.999 the initial weights would still
carry ~22% of the EMA after 1500 steps).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      image_size=8, channels=1, patch_size=2,
      num_latents=32, latent_dim=128, latent_heads=4, latent_mlp_ratio=2.0,
      num_blocks=2, latent_layers_per_block=2,
      interface_dim=64, interface_mlp_ratio=2.0, rw_heads=4,
      num_classes=10, self_cond_mlp_ratio=2.0, dropout=0.0, drop_path=0.0)
  c.diffusion = dict(
      train_schedule="sigmoid@-3,3,0.9", sample_schedule="cosine", target="eps",
      self_cond_rate=0.9, sampler="ddim", sample_steps=50)
  c.optim = dict(
      learning_rate=2e-3, warmup_steps=100, decay_fraction=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0, ema_decay=0.995)
  c.train = dict(
      # PRNG of the dropout / drop-path masks (rin.train.dropout_key): "rbg" is ~20% of a
      # CPU step cheaper than "threefry" (same distribution, another random stream).
      dropout_rng="rbg",
      batch_size=64, num_steps=1500, seed=0, log_every=25,
      checkpoint_every=250, sample_every=500, num_sample_images=64,
      sample_steps_during_training=50, implementation="", dtype="float32",
      # Scaling / fault tolerance (rin.train docstring): FSDP-shard weights and optimiser
      # state over devices; on a NaN/Inf loss "stop" (with the step) or "skip" the update.
      fsdp=False, nonfinite="stop", max_consecutive_skips=100, keep_checkpoints=3,
      eval_every=250, tensorboard=True)
  c.data = dict(name="digits", path="", random_flip=False)
  # Evaluation on EMA samples every train.eval_every steps (0: never): the digits metric
  # for the digits data; FID/IS when inception_path names an Inception weights .npz
  # (rin.metrics.InceptionV3), against fid_reference (.npz with mu, sigma) or the
  # training images.
  c.eval = dict(num_samples=256, sample_steps=20, batch_size=256, at_start=True,
                inception_path="", fid_reference="", fid_reference_images=10_000)
  return c
