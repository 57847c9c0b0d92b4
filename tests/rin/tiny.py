"""A tiny config (digits data at 8x8) that keeps model tests fast on 2 cores."""
from rin.configs import digits


def tiny_config(**train_overrides):
  cfg = digits.get_config()
  cfg.model.update(image_size=8, patch_size=2, num_latents=8, latent_dim=32, latent_heads=2,
                   num_blocks=2, latent_layers_per_block=1, interface_dim=16, rw_heads=2,
                   latent_mlp_ratio=2.0, interface_mlp_ratio=2.0, self_cond_mlp_ratio=2.0)
  cfg.train.update(batch_size=16, num_steps=30, log_every=1, checkpoint_every=10,
                   sample_every=1000, num_sample_images=4, sample_steps_during_training=2,
                   eval_every=0)
  cfg.optim.update(warmup_steps=5, learning_rate=3e-3)
  cfg.train.update(**train_overrides)
  return cfg
