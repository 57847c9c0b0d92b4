"""Image data sets and the grain input pipeline for RIN training.

Data sets (``load_dataset``) are held in memory as one ``uint8`` array
``[N, H, W, C]`` plus ``int32`` labels:

* ``"digits"`` -- the 1797 real 8x8 handwritten digits that ship with
  scikit-learn (``sklearn.datasets.load_digits``), so training works with no
  download. Pixel values 0..16 are mapped to 0..255 and the images resized
  to ``image_size`` (PIL bicubic; PIL's filters are area-aware, i.e.
  antialiased, when reducing). One channel, ten classes. Splits: a fixed,
  class-stratified permutation (seed 0, independent of any training seed)
  puts round(10%) of every class in ``"test"`` (179 images) and the rest in
  ``"train"`` (1618 images); ``"all"`` is all 1797 in the original order.
  (Horizontal flips make no sense for digits: train them with
  ``random_flip=False``.)
* ``"cifar10"`` -- the standard python-pickle archive: ``path`` is the
  ``cifar-10-batches-py`` directory, a directory that contains it, or the
  ``cifar-10-python.tar.gz`` archive itself. ``"train"`` reads
  ``data_batch_1..5``, ``"test"`` reads ``test_batch``. Images are resized
  only when ``image_size != 32``. The pickles are read with a restricted
  unpickler that only builds dicts, lists, bytes and numpy arrays.
* ``"folder"`` -- any folder of images. If ``path`` has a subfolder named
  like the split (``path/train``, ``path/val``) it is used, otherwise
  ``split="train"`` uses ``path`` itself. Classes are the immediate
  subfolders (sorted by name; images are found recursively below each), or a
  single class 0 when the images lie directly in the folder. Preprocessing is
  the published ImageNet one: the largest centred square crop, then an
  antialiased (bicubic) resize to ``image_size``; images are converted to RGB.

``make_train_iterator`` builds the infinite, shuffled, per-host-sharded,
randomly flipped, batched and prefetched training stream on grain, and
returns a checkpointable iterator (``get_state`` / ``set_state``, JSON).

Why one module over 400 lines: each loader is short, but all of them produce the one
``ImageDataset`` type whose digest the iterator state records, so that a resume can refuse
another data set; keeping them beside the pipeline keeps that contract on one page.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from typing import Any

import numpy as np

import grain

DATASET_NAMES = ("digits", "cifar10", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")
_DIGITS_TEST_FRACTION = 0.1
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass
class ImageDataset:
  """An in-memory image data set."""
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]
  num_classes: int

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 \
        or self.images.ndim != 4:
      raise ValueError(
          "ImageDataset.images must be a uint8 array [N, H, W, C], got "
          f"{getattr(self.images, 'dtype', type(self.images))} with shape "
          f"{getattr(self.images, 'shape', None)}")
    if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int32 \
        or self.labels.shape != (self.images.shape[0],):
      raise ValueError(
          "ImageDataset.labels must be an int32 array [N] with N = "
          f"{self.images.shape[0]} (the number of images), got "
          f"{getattr(self.labels, 'dtype', type(self.labels))} with shape "
          f"{getattr(self.labels, 'shape', None)}")
    if int(self.num_classes) < 1:
      raise ValueError(f"ImageDataset.num_classes must be >= 1, got {self.num_classes}")
    if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      raise ValueError(
          f"ImageDataset labels must lie in [0, {self.num_classes}), got range "
          f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_dataset(name: str, *, path: str | None = None, image_size: int,
                 split: str = "train", cache_dir: str | None = None) -> ImageDataset:
  """Loads data set ``name`` resized to ``image_size`` x ``image_size``.

  Args:
    name: one of ``"digits"``, ``"cifar10"``, ``"folder"`` (see module doc).
    path: where the data lives; required for ``"cifar10"`` and ``"folder"``,
      not used by ``"digits"``.
    image_size: output height and width in pixels (>= 1).
    split: ``"train"``, ``"test"`` (``"all"`` for digits; any subfolder name
      for folders).
    cache_dir: optional. Decoding a large image folder (ImageNet) takes long:
      with ``cache_dir`` the decoded, resized arrays are written there once
      (``.npy`` files, atomically) and later loads memory-map them (also in
      ``mp_prefetch`` workers, which reopen the file instead of copying it).
      The cache key is (name, absolute path, split, image_size): delete the
      cache folder when the source data change. Not used for ``"digits"``.

  Raises:
    ValueError: unknown name or split, bad image_size, malformed files.
    FileNotFoundError: ``path`` (or a file the format needs) does not exist.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"load_dataset: unknown dataset name {name!r}; known names: "
                     f"{', '.join(DATASET_NAMES)}")
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or image_size < 1:
    raise ValueError(f"load_dataset: image_size must be an integer >= 1, got {image_size!r}")
  image_size = int(image_size)
  if name == "digits":
    return _load_digits(image_size, split)
  if path is None:
    raise ValueError(f"load_dataset({name!r}): the path= argument is required for this "
                     "dataset (the data cannot be downloaded here)")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"load_dataset({name!r}): path={path!r} does not exist")
  loader = _load_cifar10 if name == "cifar10" else _load_folder
  if cache_dir is None:
    return loader(path, image_size, split)
  key = hashlib.sha256(json.dumps([name, os.path.abspath(path), split, image_size,
                                   _CACHE_VERSION]).encode()).hexdigest()[:16]
  entry = os.path.join(os.fspath(cache_dir), f"{name}-{split}-{image_size}-{key}")
  if os.path.isdir(entry):
    try:
      return _read_cache(entry)
    except Exception as e:  # noqa: BLE001 -- any damage: rebuild, loudly
      logging.warning("load_dataset: ignoring unreadable cache %s (%s); rebuilding", entry, e)
  ds = loader(path, image_size, split)
  _write_cache(entry, ds, source=os.path.abspath(path))
  return _read_cache(entry)


_CACHE_VERSION = 1


def _write_cache(entry: str, ds: ImageDataset, source: str) -> None:
  parent = os.path.dirname(entry) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(entry) + ".tmp-", dir=parent)
  try:
    np.save(os.path.join(tmp, "images.npy"), np.ascontiguousarray(ds.images))
    np.save(os.path.join(tmp, "labels.npy"), ds.labels)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"num_classes": int(ds.num_classes), "num_examples": len(ds),
                 "image_shape": list(ds.image_shape), "source": source,
                 "version": _CACHE_VERSION}, f)
    if os.path.isdir(entry):  # a previous, unreadable entry
      shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(entry):  # another process may have won the race
      raise


def _read_cache(entry: str) -> ImageDataset:
  with open(os.path.join(entry, "meta.json")) as f:
    meta = json.load(f)
  images = np.load(os.path.join(entry, "images.npy"), mmap_mode="r")
  labels = np.load(os.path.join(entry, "labels.npy")).astype(np.int32)
  if images.shape != (meta["num_examples"], *meta["image_shape"]):
    raise ValueError(f"cache {entry!r}: images {images.shape} disagree with meta.json {meta}")
  return ImageDataset(images, labels, int(meta["num_classes"]))


def _resize_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes uint8 [N, h, w, C] to [N, S, S, C] with PIL bicubic (antialiased)."""
  from PIL import Image
  n, h, w, c = images.shape
  if (h, w) == (image_size, image_size):
    return images
  out = np.empty((n, image_size, image_size, c), np.uint8)
  for i in range(n):
    img = images[i, :, :, 0] if c == 1 else images[i]
    pil = Image.fromarray(img, mode="L" if c == 1 else "RGB")
    r = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BICUBIC))
    out[i] = r.reshape(image_size, image_size, c)
  return out


def _load_digits(image_size: int, split: str) -> ImageDataset:
  from sklearn.datasets import load_digits
  if split not in ("train", "test", "all"):
    raise ValueError(f"load_dataset('digits'): unknown split {split!r}; "
                     "use 'train', 'test' or 'all'")
  bunch = load_digits()
  images = np.round(np.asarray(bunch.images, np.float64) * (255.0 / 16.0))
  images = np.clip(images, 0, 255).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
  labels = np.asarray(bunch.target, np.int32)
  if split != "all":
    test_idx = digits_test_indices(labels)
    mask = np.zeros(len(labels), bool)
    mask[test_idx] = True
    keep = np.nonzero(mask if split == "test" else ~mask)[0]
    images, labels = images[keep], labels[keep]
  return ImageDataset(_resize_uint8(images, image_size), labels, 10)


def digits_test_indices(labels: np.ndarray) -> np.ndarray:
  """Indices of the fixed, class-stratified 10% digits test split (sorted)."""
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  out = []
  for c in np.unique(labels):
    idx = np.nonzero(labels == c)[0]
    idx = rng.permutation(idx)
    out.append(idx[:int(round(len(idx) * _DIGITS_TEST_FRACTION))])
  return np.sort(np.concatenate(out))


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for the CIFAR archive: only numpy arrays and builtins containers."""
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict"),
      ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
    return super().find_class(module, name)


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # noqa: BLE001 -- any unpickling failure is a malformed file
    raise ValueError(f"CIFAR-10 file {where} could not be read as a python pickle: {e}") from e
  if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
    keys = list(d.keys()) if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"CIFAR-10 file {where} must be a dict with b'data' and b'labels', "
                     f"got {keys}")
  data = np.asarray(d[b"data"])
  labels = np.asarray(d[b"labels"])
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    raise ValueError(f"CIFAR-10 file {where}: b'data' must be uint8 [N, 3072], got "
                     f"{data.dtype} {data.shape}")
  if labels.shape != (data.shape[0],) or labels.size and (labels.min() < 0 or labels.max() > 9):
    raise ValueError(f"CIFAR-10 file {where}: b'labels' must be {data.shape[0]} integers "
                     f"in 0..9, got shape {labels.shape}")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> HWC
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _load_cifar10(path: str, image_size: int, split: str) -> ImageDataset:
  if split == "train":
    names = [f"data_batch_{i}" for i in range(1, 6)]
  elif split == "test":
    names = ["test_batch"]
  else:
    raise ValueError(f"load_dataset('cifar10'): unknown split {split!r}; use 'train' or 'test'")
  parts = []
  if os.path.isdir(path):
    root = path
    if not os.path.exists(os.path.join(root, names[0])) and \
        os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
      root = os.path.join(root, "cifar-10-batches-py")
    for n in names:
      f = os.path.join(root, n)
      if not os.path.isfile(f):
        raise FileNotFoundError(f"load_dataset('cifar10', path={path!r}): missing file {f!r} "
                                "(expected the python-pickle cifar-10-batches-py layout)")
      with open(f, "rb") as fh:
        parts.append(_cifar_batch(fh.read(), repr(f)))
  else:
    try:
      tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
      raise ValueError(f"load_dataset('cifar10', path={path!r}): not a directory and not a "
                       f"readable tar archive: {e}") from e
    with tar:
      members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
      for n in names:
        if n not in members:
          raise FileNotFoundError(f"load_dataset('cifar10', path={path!r}): the archive has "
                                  f"no member {n!r}")
        fh = tar.extractfile(members[n])
        parts.append(_cifar_batch(fh.read(), f"{path}:{members[n].name}"))
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  return ImageDataset(_resize_uint8(images, image_size), labels, 10)


def _is_image(fname: str) -> bool:
  return fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith(".")


def _images_under(d: str) -> list[str]:
  out = []
  for root, dirs, files in os.walk(d):
    dirs[:] = sorted(x for x in dirs if not x.startswith("."))
    out.extend(os.path.join(root, f) for f in sorted(files) if _is_image(f))
  return out


def center_crop_resize(img, image_size: int) -> np.ndarray:
  """Largest centred square crop, then antialiased bicubic resize; RGB uint8 [S, S, 3]."""
  from PIL import Image
  img = img.convert("RGB")
  w, h = img.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  img = img.crop((left, top, left + s, top + s))
  if s != image_size:
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(img, np.uint8)


def _read_image(fname: str, image_size: int) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(fname) as img:
      img.load()
      return center_crop_resize(img, image_size)
  except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt files
    raise ValueError(f"could not read image file {fname!r}: {type(e).__name__}: {e}") from e


def _load_folder(path: str, image_size: int, split: str) -> ImageDataset:
  if not os.path.isdir(path):
    raise ValueError(f"load_dataset('folder', path={path!r}): path is not a directory")
  root = path
  if os.path.isdir(os.path.join(path, split)):
    root = os.path.join(path, split)
  elif split != "train":
    raise FileNotFoundError(f"load_dataset('folder', path={path!r}, split={split!r}): "
                            f"no subfolder {os.path.join(path, split)!r}")
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  direct = [os.path.join(root, e) for e in entries
            if _is_image(e) and os.path.isfile(os.path.join(root, e))]
  subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
  class_files = {d: _images_under(os.path.join(root, d)) for d in subdirs}
  class_files = {d: f for d, f in class_files.items() if f}
  if direct and class_files:
    raise ValueError(f"load_dataset('folder'): {root!r} holds both images and class "
                     f"subfolders with images ({', '.join(sorted(class_files))}); use one "
                     "layout (class = immediate subfolder) or the other (a single class)")
  if direct:
    files, labels, num_classes = direct, [0] * len(direct), 1
  elif class_files:
    classes = sorted(class_files)
    files, labels = [], []
    for i, c in enumerate(classes):
      files += class_files[c]
      labels += [i] * len(class_files[c])
    num_classes = len(classes)
  else:
    raise ValueError(f"load_dataset('folder'): no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                     f"found in {root!r} or its subfolders")
  workers = min(16, (os.cpu_count() or 1) * 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    images = list(ex.map(lambda f: _read_image(f, image_size), files))
  return ImageDataset(np.stack(images), np.asarray(labels, np.int32), num_classes)


# --------------------------------------------------------------------------------------
# grain pipeline
# --------------------------------------------------------------------------------------


class _ArraySource:
  """Random-access source over the in-memory arrays (picklable for mp_prefetch)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, i):
    i = int(i)
    return {"image": np.asarray(self._images[i]), "label": self._labels[i]}

  def __getstate__(self):
    # A memory-mapped cache is reopened in worker processes, not copied into them.
    imgs = self._images
    if isinstance(imgs, np.memmap) and getattr(imgs, "filename", None) and \
        imgs.flags.c_contiguous:
      ref = ("memmap", imgs.filename, int(imgs.offset), imgs.shape, imgs.dtype.str)
      return {"images": ref, "labels": self._labels}
    return {"images": imgs, "labels": self._labels}

  def __setstate__(self, state):
    imgs = state["images"]
    if isinstance(imgs, tuple) and imgs and imgs[0] == "memmap":
      _, filename, offset, shape, dtype = imgs
      imgs = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
    self._images, self._labels = imgs, state["labels"]


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Flips ``element["image"]`` ([H, W, C]) left-right with probability ``p``."""

  def __init__(self, p: float = 0.5):
    self.p = p

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < self.p:
      element = dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))
    return element


class ToModelInputs(grain.transforms.Map):
  """uint8 [B, H, W, C] -> float32 in [-1, 1]; labels -> int32."""

  def map(self, element):
    img = element["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return {"image": img, "label": np.asarray(element["label"], np.int32)}


class TrainIterator(grain.DatasetIterator):
  """The training stream; a grain ``DatasetIterator`` whose state records the pipeline.

  ``get_state()`` returns a JSON-serialisable dict: grain's own iterator state
  plus a description of the pipeline (data set size and shape, batch size,
  seed, shard). ``set_state`` refuses (ValueError) a state written by a
  different pipeline, so a resumed run either sees exactly the data order of
  the uninterrupted one or fails loudly. It works with
  ``grain.checkpoint.CheckpointSave/CheckpointRestore`` under orbax, or store
  ``json.dumps(it.get_state())`` yourself.
  """

  def __init__(self, inner: grain.DatasetIterator, pipeline: dict[str, Any]):
    super().__init__(inner)
    self._inner = inner
    self.pipeline = pipeline

  def __next__(self):
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": dict(self.pipeline), "iterator": self._inner.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "pipeline" not in state or "iterator" not in state:
      raise ValueError("TrainIterator.set_state: expected a dict with 'pipeline' and "
                       f"'iterator' keys (from get_state()), got {type(state).__name__}"
                       + (f" with keys {sorted(state)}" if isinstance(state, dict) else ""))
    saved = state["pipeline"]   # written by this or an earlier version: keys may be absent
    diff = {k: (saved.get(k), v) for k, v in self.pipeline.items() if saved.get(k) != v}
    if diff:
      detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError("TrainIterator.set_state: the saved data-iterator state belongs to a "
                       f"different input pipeline ({detail})")
    self._inner.set_state(state["iterator"])

  def __str__(self) -> str:
    return f"TrainIterator({self.pipeline})"


def dataset_digest(dataset: ImageDataset, samples: int = 64) -> str:
  """A cheap fingerprint of a data set: all labels and ~``samples`` evenly spaced images."""
  h = hashlib.sha256()
  h.update(json.dumps([len(dataset), list(dataset.image_shape), int(dataset.num_classes)]).encode())
  h.update(np.ascontiguousarray(dataset.labels).tobytes())
  step = max(1, len(dataset) // samples)
  h.update(np.ascontiguousarray(dataset.images[::step]).tobytes())
  return h.hexdigest()[:16]


def _read_grain_flags_at_defaults() -> None:
  """grain's multiprocessing reads its own absl flags (--grain_*), which raises before absl
  parsed a command line (notebooks, pytest, programs without absl.app). Marks only those
  flags as set, as grain does in its worker processes, so their defaults are read; the
  process's other flags stay unparsed."""
  from absl import flags
  if flags.FLAGS.is_parsed():
    return
  for name in list(flags.FLAGS):
    if name.startswith("grain_") and not flags.FLAGS[name].present:
      flags.FLAGS[name].present = 1


def make_train_iterator(dataset: ImageDataset, *, batch_size: int, seed: int,
                        random_flip: bool = True, shard_index: int = 0, shard_count: int = 1,
                        worker_count: int = 0, prefetch_buffer_size: int = 4,
                        num_threads: int = 4) -> TrainIterator:
  """Infinite training stream on grain.

  Pipeline: in-memory source -> this host's shard (``grain.sharding.ShardOptions``;
  strided, so every host sees every class, equal shard sizes, remainder
  dropped) -> global shuffle with ``seed`` (reshuffled every epoch) -> repeat
  forever -> random horizontal flip (``RandomHorizontalFlip``, seeded per
  element from ``seed``) -> batch of ``batch_size // shard_count`` with
  ``drop_remainder`` -> float32 in [-1, 1] -> thread prefetch
  (``ReadOptions``) -> optional ``mp_prefetch`` with ``worker_count`` processes.

  Args:
    dataset: the in-memory data.
    batch_size: the GLOBAL batch size; each host yields ``batch_size // shard_count``.
    seed: shuffle and flip seed (0 <= seed < 2**32).
    random_flip: flip horizontally with probability 1/2.
    shard_index, shard_count: this host's shard (e.g. ``jax.process_index()``,
      ``jax.process_count()``).
    worker_count: processes for ``mp_prefetch`` (0: threads only).
    prefetch_buffer_size, num_threads: grain ``ReadOptions``.

  Yields:
    ``{"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}``.
  """
  if not isinstance(dataset, ImageDataset):
    raise TypeError(f"make_train_iterator: dataset must be an ImageDataset, got "
                    f"{type(dataset).__name__}")
  for arg, val, lo in (("batch_size", batch_size, 1), ("shard_count", shard_count, 1),
                       ("worker_count", worker_count, 0), ("seed", seed, 0),
                       ("prefetch_buffer_size", prefetch_buffer_size, 0),
                       ("num_threads", num_threads, 0)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
      raise ValueError(f"make_train_iterator: {arg} must be an integer >= {lo}, got {val!r}")
  if seed >= 2**32:
    raise ValueError(f"make_train_iterator: seed must be < 2**32, got {seed}")
  shard = grain.sharding.ShardOptions(shard_index=int(shard_index),
                                      shard_count=int(shard_count), drop_remainder=True)
  if batch_size % shard.shard_count:
    raise ValueError(f"make_train_iterator: batch_size={batch_size} (global) must be divisible "
                     f"by shard_count={shard.shard_count}")
  per_host_batch = batch_size // shard.shard_count
  n = len(dataset)
  shard_size = n // shard.shard_count
  if batch_size > n or per_host_batch > shard_size:
    raise ValueError(f"make_train_iterator: batch_size={batch_size} is larger than the data "
                     f"set ({n} examples; {shard_size} per shard over {shard.shard_count} "
                     f"shards, {per_host_batch} per shard batch)")

  ds = grain.MapDataset.source(_ArraySource(dataset.images, dataset.labels))
  ds = ds[shard.shard_index:shard_size * shard.shard_count:shard.shard_count]
  ds = ds.shuffle(seed=int(seed)).repeat(None)
  if random_flip:
    ds = ds.random_map(RandomHorizontalFlip(), seed=int(seed))
  ds = ds.batch(per_host_batch, drop_remainder=True).map(ToModelInputs())
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(num_threads),
                                               prefetch_buffer_size=int(prefetch_buffer_size)))
  if worker_count > 0:
    _read_grain_flags_at_defaults()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  pipeline = {
      "data_digest": dataset_digest(dataset), "num_examples": n, "image_shape": list(dataset.image_shape),
      "num_classes": int(dataset.num_classes), "batch_size": int(batch_size),
      "seed": int(seed), "random_flip": bool(random_flip),
      "shard_index": shard.shard_index, "shard_count": shard.shard_count,
      "worker_count": int(worker_count),
  }
  return TrainIterator(iter(it_ds), pipeline)
