"""Checkpoints: atomic orbax saves, fallback past corrupt ones, config checks.

Layout: ``<workdir>/checkpoints/<step>/{state,data}`` (orbax ``CheckpointManager``).
Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp...`` and renames it to
``<step>`` only after every file (and every process) is done; a directory with the tmp
suffix is never listed as a step, and stale ones are removed when a manager starts. So a
process killed mid-save leaves the previous checkpoints intact.

``restore_latest`` tries the newest step first; when it cannot be read (deleted or
truncated files, a half-copied directory, non-finite weights), it logs which step and why,
moves that directory aside to ``<workdir>/checkpoints_corrupt/`` (nothing is deleted) and
tries the previous one.

The ``data`` item holds every process's data-iterator state (gathered to the primary
process before saving), so each host resumes its own shard at the same position.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

from rin import distributed
from rin.configs import base as base_config


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored."""


def _encode_iter_state(s) -> dict:
  if isinstance(s, (bytes, bytearray)):
    return {"bytes_b64": base64.b64encode(bytes(s)).decode()}
  return {"json": s}


def _decode_iter_state(d: dict):
  return base64.b64decode(d["bytes_b64"]) if "bytes_b64" in d else d["json"]


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_manager(workdir: str, config: ConfigDict) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                      create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


def save_checkpoint(mngr, state, iterator) -> None:
  """Saves `state` and every process's iterator state at step `state.step` (blocking).

  A collective in multi-process runs: call it on every process.
  """
  step = int(distributed.to_host(state.step))
  states = distributed.allgather_json(_encode_iter_state(iterator.get_state()))
  data = {"processes": states} if len(states) > 1 else states[0]
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data)), force=True)
  mngr.wait_until_finished()


def _this_process_iter_state(data: dict):
  if "processes" in data:
    states = data["processes"]
    if len(states) != jax.process_count():
      raise ValueError(f"the checkpoint holds data-iterator states of {len(states)} processes "
                       f"but this run has {jax.process_count()}; resume with the same number "
                       "of processes")
    return _decode_iter_state(states[jax.process_index()])
  if jax.process_count() > 1:
    raise ValueError("the checkpoint was written by a single-process run but this run has "
                     f"{jax.process_count()} processes; resume with one process")
  return _decode_iter_state(data)


def restore_checkpoint(mngr, abstract_state, step: int | None = None):
  """(state, this process's data-iterator state) of `step` (default latest)."""
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out.state, _this_process_iter_state(out.data)


def _check_finite(state, step: int) -> None:
  if not distributed.tree_all_finite((state.params, state.ema_params)):
    raise ValueError(f"the weights of step {step} hold NaN/Inf")


def restore_latest(mngr, abstract_state, workdir: str):
  """Restores the newest readable checkpoint; (state, iter_state, step) or None if none.

  Unreadable steps are reported (logging.error), moved to ``checkpoints_corrupt/`` by the
  primary process, and skipped.
  Raises CheckpointError when steps exist but none can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      state, iter_state = restore_checkpoint(mngr, abstract_state, step)
      if int(distributed.to_host(state.step)) != step:
        raise ValueError(f"its state says step {int(distributed.to_host(state.step))}")
      _check_finite(state, step)
    except Exception as e:  # noqa: BLE001 -- any read failure means: try the previous one
      msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
      path = os.path.join(checkpoint_dir(workdir), str(step))
      failures.append((step, msg))
      logging.error("checkpoint at step %d (%s) is corrupt or incomplete and is skipped: %s",
                    step, path, msg)
      _quarantine(workdir, step)
      mngr.reload()          # forget the moved step (or saving it again would be refused)
      continue
    if failures:
      logging.warning("resuming from step %d instead of %s (corrupt checkpoints moved to %s)",
                      step, ", ".join(str(s) for s, _ in failures),
                      os.path.join(workdir, "checkpoints_corrupt"))
    return state, iter_state, step
  detail = "; ".join(f"step {s}: {m}" for s, m in failures)
  raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)} ({detail}); the "
                        f"unreadable ones were moved to "
                        f"{os.path.join(workdir, 'checkpoints_corrupt')}")


def _quarantine(workdir: str, step: int) -> None:
  distributed_barrier = jax.process_count() > 1
  if distributed.is_primary():
    src = os.path.join(checkpoint_dir(workdir), str(step))
    dst_root = os.path.join(os.path.abspath(workdir), "checkpoints_corrupt")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    k = 1
    while os.path.exists(dst):
      dst = os.path.join(dst_root, f"{step}.{k}")
      k += 1
    if os.path.exists(src):
      shutil.move(src, dst)
  if distributed_barrier:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"rin_quarantine_{step}")


# ---------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


# Sections whose differences make a checkpoint unusable (parameter shapes / meaning).
_MUST_MATCH = ("model",)
# Model keys that only choose how parameters are initialised: a checkpoint loads whatever
# they say (the parameter tree is the same), so they may differ.
_INIT_ONLY = ("model.attention_init",)


def config_differences(saved: dict, config: ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, new value)} for every key that differs. `saved` may come
  from an older version that lacked some keys (or a newer one with more): a key missing on
  one side reads "<absent>", hence the .get."""
  a, b = _flatten(saved), _flatten(json.loads(config.to_json()))
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if a.get(k, "<absent>") != b.get(k, "<absent>")}


def check_config_matches(workdir: str, config: ConfigDict, *, write: bool = True) -> None:
  """Refuses a workdir trained with another model config, naming the keys that differ.

  Writes ``config.json`` on first use (primary process; only when `write`). Differences
  outside ``config.model`` (e.g. num_steps, learning rate) are allowed and logged.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      # Keys the saved config predates read at their defaults (rin.configs.base.complete):
      # a field added later at a default that keeps the old model does not refuse the workdir.
      saved = base_config.complete(json.load(f)).to_dict()
    diff = config_differences(saved, config)
    fatal = {k: v for k, v in diff.items()
             if k.split(".")[0] in _MUST_MATCH and k not in _INIT_ONLY}
    if fatal:
      detail = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in fatal.items())
      raise ValueError(
          f"workdir {workdir!r} holds checkpoints of a different model config ({path}): "
          f"{detail}. Use a fresh --workdir or the original config")
    if diff:
      logging.warning("config differs from the one this workdir was started with: %s",
                      "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
  elif write and distributed.is_primary():
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)
