"""Every field a config has, once, at the authors' defaults where they have one.

Each config file (cifar10.py, imagenet64.py, digits.py, ...) starts from `get_config()` here
and states only what differs. Where a value comes from is said next to it; "authors" means
google-research/pix2seq (configs/config_diffusion_base.py, the cifar10/imagenet64 sweeps).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # rin.RIN's fields (rin/model.py).
  c.model = dict(
      image_size=32, channels=3, patch_size=2,
      num_latents=128, latent_dim=512, latent_heads=16, latent_mlp_ratio=4.0,
      num_blocks=3, latent_layers_per_block=2,
      interface_dim=256, interface_mlp_ratio=2.0, rw_heads=8,
      num_classes=10, self_cond_mlp_ratio=4.0, dropout=0.0, drop_path=0.0,
      # Keras-MultiHeadAttention fan counting, as the authors (rin.layers.attention_kernel_init);
      # "xavier" for a plain 2-D xavier. Init only: checkpoints load either way.
      attention_init="keras_mha",
      # The authors' conv_kernel_size / conv_drop_units (default 0: off): a depthwise conv
      # block on the interface grid after each write (rin.layers.InterfaceConv; for video a
      # space-time conv over conditioning-then-noisy steps, rin.model.VideoRIN).
      conv_kernel_size=0, conv_dropout=0.0)
  # rin.diffusion: schedules, target and loss (authors' base config: pred_type/loss_type eps).
  c.diffusion = dict(
      train_schedule="sigmoid@-3,3,0.9", sample_schedule="cosine", target="eps",
      loss_type="eps", self_cond_rate=0.9, sampler="ddpm", sample_steps=1000,
      # Classifier-free guidance (the authors' cond_dropout / guidance knobs, 0 in the
      # published configs) and sampling options (rin.diffusion.sample; README "Sampling").
      cond_dropout=0.0, guidance=0.0, guidance_interval=None, guidance_latents="shared",
      time_delay=0.0, time_grid="uniform")
  # rin.optim: LAMB with the authors' cosine@r schedule (lr_schedule "cosine_to_zero" is
  # the older variant that reaches 0 after decay_fraction of the post-warm-up steps).
  c.optim = dict(
      learning_rate=3e-3, warmup_steps=10_000, decay_fraction=0.8, lr_schedule="cosine@r",
      end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=0.0,
      ema_decay=0.9999,
      # Parameter-path substrings excluded from weight decay and LAMB's trust ratio besides
      # every 1-D parameter (rin.optim.decay_mask), e.g. ("conv/pointwise_kernel",).
      lamb_exclude=())
  c.train = dict(
      batch_size=256, num_steps=150_000, seed=0, log_every=100,
      checkpoint_every=5_000, sample_every=10_000, num_sample_images=64,
      sample_steps_during_training=100,
      implementation="",      # "" = the platform default (kernels.api)
      dtype="float32",        # compute dtype; parameters and optimiser state stay float32
      # PRNG of the dropout / drop-path masks (rin.train_step.dropout_key): "rbg" is cheaper on
      # CPU than "threefry" (same distribution, another random stream).
      dropout_rng="rbg",
      # Independent batch chunks per step (rin.train_step.batch_chunks): 0 = auto (2 on a single
      # CPU device, which fills both cores of a small CPU; 1 on accelerators).
      batch_chunks=0,
      # Scaling / fault tolerance (rin.loop docstring): FSDP-shard weights and optimiser
      # state over devices (arrays under fsdp_min_size elements stay replicated); on a
      # NaN/Inf loss "stop" (with the step) or "skip" the update.
      fsdp=False, fsdp_min_size=0, nonfinite="stop", max_consecutive_skips=100,
      keep_checkpoints=3, eval_every=10_000, tensorboard=True)
  # worker_count: grain worker processes for the input pipeline (0: in this process).
  c.data = dict(name="cifar10", path="", random_flip=True, worker_count=0)
  # Evaluation on EMA samples every train.eval_every steps (0: never), with the metrics of
  # rin.evaluation.METRICS the config selects: the digits metric for the digits data (unless
  # digits=False); FID/IS when inception_path names an Inception weights .npz
  # (rin.metrics.InceptionV3), against fid_reference (.npz with mu, sigma) or the training
  # images. sampler/sample_steps: the authors evaluate with 1000-step DDPM; "" = the
  # diffusion sampler.
  # protocol "authors" (with protocol_steps 1000 or 400): the paper's FID protocol (DDPM, cosine).
  # Video configs: fvd_network_path names a serialised FVD feature network (rin.video_metrics).
  c.eval = dict(num_samples=10_000, sampler="", sample_steps=100, batch_size=256,
                at_start=True, digits=True, inception_path="", fid_reference="",
                fid_reference_images=10_000, protocol="", protocol_steps=1000,
                fvd_network_path="")
  return c


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(
        defaults.get(k), dict) else v
  return out


def complete(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier version (a workdir's config.json) with the fields it
  predates at this file's defaults, so code can read every field as an attribute."""
  return ml_collections.ConfigDict(_merged(get_config().to_dict(), saved))
