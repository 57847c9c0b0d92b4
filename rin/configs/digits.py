"""The main job: sklearn's embedded 8x8 digits at their native 8x8, on 2 CPU cores in minutes.

Native 8x8 with 2x2 patches (16 interface tokens). How each value was chosen, with the
runs behind it: bench/results/README.md ("digits convergence").
"""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(
      image_size=8, channels=1, patch_size=2,
      num_latents=32, latent_dim=128, latent_heads=4, latent_mlp_ratio=2.0,
      num_blocks=2, latent_layers_per_block=2,
      interface_dim=64, interface_mlp_ratio=2.0, rw_heads=4, self_cond_mlp_ratio=2.0)
  c.diffusion.update(sampler="ddim", sample_steps=50)
  c.optim.update(learning_rate=2e-3, warmup_steps=100, decay_fraction=1.0, grad_clip=1.0,
                 ema_decay=0.995)
  c.train.update(batch_size=64, num_steps=1500, log_every=25, checkpoint_every=250,
                 sample_every=500, sample_steps_during_training=50, eval_every=250,
                 batch_chunks=1)
  c.data.update(name="digits", random_flip=False)
  c.eval.update(num_samples=256, sample_steps=20)
  return c
