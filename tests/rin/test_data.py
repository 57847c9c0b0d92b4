"""Tests for rin/data.py: loaders on tiny files in the real formats, and the grain iterator."""
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from rin import data


# ------------------------------------------------------------------------------ digits


def test_digits_shapes_ranges_and_splits():
  tr = data.load_dataset("digits", image_size=8)
  te = data.load_dataset("digits", image_size=8, split="test")
  al = data.load_dataset("digits", image_size=8, split="all")
  assert al.images.shape == (1797, 8, 8, 1) and al.images.dtype == np.uint8
  assert al.labels.dtype == np.int32 and al.num_classes == 10
  assert len(tr) + len(te) == 1797 and len(te) == 179
  # every class is in both splits, ~10% of each in test
  assert np.all(np.bincount(te.labels, minlength=10) >= 17)
  assert np.all(np.bincount(tr.labels, minlength=10) >= 150)
  # at native size the values are exactly round(v * 255 / 16) of sklearn's digits
  from sklearn.datasets import load_digits
  raw = load_digits()
  expect = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)
  np.testing.assert_array_equal(al.images[..., 0], expect)
  np.testing.assert_array_equal(al.labels, raw.target)
  # the split is a deterministic partition of the full set
  idx = data.digits_test_indices(al.labels)
  np.testing.assert_array_equal(te.images, al.images[idx])
  mask = np.ones(1797, bool)
  mask[idx] = False
  np.testing.assert_array_equal(tr.labels, al.labels[mask])
  assert al.images.max() == 255 and al.images.min() == 0


def test_digits_resize():
  ds = data.load_dataset("digits", image_size=16, split="test")
  assert ds.images.shape == (179, 16, 16, 1)
  small = data.load_dataset("digits", image_size=8, split="test").images.astype(float)
  # the upsampled image, box-averaged back to 8x8, is close to the original
  down = ds.images.astype(float).reshape(179, 8, 2, 8, 2, 1).mean((2, 4))
  assert np.abs(down - small).mean() < 12.0
  again = data.load_dataset("digits", image_size=16, split="test")
  np.testing.assert_array_equal(ds.images, again.images)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(name="mnist", image_size=8), ValueError, ["mnist", "digits", "cifar10", "folder"]),
    (dict(name="digits", image_size=0), ValueError, ["image_size"]),
    (dict(name="digits", image_size=8, split="validation"), ValueError, ["split"]),
    (dict(name="cifar10", image_size=32), ValueError, ["path="]),
    (dict(name="folder", image_size=32, path="/nonexistent/rin_data"), FileNotFoundError,
     ["path=", "/nonexistent/rin_data"]),
    (dict(name="cifar10", image_size=32, path="/nonexistent/cifar"), FileNotFoundError,
     ["path=", "/nonexistent/cifar"]),
])
def test_load_dataset_argument_errors(kwargs, exc, words):
  name = kwargs.pop("name")
  with pytest.raises(exc) as ei:
    data.load_dataset(name, **kwargs)
  for w in words:
    assert w in str(ei.value)


def test_image_dataset_validation():
  with pytest.raises(ValueError, match="uint8"):
    data.ImageDataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32), 1)
  with pytest.raises(ValueError, match="labels"):
    data.ImageDataset(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int32), 1)
  with pytest.raises(ValueError, match="labels must lie"):
    data.ImageDataset(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 2], np.int32), 2)


# ------------------------------------------------------------------------------ cifar10


def _cifar_pixels(n, offset):
  """Images whose pixel (h, w, c) encodes (index, h, w, c) so layout errors show."""
  img = np.zeros((n, 32, 32, 3), np.uint8)
  for i in range(n):
    img[i] = ((np.arange(32)[:, None, None] * 7 + np.arange(32)[None, :, None] * 3
               + np.arange(3)[None, None, :] * 50 + (offset + i) * 11) % 256)
  return img


def _write_cifar(root, n_per_batch=3):
  d = root / "cifar-10-batches-py"
  d.mkdir(parents=True)
  all_imgs, all_labels = [], []
  for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
    imgs = _cifar_pixels(n_per_batch, b * n_per_batch)
    labels = [(b * n_per_batch + i) % 10 for i in range(n_per_batch)]
    flat = imgs.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # CHW rows, as CIFAR stores
    with open(d / name, "wb") as f:
      pickle.dump({b"batch_label": b"x", b"data": flat, b"labels": labels,
                   b"filenames": [b"f"] * n_per_batch}, f, protocol=2)
    all_imgs.append(imgs)
    all_labels += labels
  return d, np.concatenate(all_imgs), np.asarray(all_labels)


def test_cifar10_directory_parent_and_tarball(tmp_path):
  d, imgs, labels = _write_cifar(tmp_path / "src")
  for path in (d, d.parent):
    tr = data.load_dataset("cifar10", path=str(path), image_size=32)
    assert tr.images.shape == (15, 32, 32, 3) and tr.num_classes == 10
    np.testing.assert_array_equal(tr.images, imgs[:15])
    np.testing.assert_array_equal(tr.labels, labels[:15])
    te = data.load_dataset("cifar10", path=str(path), image_size=32, split="test")
    np.testing.assert_array_equal(te.images, imgs[15:])
  tgz = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(d, arcname="cifar-10-batches-py")
  tr = data.load_dataset("cifar10", path=str(tgz), image_size=32)
  np.testing.assert_array_equal(tr.images, imgs[:15])
  small = data.load_dataset("cifar10", path=str(tgz), image_size=16, split="test")
  assert small.images.shape == (3, 16, 16, 3) and small.images.dtype == np.uint8


def test_cifar10_bad_files(tmp_path):
  d, _, _ = _write_cifar(tmp_path)
  os.remove(d / "data_batch_3")
  with pytest.raises(FileNotFoundError, match="data_batch_3"):
    data.load_dataset("cifar10", path=str(d), image_size=32)
  (d / "data_batch_3").write_bytes(b"this is not a pickle")
  with pytest.raises(ValueError, match="data_batch_3"):
    data.load_dataset("cifar10", path=str(d), image_size=32)
  with open(d / "data_batch_3", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match=r"data_batch_3.*3072"):
    data.load_dataset("cifar10", path=str(d), image_size=32)
  # a pickle that would run code is refused, not executed
  with open(d / "data_batch_3", "wb") as f:
    pickle.dump({b"data": os.getcwd, b"labels": []}, f)
  with pytest.raises(ValueError, match="refusing"):
    data.load_dataset("cifar10", path=str(d), image_size=32)
  with pytest.raises(ValueError, match="split"):
    data.load_dataset("cifar10", path=str(d), image_size=32, split="val")
  bad = tmp_path / "notatar.tar.gz"
  bad.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="notatar"):
    data.load_dataset("cifar10", path=str(bad), image_size=32)


# ------------------------------------------------------------------------------ folders


def _save(path, arr, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path, format=fmt)


def _framed(h, w, inner=(200, 20, 20), outer=(20, 20, 200)):
  """A w x h image whose largest centred square is `inner`, the rest `outer`."""
  a = np.empty((h, w, 3), np.uint8)
  a[:] = outer
  s = min(h, w)
  t, l = (h - s) // 2, (w - s) // 2
  a[t:t + s, l:l + s] = inner
  return a


def test_folder_classes_centre_crop_and_formats(tmp_path):
  root = tmp_path / "imgs"
  _save(root / "cat" / "a.png", _framed(40, 64))
  _save(root / "cat" / "sub" / "b.jpg", _framed(80, 48), "JPEG")  # frame on MCU edges
  _save(root / "dog" / "c.PNG", _framed(30, 30, inner=(10, 240, 10)))
  _save(root / "dog" / "d.png", np.full((50, 70), 128, np.uint8))  # greyscale -> RGB
  (root / "dog" / "notes.txt").write_text("not an image")
  ds = data.load_dataset("folder", path=str(root), image_size=16)
  assert ds.images.shape == (4, 16, 16, 3) and ds.num_classes == 2
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])  # classes sorted: cat, dog
  # the crop keeps only the centre square: no trace of the blue frame
  np.testing.assert_array_equal(ds.images[0], np.broadcast_to([200, 20, 20], (16, 16, 3)))
  jpg = ds.images[1].astype(int)  # JPEG shifts colours a little; the frame would be blue
  assert jpg[..., 0].min() > 150 and jpg[..., 2].max() < 80 and jpg[..., 1].max() < 60
  assert np.abs(ds.images[2].astype(int) - [10, 240, 10]).max() <= 2
  assert np.all(ds.images[3] == 128)


def test_folder_single_class_and_split_subfolder(tmp_path):
  root = tmp_path / "flat"
  for i in range(3):
    _save(root / f"{i}.png", np.full((8, 8, 3), i * 40, np.uint8))
  ds = data.load_dataset("folder", path=str(root), image_size=4)
  assert ds.num_classes == 1 and np.all(ds.labels == 0) and ds.images.shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [0, 40, 80])  # sorted file order
  with pytest.raises(FileNotFoundError, match="val"):
    data.load_dataset("folder", path=str(root), image_size=4, split="val")
  nested = tmp_path / "nested"
  _save(nested / "train" / "x" / "0.png", np.zeros((8, 8, 3), np.uint8))
  _save(nested / "val" / "x" / "0.png", np.full((8, 8, 3), 255, np.uint8))
  _save(nested / "val" / "y" / "0.png", np.full((8, 8, 3), 255, np.uint8))
  assert len(data.load_dataset("folder", path=str(nested), image_size=8)) == 1
  val = data.load_dataset("folder", path=str(nested), image_size=8, split="val")
  assert len(val) == 2 and val.num_classes == 2 and np.all(val.images == 255)


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "readme.txt").write_text("hi")
  with pytest.raises(ValueError, match="no image files"):
    data.load_dataset("folder", path=str(empty), image_size=8)
  bad = tmp_path / "bad"
  _save(bad / "a" / "ok.png", np.zeros((8, 8, 3), np.uint8))
  (bad / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    data.load_dataset("folder", path=str(bad), image_size=8)
  mixed = tmp_path / "mixed"
  _save(mixed / "a.png", np.zeros((8, 8, 3), np.uint8))
  _save(mixed / "cls" / "b.png", np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="both images and class"):
    data.load_dataset("folder", path=str(mixed), image_size=8)
  f = tmp_path / "file.png"
  _save(f, np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="not a directory"):
    data.load_dataset("folder", path=str(f), image_size=8)


# ------------------------------------------------------------------------------ iterator


def _toy(n=24, size=4):
  """Image i: constant value 10*i in every pixel except a marker at column 0 (flip test)."""
  imgs = np.zeros((n, size, size, 1), np.uint8)
  for i in range(n):
    imgs[i] = 10 * i
  imgs[:, :, 0, :] = 255  # left column marks orientation
  return data.ImageDataset(imgs, (np.arange(n) % 5).astype(np.int32), 5)


def _ids(batch):
  """Recover example index from a batch of _toy images (value in the unmarked middle)."""
  u8 = np.round((batch["image"] + 1) * 127.5).astype(int)
  return u8[:, 1, 1, 0] // 10


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_iterator_batches_ranges_and_epochs():
  ds = _toy()
  it = data.make_train_iterator(ds, batch_size=8, seed=3, random_flip=False)
  batches = _take(it, 6)
  for b in batches:
    assert b["image"].shape == (8, 4, 4, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    ids = _ids(b)
    np.testing.assert_array_equal(b["label"], ids % 5)  # labels stay with their images
    assert np.all(b["image"][:, :, 0] == 1.0)  # no flips when random_flip=False
  ep1 = np.concatenate([_ids(b) for b in batches[:3]])
  ep2 = np.concatenate([_ids(b) for b in batches[3:]])
  assert sorted(ep1) == list(range(24)) and sorted(ep2) == list(range(24))  # each epoch: all once
  assert list(ep1) != list(range(24)) and list(ep1) != list(ep2)  # shuffled, reshuffled
  # the exact [-1, 1] mapping
  np.testing.assert_allclose(batches[0]["image"][:, 1, 1, 0], ids_to_float(ep1[:8]), atol=1e-6)


def ids_to_float(ids):
  return (10 * np.asarray(ids)) / 127.5 - 1.0


def test_iterator_random_flip_and_determinism():
  ds = _toy()
  a = _take(data.make_train_iterator(ds, batch_size=8, seed=5), 6)
  b = _take(data.make_train_iterator(ds, batch_size=8, seed=5), 6)
  c = _take(data.make_train_iterator(ds, batch_size=8, seed=6), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  imgs = np.concatenate([x["image"] for x in a])
  flipped = imgs[:, :, -1, 0] == 1.0
  unflipped = imgs[:, :, 0, 0] == 1.0
  assert np.all(flipped.all(1) ^ unflipped.all(1))  # every image is one or the other
  frac = flipped.all(1).mean()
  assert 0.25 < frac < 0.75, frac


def test_iterator_resume_same_order():
  ds = data.load_dataset("digits", image_size=8, split="test")
  it = data.make_train_iterator(ds, batch_size=16, seed=11)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  after = _take(it, 3)
  fresh = data.make_train_iterator(ds, batch_size=16, seed=11)
  fresh.set_state(state)
  resumed = _take(fresh, 3)
  for x, y in zip(after, resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # a different pipeline refuses the state instead of silently changing the order
  other = data.make_train_iterator(ds, batch_size=8, seed=11)
  with pytest.raises(ValueError, match="batch_size"):
    other.set_state(state)
  with pytest.raises(ValueError, match="'pipeline'"):
    other.set_state({"next_index": 3})
  # same shapes and sizes but different data: refused too
  changed = data.ImageDataset(255 - ds.images, ds.labels, ds.num_classes)
  with pytest.raises(ValueError, match="data_digest"):
    data.make_train_iterator(changed, batch_size=16, seed=11).set_state(state)


def test_iterator_grain_orbax_checkpoint(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  ds = _toy()
  it = data.make_train_iterator(ds, batch_size=4, seed=1)
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expect = _take(it, 2)
    fresh = data.make_train_iterator(ds, batch_size=4, seed=1)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x, y in zip(expect, _take(fresh, 2)):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_iterator_sharding_disjoint_and_complete():
  ds = _toy(n=25)
  per_shard = []
  for i in range(3):
    it = data.make_train_iterator(ds, batch_size=6, seed=2, shard_index=i, shard_count=3,
                                  random_flip=False)
    b = _take(it, 4)  # 8 examples per shard per epoch, 2 per batch -> one epoch
    assert all(x["image"].shape[0] == 2 for x in b)
    ids = np.concatenate([_ids(x) for x in b])
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
    per_shard.append(set(ids.tolist()))
  assert not (per_shard[0] & per_shard[1]) and not (per_shard[1] & per_shard[2])
  assert not (per_shard[0] & per_shard[2])
  assert len(per_shard[0] | per_shard[1] | per_shard[2]) == 24  # one remainder example dropped


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=7, shard_count=2), "divisible"),
    (dict(batch_size=32), "larger than the data"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=4, shard_index=2, shard_count=2), "shard"),
    (dict(batch_size=4, seed=-1), "seed"),
])
def test_iterator_argument_errors(kwargs, match):
  ds = _toy(n=10)
  with pytest.raises(ValueError, match=match):
    data.make_train_iterator(ds, seed=kwargs.pop("seed", 0), **kwargs)


# Each grain worker is a spawned process that imports grain (and rin): seconds each, more on
# a busy machine, so the 2-worker case (which also interleaves worker slices) is marked slow.
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_iterator_multiprocess_prefetch_matches_threads(workers):
  ds = _toy()
  ref = _take(data.make_train_iterator(ds, batch_size=4, seed=9), 5)
  it = data.make_train_iterator(ds, batch_size=4, seed=9, worker_count=workers)
  try:
    got = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  for x, y in zip(ref, got):
    np.testing.assert_array_equal(x["image"], y["image"])
  it2 = data.make_train_iterator(ds, batch_size=4, seed=9, worker_count=workers)
  try:
    it2.set_state(state)
    rest = _take(it2, 2)
  finally:
    it2.close()
  for x, y in zip(ref[3:], rest):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_folder_cache_memmap_and_worker_pickling(tmp_path):
  root = tmp_path / "imgs"
  for c in ("a", "b"):
    for i in range(3):
      _save(root / c / f"{i}.png", np.full((12, 10, 3), 30 * i + (100 if c == "b" else 0),
                                           np.uint8))
  cache = tmp_path / "cache"
  first = data.load_dataset("folder", path=str(root), image_size=8, cache_dir=str(cache))
  plain = data.load_dataset("folder", path=str(root), image_size=8)
  np.testing.assert_array_equal(first.images, plain.images)
  np.testing.assert_array_equal(first.labels, plain.labels)
  assert isinstance(first.images, np.memmap) and first.num_classes == 2
  assert len(os.listdir(cache)) == 1  # one entry, no temporary leftovers
  # served from the cache: the (now corrupt) source is not read again
  (root / "a" / "0.png").write_bytes(b"corrupt")
  again = data.load_dataset("folder", path=str(root), image_size=8, cache_dir=str(cache))
  np.testing.assert_array_equal(again.images, plain.images)
  with pytest.raises(ValueError, match="0.png"):
    data.load_dataset("folder", path=str(root), image_size=8)
  # another image size is another cache entry (and sees the corrupt file)
  with pytest.raises(ValueError, match="0.png"):
    data.load_dataset("folder", path=str(root), image_size=4, cache_dir=str(cache))
  # a damaged entry is rebuilt, not trusted
  entry = cache / os.listdir(cache)[0]
  (entry / "images.npy").write_bytes(b"damaged")
  _save(root / "a" / "0.png", np.full((12, 10, 3), 0, np.uint8))
  rebuilt = data.load_dataset("folder", path=str(root), image_size=8, cache_dir=str(cache))
  np.testing.assert_array_equal(rebuilt.images, plain.images)
  # worker processes get the file name, not a copy of the images
  src = data._ArraySource(rebuilt.images, rebuilt.labels)
  blob = pickle.dumps(src)
  assert len(blob) < rebuilt.images.nbytes
  back = pickle.loads(blob)
  np.testing.assert_array_equal(back[4]["image"], rebuilt.images[4])
  assert back[4]["label"] == rebuilt.labels[4]
  # and the training iterator runs on the memory-mapped arrays
  batch = next(data.make_train_iterator(rebuilt, batch_size=4, seed=0))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
