"""Fault tolerance: SIGKILL + resume with identical losses, SIGTERM checkpoint, corrupt
checkpoint fallback, NaN/Inf stop or skip, atomic checkpoint directories, bad inputs."""
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

from rin import checkpoint as ckpt_lib
from rin import data as data_lib
from rin import loop, train_state, train_step
from tests.rin import subproc
from tests.rin.tiny import tiny_config

TIMEOUT = 480


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r and "event" not in r}


def _small(**train):
  cfg = tiny_config(**train)
  cfg.model.update(num_blocks=1)          # compile time dominates on 2 cores
  return cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _cli(workdir, log, cache_dir, *extra):
  args = ["-m", "rin.train", "--config", "tests/rin/tiny_cli_config.py", "--workdir",
          str(workdir), "--noprogress", "--config.train.num_steps=200",
          "--config.train.checkpoint_every=10", "--config.model.num_blocks=1", *extra]
  return subproc.start(args, log, env=subproc.env(cache_dir))


def _wait_for_checkpoint(proc, workdir, step, log, timeout=TIMEOUT):
  target = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.monotonic() + timeout
  while not os.path.isdir(target):
    if proc.poll() is not None:
      pytest.fail(f"training exited (rc {proc.returncode}) before checkpoint {step}:\n"
                  + subproc.tail(log))
    if time.monotonic() > deadline:
      subproc.kill_all([proc])
      pytest.fail(f"no checkpoint {step} after {timeout}s:\n" + subproc.tail(log))
    time.sleep(0.005)


def test_sigkill_then_resume_gives_identical_losses(tmp_path, cache_dir):
  ref, run = tmp_path / "ref", tmp_path / "run"
  # Uninterrupted reference (also fills the compilation cache for the next processes).
  p = _cli(ref, tmp_path / "ref.log", cache_dir, "--stop_at_step=30")
  assert subproc.wait_all([p], TIMEOUT) == [0], subproc.tail(tmp_path / "ref.log")

  p = _cli(run, tmp_path / "kill.log", cache_dir)
  _wait_for_checkpoint(p, run, 10, tmp_path / "kill.log")
  os.kill(p.pid, signal.SIGKILL)                      # no handler can run
  p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL
  mngr_steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
  assert mngr_steps and mngr_steps[-1] < 30, mngr_steps   # killed mid-training

  p = _cli(run, tmp_path / "resume.log", cache_dir, "--stop_at_step=30")
  assert subproc.wait_all([p], TIMEOUT) == [0], subproc.tail(tmp_path / "resume.log")
  assert f"resumed from step {mngr_steps[-1]}" in subproc.tail(tmp_path / "resume.log", 10**6)
  a, b = _losses(ref), _losses(run)
  assert sorted(a) == list(range(1, 31)) and sorted(b) == list(range(1, 31))
  for step in range(1, 31):
    assert a[step] == b[step], (step, a[step], b[step])     # bit-identical on CPU


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
  run = tmp_path / "run"
  log = tmp_path / "term.log"
  p = _cli(run, log, cache_dir)
  _wait_for_checkpoint(p, run, 10, log)
  os.kill(p.pid, signal.SIGTERM)
  assert subproc.wait_all([p], 120) == [0], subproc.tail(log)
  steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
  recs = _records(run)
  stop = [r for r in recs if r.get("event") == "stopped_by_signal"]
  assert len(stop) == 1
  assert steps[-1] == stop[0]["step"] == max(_losses(run)) < 200
  assert "received SIGTERM" in subproc.tail(log, 10**6)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  cfg = _small(num_steps=6, checkpoint_every=2)
  work = str(tmp_path / "w")
  loop.train(cfg, work, progress=False, stop_at_step=4)
  full = _losses(work)
  ckdir = tmp_path / "w" / "checkpoints"
  assert sorted(os.listdir(ckdir)) == ["2", "4"]
  # Corrupt step 4: truncate every file of its state.
  for root, _, files in os.walk(ckdir / "4" / "state"):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
  caplog.set_level(logging.INFO)
  state = loop.train(cfg, work, progress=False)
  msgs = caplog.text
  assert "checkpoint at step 4" in msgs and "corrupt or incomplete" in msgs
  assert "resumed from step 2" in msgs
  assert (tmp_path / "w" / "checkpoints_corrupt" / "4").is_dir()     # moved aside, kept
  assert int(state.step) == 6
  again = _losses(work)
  assert sorted(again) == [1, 2, 3, 4, 5, 6]
  assert again[3] == full[3] and again[4] == full[4]               # recomputed identically


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  cfg = _small(num_steps=2, checkpoint_every=2)
  work = tmp_path / "w"
  loop.train(cfg, str(work), progress=False)
  import shutil
  shutil.rmtree(work / "checkpoints" / "2" / "state")
  with pytest.raises(ckpt_lib.CheckpointError, match="no readable checkpoint.*step 2"):
    loop.train(cfg, str(work), progress=False)


def test_partial_save_directory_is_ignored(tmp_path):
  """orbax writes <step>.orbax-checkpoint-tmp* and renames it when complete: a save cut
  short leaves only such a directory, which is never taken for a checkpoint."""
  cfg = _small()
  ck = tmp_path / "checkpoints"
  ck.mkdir()
  (ck / "8.orbax-checkpoint-tmp-1234").mkdir()
  (ck / "8.orbax-checkpoint-tmp-1234" / "junk").write_text("half")
  mngr = ckpt_lib.checkpoint_manager(str(tmp_path), cfg)
  assert mngr.latest_step() is None and list(mngr.all_steps()) == []
  mngr.close()


class _NaNAt:
  """Wraps the training iterator: the batch of step `k` (1-based) gets a NaN pixel."""

  def __init__(self, it, k):
    self.it, self.k, self.n = it, k, 0

  def __next__(self):
    b = next(self.it)
    self.n += 1
    if self.n == self.k:
      b = dict(b, image=b["image"].copy())
      b["image"][0, 0, 0, 0] = np.nan
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def _inject_nan(monkeypatch, k):
  orig = data_lib.make_train_iterator
  monkeypatch.setattr(loop.data_lib, "make_train_iterator",
                      lambda *a, **kw: _NaNAt(orig(*a, **kw), k))


def test_nonfinite_loss_stops_with_the_step_number(tmp_path, monkeypatch):
  _inject_nan(monkeypatch, 3)
  cfg = _small(num_steps=6, nonfinite="stop")
  with pytest.raises(FloatingPointError, match="non-finite loss nan .* at step 3"):
    loop.train(cfg, str(tmp_path), progress=False)
  ev = [r for r in _records(tmp_path) if r.get("event")]
  assert ev == [{"step": 3, "event": "nonfinite_stop", "loss": "nan",
                 "grad_norm": "nan"}]


def test_nonfinite_loss_can_skip_the_step(tmp_path, monkeypatch, caplog):
  _inject_nan(monkeypatch, 3)
  cfg = _small(num_steps=6, nonfinite="skip")
  caplog.set_level(logging.WARNING)
  state = loop.train(cfg, str(tmp_path), progress=False)
  assert int(state.step) == 6
  for x in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(x)))
  assert "non-finite loss nan" in caplog.text and "at step 3: update skipped" in caplog.text
  recs = _records(tmp_path)
  assert [r["step"] for r in recs if r.get("event") == "nonfinite_skip"] == [3]
  assert all(np.isfinite(r["loss"]) for r in recs if "event" not in r and r["step"] != 3)


def test_skip_step_keeps_weights_and_optimizer_state():
  cfg = _small(nonfinite="skip")
  model = train_state.create_model(cfg)
  state = train_state.init_state(cfg, model, jax.random.PRNGKey(0))
  img = np.zeros((16, 8, 8, 1), np.float32)
  img[0, 0, 0, 0] = np.inf
  new, m = jax.jit(train_step.make_train_step(model, cfg))(
      state, {"image": img, "label": np.zeros((16,), np.int32)})
  assert not bool(m["finite"]) and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.ema_params)),
                  jax.tree.leaves((new.params, new.opt_state, new.ema_params))):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------
# Bad inputs: each a clear error raised before anything is written.
# --------------------------------------------------------------------------------------

def _folder_cfg(path, **model):
  cfg = _small()
  cfg.data.update(name="folder", path=str(path))
  cfg.model.update(channels=3, num_classes=10, **model)
  cfg.train.batch_size = 2
  return cfg


def _write_pngs(d, n=4):
  d.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(d / f"{i}.png")


def test_unreadable_image_file(tmp_path):
  _write_pngs(tmp_path / "data")
  (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match=r"could not read image file .*broken\.png"):
    loop.train(_folder_cfg(tmp_path / "data"), str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_folder_without_images(tmp_path):
  (tmp_path / "data" / "sub").mkdir(parents=True)
  (tmp_path / "data" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="no image files"):
    loop.train(_folder_cfg(tmp_path / "data"), str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_config_that_does_not_fit_the_data(tmp_path):
  _write_pngs(tmp_path / "data")
  cfg = _folder_cfg(tmp_path / "data")
  cfg.model.channels = 1                        # the folder's images are RGB
  with pytest.raises(ValueError, match="has 3 channels but config.model.channels=1"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  cfg = _folder_cfg(tmp_path / "data", image_size=10, patch_size=4)
  with pytest.raises(ValueError, match="image_size=10 is not divisible by .*patch_size=4"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  cfg = _folder_cfg(tmp_path / "data")
  cfg.train.batch_size = 64
  with pytest.raises(ValueError, match="batch_size=64 exceeds the 4 training images"):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_checkpoint_of_another_config_names_the_differing_keys(tmp_path):
  cfg = _small()
  ckpt_lib.check_config_matches(str(tmp_path), cfg)
  other = _small()
  other.model.update(latent_dim=48, num_latents=16)
  other.optim.learning_rate = 1e-4               # allowed to change
  with pytest.raises(ValueError, match=r"different model config.*model\.latent_dim: "
                     r"checkpoint 32, config 48.*model\.num_latents: checkpoint 8, config 16"):
    ckpt_lib.check_config_matches(str(tmp_path), other)
  lr_only = _small()
  lr_only.optim.learning_rate = 1e-4
  ckpt_lib.check_config_matches(str(tmp_path), lr_only)        # no error
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["latent_dim"] == 32                      # the original is kept
