"""A tiny moving-digits config for CLI/end-to-end tests of the video path (seconds on CPU)."""
from rin.configs import moving_digits


def get_config():
  c = moving_digits.get_config()
  c.model.update(image_size=8, patch_size=4, num_frames=6, cond_frames=3, num_latents=8,
                 latent_dim=32, latent_heads=2, num_blocks=1, latent_layers_per_block=1,
                 interface_dim=16, rw_heads=2, self_cond_mlp_ratio=1.0, latent_mlp_ratio=1.0,
                 interface_mlp_ratio=1.0)
  c.data.update(num_train_videos=32, num_test_videos=8, digit_size=4)
  c.diffusion.update(sample_steps=2)
  c.train.update(batch_size=4, num_steps=4, log_every=2, checkpoint_every=2, sample_every=4,
                 num_sample_images=2, sample_steps_during_training=2, eval_every=4,
                 tensorboard=False)
  c.eval.update(num_samples=8, sample_steps=2, batch_size=8)
  return c
