"""Metric logging: JSONL (one record per line) + TensorBoard event files (tensorboardX);
and the command lines' log filter.

Only the primary process writes metrics; on the others every MetricWriter method is a no-op.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import numpy as np

from rin import distributed


def _jsonable(v):
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return v if math.isfinite(v) else str(v)      # "nan"/"inf": strict JSON
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, np.ndarray):
    return v.tolist()
  return v


class MetricWriter:
  """Appends records to ``<workdir>/metrics.jsonl`` and writes TensorBoard events to
  ``<workdir>/tensorboard``."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = distributed.is_primary()
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def truncate_after(self, step: int) -> int:
    """Drops records past `step` (written by a run that died before checkpointing them);
    returns how many were dropped."""
    if not self.active or not os.path.exists(self.path):
      return 0
    keep, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:      # a line cut short by a kill
          dropped += 1
          continue
        if rec.get("step", 0) > step:
          dropped += 1
        else:
          keep.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)
    return dropped

  def write(self, step: int, record: Mapping[str, Any], *, prefix: str = "") -> None:
    if not self.active:
      return
    rec = {"step": int(step)}
    rec.update({f"{prefix}{k}": _jsonable(v) for k, v in record.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{prefix}{k}", float(v), int(step))
        elif k.endswith("class_hist"):
          self._tb.add_histogram(f"{prefix}{k}", np.repeat(np.arange(len(v)), v), int(step))

  def image(self, tag: str, grid_png_path: str, step: int) -> None:
    """Adds a PNG written by save_image_grid to TensorBoard."""
    if self._tb is None:
      return
    from PIL import Image
    img = np.asarray(Image.open(grid_png_path).convert("RGB"))
    self._tb.add_image(tag, img, int(step), dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


# The folders whose INFO records are the project's own one-line events (resumed from step N,
# eval at step N: ..., loaded step N); everything else at INFO is a library's chatter.
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                  + os.sep for d in ("rin", "bench"))


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and above from anyone, INFO and below only from rin/ and bench/."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or \
        os.path.abspath(record.pathname).startswith(_OWN_DIRS)


def quiet_library_logs() -> bool:
  """For the command lines, after absl parsed the flags: unless --verbosity was given, drop
  the INFO records of absl, orbax and the other libraries (orbax alone writes a hundred
  lines per run around the progress bar); warnings, errors and rin's own events stay.
  `--verbosity=0` brings everything at INFO back. Returns whether the filter is on."""
  from absl import flags
  from absl import logging as absl_logging
  if flags.FLAGS["verbosity"].present:
    return False
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  return True
