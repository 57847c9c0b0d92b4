"""rin.visualize: read-attention maps captured during sampling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import loop, sampling, train_state
from rin import visualize
from tests.rin.tiny import tiny_config


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  model = train_state.create_model(cfg)
  params = train_state.init_state(cfg, model, jax.random.PRNGKey(0)).params
  return cfg, model, params


def test_maps_are_the_read_probabilities_and_sampling_is_unchanged(setup, tmp_path):
  cfg, model, params = setup
  images, labels, cap = visualize.sample_with_read_attention(
      cfg, model, params, num_samples=2, seed=3, num_steps=4, sampler="ddim", at_steps=[0, 3])
  assert sorted(cap) == [0, 3]
  m = cfg.model
  n_patches = (m.image_size // m.patch_size) ** 2
  assert cap[0].shape == (m.num_blocks, 2, m.rw_heads, m.num_latents, n_patches)
  np.testing.assert_allclose(cap[0].sum(-1), 1.0, rtol=1e-5)       # softmax over patches
  assert not np.allclose(cap[0], cap[3])                            # maps move with t
  # Capturing changes nothing: the same samples as the plain sampling function (up to
  # float32 rounding: XLA fuses the two programs differently; seen 1.6e-6).
  fn = sampling.make_sample_fn(model, cfg, num_steps=4, sampler="ddim")
  want = fn(params, jax.random.fold_in(jax.random.PRNGKey(3), 2), jnp.asarray(labels))
  np.testing.assert_allclose(images, want, rtol=0, atol=1e-5)
  maps = visualize.patch_maps(cap[0][1], m.image_size // m.patch_size, heads="all")
  assert maps.shape == (2, m.rw_heads, 4, 4)
  np.testing.assert_allclose(maps.sum((2, 3)), 1.0, rtol=1e-5)
  paths = visualize.write_pngs(images, labels, cap, str(tmp_path), patch_size=m.patch_size,
                               heads="all", latent=-1)
  assert len(paths) == 2 and all(os.path.getsize(p) > 1000 for p in paths)


def test_bad_at_steps(setup):
  cfg, model, params = setup
  with pytest.raises(ValueError, match=r"at_steps must lie in \[0, 4\)"):
    visualize.sample_with_read_attention(cfg, model, params, num_samples=1, num_steps=4,
                                         at_steps=[4])


@pytest.mark.slow
def test_cli_writes_pngs_for_a_digits_checkpoint(tmp_path):
  import subprocess
  import sys
  cfg = tiny_config(num_steps=2, checkpoint_every=2)
  loop.train(cfg, str(tmp_path / "w"), progress=False)
  cfg_file = os.path.join(os.path.dirname(__file__), "tiny_cli_config.py")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      [sys.executable, "-m", "rin.visualize", f"--config={cfg_file}",
       f"--workdir={tmp_path / 'w'}", "--num_samples=2", "--steps=3",
       f"--out={tmp_path / 'att'}"], cwd=repo, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "att")) == ["sample_0_read_attention.png",
                                                 "sample_1_read_attention.png"]
