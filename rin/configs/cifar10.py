"""CIFAR-10 32x32, the authors' published configuration (30.95M parameters)."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      image_size=32, channels=3, patch_size=2,
      num_latents=128, latent_dim=512, latent_heads=16, latent_mlp_ratio=4.0,
      num_blocks=3, latent_layers_per_block=2,
      interface_dim=256, interface_mlp_ratio=2.0, rw_heads=8,
      num_classes=10, self_cond_mlp_ratio=4.0, dropout=0.1, drop_path=0.1)
  c.diffusion = dict(
      train_schedule="sigmoid@-3,3,0.9", sample_schedule="cosine", target="eps",
      self_cond_rate=0.9, sampler="ddpm", sample_steps=1000)
  c.optim = dict(
      learning_rate=3e-3, warmup_steps=10_000, decay_fraction=0.8,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=0.0, ema_decay=0.9999)
  c.train = dict(
      # PRNG of the dropout / drop-path masks (rin.train.dropout_key): "rbg" is ~20% of a
      # CPU step cheaper than "threefry" (same distribution, another random stream).
      dropout_rng="rbg",
      # Independent batch chunks per step (rin.train.batch_chunks): 0 = auto, 2 on a single
      # CPU device (fills both cores of a small CPU), 1 on accelerators.
      batch_chunks=0,
      batch_size=256, num_steps=150_000, seed=0, log_every=100,
      checkpoint_every=5_000, sample_every=10_000, num_sample_images=64,
      sample_steps_during_training=100, implementation="", dtype="float32",
      # Scaling / fault tolerance (rin.train docstring): FSDP-shard weights and optimiser
      # state over devices; on a NaN/Inf loss "stop" (with the step) or "skip" the update.
      fsdp=False, nonfinite="stop", max_consecutive_skips=100, keep_checkpoints=3,
      eval_every=10000, tensorboard=True)
  c.data = dict(name="cifar10", path="", random_flip=True)
  # Evaluation on EMA samples every train.eval_every steps (0: never): the digits metric
  # for the digits data; FID/IS when inception_path names an Inception weights .npz
  # (rin.metrics.InceptionV3), against fid_reference (.npz with mu, sigma) or the
  # training images.
  c.eval = dict(num_samples=10000, sample_steps=100, batch_size=256, at_start=True,
                inception_path="", fid_reference="", fid_reference_images=10_000)
  return c
