"""Video data sets for VideoRIN, held in memory as uint8 [N, F, H, W, C].

* ``"moving_digits"`` -- built deterministically from scikit-learn's embedded 8x8 digits (no
  download): each clip has ``num_digits`` digits (resized to ``digit_size``) starting at a
  random place and moving at a constant random velocity, bouncing off the frame's walls;
  overlapping digits combine by maximum (as in Moving MNIST). Train clips use only the
  digits of rin.data's ``"train"`` split and test clips only its ``"test"`` split, each from
  its own fixed generator seed (independent of any training seed), so both splits are the
  same on every machine. Labels are the first digit's class; the true positions of every
  digit are kept (``positions`` [N, F, K, 2], top-left (row, col)) for the crop metrics.
* ``"video_folder"`` -- a folder (or its ``train``/``test`` subfolder) whose entries are
  videos: animated image files PIL can read (.gif, animated .png/.webp, multi-page .tif),
  .mp4/.avi/.mov/.webm/.mkv through ``imageio`` when it is installed, or subfolders of frame
  images (sorted by file name). Every entry gives its non-overlapping clips of
  ``num_frames`` frames (an entry shorter than that is an error naming it); frames get the
  image folder's preprocessing (centred square crop, antialiased bicubic resize) and are
  converted to grey for ``channels=1``. Label 0.

``VideoDataset`` is an ``ImageDataset`` whose images have a frame axis, so rin.data's grain
pipeline (shuffle, shard, batch, checkpointable state) serves videos unchanged.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from rin import data as data_lib

VIDEO_DATASET_NAMES = ("moving_digits", "video_folder")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v")
ANIMATED_EXTENSIONS = (".gif", ".png", ".webp", ".tif", ".tiff", ".apng")
_SPLIT_SEEDS = {"train": 1, "test": 2}   # moving digits: one fixed generator per split


@dataclasses.dataclass
class VideoDataset(data_lib.ImageDataset):
  """In-memory videos: images uint8 [N, F, H, W, C], labels int32 [N]."""
  positions: np.ndarray | None = None    # moving digits: int32 [N, F, K, 2]

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 \
        or self.images.ndim != 5:
      raise ValueError(
          "VideoDataset.images must be a uint8 array [N, F, H, W, C], got "
          f"{getattr(self.images, 'dtype', type(self.images))} with shape "
          f"{getattr(self.images, 'shape', None)}")
    if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int32 \
        or self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"VideoDataset.labels must be an int32 array [{self.images.shape[0]}], "
                       f"got {getattr(self.labels, 'shape', None)}")

  @property
  def num_frames(self) -> int:
    return int(self.images.shape[1])

  @property
  def frame_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.images.shape[2:])  # type: ignore[return-value]


def _positive_int(name: str, v, lo: int = 1) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
  return int(v)


def make_moving_digits(split: str = "train", *, num_videos: int = 4096, num_frames: int = 16,
                       image_size: int = 32, digit_size: int = 8, num_digits: int = 1,
                       speed: tuple[float, float] = (0.5, 1.5)) -> VideoDataset:
  """The moving-digits clips of `split` ("train" or "test"); deterministic (module doc).

  speed: (min, max) pixels per frame, drawn uniformly; the direction uniformly.
  """
  if split not in _SPLIT_SEEDS:
    raise ValueError(f"moving digits: split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
  num_videos = _positive_int("num_videos", num_videos)
  num_frames = _positive_int("num_frames", num_frames)
  image_size = _positive_int("image_size", image_size)
  digit_size = _positive_int("digit_size", digit_size)
  num_digits = _positive_int("num_digits", num_digits)
  if digit_size > image_size:
    raise ValueError(f"digit_size={digit_size} exceeds image_size={image_size}")
  lo, hi = (float(s) for s in speed)
  if not 0 <= lo <= hi:
    raise ValueError(f"speed must be (min, max) with 0 <= min <= max, got {speed!r}")
  digits = data_lib.load_dataset("digits", image_size=digit_size, split=split)
  rng = np.random.default_rng(_SPLIT_SEEDS[split])
  room = image_size - digit_size                      # top-left coordinate range [0, room]
  which = rng.integers(0, len(digits), (num_videos, num_digits))
  start = rng.uniform(0, room, (num_videos, num_digits, 2))
  angle = rng.uniform(0, 2 * np.pi, (num_videos, num_digits))
  vel = rng.uniform(lo, hi, (num_videos, num_digits))[..., None] * np.stack(
      [np.sin(angle), np.cos(angle)], -1)
  # Bouncing as a reflection of the unbounded path into [0, room] (a triangle wave).
  path = start[:, None] + np.arange(num_frames)[None, :, None, None] * vel[:, None]
  if room > 0:
    path = np.abs((path + room) % (2 * room) - room)
  else:
    path = np.zeros_like(path)
  pos = np.rint(path).astype(np.int32)                # [N, F, K, 2]
  videos = np.zeros((num_videos, num_frames, image_size, image_size, 1), np.uint8)
  glyphs = digits.images[which]                       # [N, K, d, d, 1]
  for n in range(num_videos):
    for f in range(num_frames):
      for k in range(num_digits):
        r, c = pos[n, f, k]
        win = videos[n, f, r:r + digit_size, c:c + digit_size]
        np.maximum(win, glyphs[n, k], out=win)
  return VideoDataset(videos, digits.labels[which[:, 0]].astype(np.int32), 10, positions=pos)


def _frames_of_file(fname: str, channels: int, image_size: int) -> list[np.ndarray]:
  ext = os.path.splitext(fname)[1].lower()
  if ext in VIDEO_EXTENSIONS:
    try:
      import imageio.v3 as iio
    except ImportError:
      raise ValueError(f"video file {fname!r}: reading {ext} needs the imageio package "
                       "(pip install 'imageio[ffmpeg]'); .gif files and folders of frame "
                       "images need only PIL") from None
    from PIL import Image
    return [_prep(Image.fromarray(np.asarray(f)), channels, image_size)
            for f in iio.imiter(fname)]
  from PIL import Image, ImageSequence
  try:
    with Image.open(fname) as img:
      return [_prep(fr.copy(), channels, image_size) for fr in ImageSequence.Iterator(img)]
  except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt files
    raise ValueError(f"could not read video file {fname!r}: {type(e).__name__}: {e}") from e


def _prep(img, channels: int, image_size: int) -> np.ndarray:
  rgb = data_lib.center_crop_resize(img, image_size)
  if channels == 1:
    from PIL import Image
    return np.asarray(Image.fromarray(rgb).convert("L"), np.uint8)[..., None]
  return rgb


def load_video_folder(path: str, *, num_frames: int, image_size: int, channels: int = 3,
                      split: str = "train") -> VideoDataset:
  """Clips of `num_frames` from a folder of videos or frame folders (module doc)."""
  num_frames = _positive_int("num_frames", num_frames)
  image_size = _positive_int("image_size", image_size)
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  if path is None or path == "":
    raise ValueError("video_folder: config.data.path (the folder of videos) is required")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"video_folder: data path {path!r} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"video_folder: data path {path!r} is not a directory")
  root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
  if root == path and split != "train":
    raise FileNotFoundError(f"video_folder: no {split!r} subfolder in {path!r}")
  clips = []
  entries = sorted(e for e in os.listdir(root) if not e.startswith(".") and e != "test"
                   and not (root == path and e == "train"))
  for e in entries:
    full = os.path.join(root, e)
    if os.path.isdir(full):
      files = [os.path.join(full, f) for f in sorted(os.listdir(full)) if data_lib._is_image(f)]
      if not files:
        continue
      frames = [data_lib._read_image(f, image_size) for f in files]
      if channels == 1:
        from PIL import Image
        frames = [np.asarray(Image.fromarray(f).convert("L"))[..., None] for f in frames]
    elif e.lower().endswith(VIDEO_EXTENSIONS + ANIMATED_EXTENSIONS):
      frames = _frames_of_file(full, channels, image_size)
    else:
      continue
    if len(frames) < num_frames:
      raise ValueError(f"video_folder: {full!r} has {len(frames)} frames, fewer than "
                       f"num_frames={num_frames}")
    for s in range(0, len(frames) - num_frames + 1, num_frames):
      clips.append(np.stack(frames[s:s + num_frames]))
  if not clips:
    raise ValueError(f"video_folder: no videos ({', '.join(VIDEO_EXTENSIONS + ANIMATED_EXTENSIONS)}) "
                     f"or folders of frame images found in {root!r}")
  return VideoDataset(np.stack(clips).astype(np.uint8), np.zeros(len(clips), np.int32), 1)


def load_video_dataset(config, split: str = "train") -> VideoDataset:
  """The data set of a video config (config.data.name, config.model sizes)."""
  d, m = config.data, config.model
  name = d.name
  if name not in VIDEO_DATASET_NAMES:
    raise ValueError(f"config.data.name={name!r} is not a video data set; expected one of "
                     f"{VIDEO_DATASET_NAMES}")
  if name == "moving_digits":
    if m.channels != 1:
      raise ValueError(f"moving digits are grey: config.model.channels must be 1, got {m.channels}")
    # The moving-digits fields are declared by rin/configs/moving_digits.py.
    n = d.num_train_videos if split == "train" else d.num_test_videos
    return make_moving_digits(split, num_videos=n, num_frames=m.num_frames,
                              image_size=m.image_size, digit_size=d.digit_size,
                              num_digits=d.num_digits, speed=tuple(d.speed))
  return load_video_folder(d.path, num_frames=m.num_frames, image_size=m.image_size,
                           channels=m.channels, split=split)
