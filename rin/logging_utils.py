"""Metric logging: JSONL (one record per line) + TensorBoard event files (tensorboardX).

Only the primary process writes; on the others every method is a no-op.
"""
from __future__ import annotations

import json
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

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
