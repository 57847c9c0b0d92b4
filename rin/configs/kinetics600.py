"""Kinetics-600 video prediction at the paper's shape (Jabri, Fleet & Chen, ICML 2023, Sec. 4.3).

Where each value comes from:
* Task shape -- from the paper's text and the issue: 16 frames at 64x64, the first 5 frames
  condition the prediction of the other 11, no guidance or cascades; tubelets of 2x4x4
  (tubelet_frames=2, patch_size=4), hence (ceil(11/2) + ceil(5/2)) x 16 x 16 = 2304 interface
  tokens (each part padded to an even frame count by the authors' "SAME" stem; 2048 tokens
  would be the 16 frames without padding).
* Model sizes -- NOT checked against a stored copy of the paper's appendix (none was
  available in this session): latents 256 x 1024, 6 blocks of 4 latent layers, interface
  width 512, 16 heads, MLP ratios 4 / 4. Treat them as placeholders to be verified against
  the appendix table before a paper-scale run.
* Diffusion -- the authors' defaults for their image models (DESIGN.md): sigmoid(-3, 3, 0.9)
  training schedule, eps target, self-conditioning rate 0.9, 1000 DDPM steps (their FVD 10.8
  figure; 11.5 with 400 steps), cosine sampling schedule.
* Optimiser -- LAMB with the ImageNet-64 settings (DESIGN.md table: LR 2e-3, 10k warm-up,
  cosine over 0.7, weight decay 1e-2, EMA 0.9999); batch 1024, 150k steps: assumptions by
  analogy with ImageNet-64, not published video values.
* Data -- a folder of Kinetics-600 clips (rin.video_data "video_folder": video files or frame
  folders, ``train``/``test`` subfolders); nothing is downloaded. FVD needs the user's I3D as a
  serialised jax.export (rin.video_metrics.FVDEvaluator; eval.fvd_network_path).
"""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(
      image_size=64, channels=3, patch_size=4, tubelet_frames=2,
      num_frames=16, cond_frames=5,
      num_latents=256, latent_dim=1024, num_blocks=6, latent_layers_per_block=4,
      interface_dim=512, interface_mlp_ratio=4.0, rw_heads=16, num_classes=0)
  c.optim.update(learning_rate=2e-3, decay_fraction=0.7)
  c.train.update(batch_size=1024, num_sample_images=16)
  c.data.update(name="video_folder", random_flip=False)
  c.eval.update(num_samples=256, batch_size=32, at_start=False, fvd_network_path="")
  return c
