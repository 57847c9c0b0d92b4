"""Video prediction on embedded moving digits (rin.video_data): the main video job on 2 CPU cores.

Clips of 16 frames of 16x16 grey with one sklearn digit at its native 8x8 moving at
0.5-1.5 px/frame and bouncing off the walls; the first 5 frames condition the model (as in
Kinetics-600, the paper's setting), the other 11 are predicted. 2x4x4 tubelets as in the paper:
(6 + 3) x 4 x 4 = 144 interface tokens (the 11 noisy and 5 conditioning frames are each padded
to an even frame count, as the authors' "SAME" stem does). Frames, model and step count are
sized for minutes on 2 CPU cores (2000 steps took 23 min on the 2-core VM shared with other
jobs, load ~10; README, "Video"); 32x32 frames with
12x12 digits (--config.model.image_size=32 --config.data.digit_size=12) cost ~4x the
interface work.

Model choices from issue 25's measurements (bench/results/README.md, "Moving-digits video
prediction with the interface conv"): the authors' conv block after each write, extended over
(time, rows, cols) with the conditioning steps first (conv_kernel_size=3), its zero-started
1x1 conv kept out of LAMB's trust ratio (optim.lamb_exclude; under the trust ratio it stays at
~1e-4 and the block stays off), sin-cos tape positions and a 128-wide interface (the recipe
that routes the conditioning frames in the regression proxy), the v objective.
"""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(
      image_size=16, channels=1, patch_size=4, tubelet_frames=2,
      num_frames=16, cond_frames=5,
      num_latents=32, latent_dim=96, latent_heads=4, latent_mlp_ratio=2.0,
      num_blocks=2, latent_layers_per_block=1,
      interface_dim=128, rw_heads=4, num_classes=0, self_cond_mlp_ratio=2.0,
      tape_pos_encoding="sin_cos_plus_learned", conv_kernel_size=3)
  c.diffusion.update(sampler="ddim", sample_steps=50, target="v", loss_type="v")
  c.optim.update(learning_rate=2e-3, warmup_steps=100, decay_fraction=1.0, grad_clip=1.0,
                 ema_decay=0.995, lamb_exclude=("conv/pointwise_kernel",))
  c.train.update(batch_size=16, num_steps=2000, log_every=25, checkpoint_every=250,
                 sample_every=2000, num_sample_images=16, sample_steps_during_training=25,
                 eval_every=500)
  # Moving digits: clips per split, digit size, digits per clip, speed (px/frame, min, max).
  c.data.update(name="moving_digits", random_flip=False, num_train_videos=4096,
                num_test_videos=256, digit_size=8, num_digits=1, speed=(0.5, 1.5))
  # Evaluation every train.eval_every steps on the first num_samples test clips: per-frame
  # MSE/PSNR/SSIM vs the true continuation, the digit-crop Frechet distance, the
  # copy-last-conditioning-frame baseline beside them; FVD when fvd_network_path names a
  # serialised feature network (rin.video_metrics).
  c.eval.update(num_samples=128, sample_steps=25, batch_size=128, at_start=False,
                fvd_network_path="")
  return c
