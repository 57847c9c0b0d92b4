"""ImageNet 64x64 (class-conditional), the authors' published sweep values (157.8M params)."""
from rin.configs import base


def get_config():
  c = base.get_config()
  c.model.update(
      image_size=64, patch_size=8,   # 8 in the sweep, 4 in the paper
      latent_dim=768, num_blocks=4, latent_layers_per_block=4,
      interface_dim=512, interface_mlp_ratio=4.0, rw_heads=16, num_classes=1000)
  c.diffusion.update(train_schedule="simple_linear")
  c.optim.update(learning_rate=2e-3, decay_fraction=0.7)
  c.train.update(batch_size=1024)
  c.data.update(name="folder")
  return c
