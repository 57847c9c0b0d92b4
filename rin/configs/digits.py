"""The main job: sklearn's embedded 8x8 digits at their native 8x8, on 2 CPU cores in minutes.

Native 8x8 with 2x2 patches (16 interface tokens) and 16 latents. What each choice bought
(FD and accuracy over training, per run) is on bench/results/README.md, "digits convergence":
a LAMB learning rate of 1e-2 (the authors' attention init keeps it stable), an EMA horizon
of ~100 steps for a 3000-step run, and evaluation with the authors' DDPM sampler (once, at
the end: `python -m bench.quality` evaluates over training).
"""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(
      image_size=8, channels=1, patch_size=2,
      num_latents=16, latent_dim=128, latent_heads=4, latent_mlp_ratio=2.0,
      num_blocks=2, latent_layers_per_block=2,
      interface_dim=64, interface_mlp_ratio=2.0, rw_heads=4, self_cond_mlp_ratio=2.0)
  c.diffusion.update(sampler="ddpm", sample_steps=100)
  c.optim.update(learning_rate=1e-2, warmup_steps=100, decay_fraction=1.0, grad_clip=1.0,
                 ema_decay=0.99)
  c.train.update(batch_size=64, num_steps=3000, log_every=25, checkpoint_every=300,
                 sample_every=1500, sample_steps_during_training=100, eval_every=3000,
                 batch_chunks=1)
  c.data.update(name="digits", random_flip=False)
  c.eval.update(num_samples=256, sampler="ddpm", sample_steps=100, at_start=False)
  return c
