"""One process of the data-parallel loss check (run by tests/rin/test_distributed.py).

    python -m tests.rin.dp_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON [MODES]

Joins a localhost jax.distributed cluster over gloo (DESIGN.md section 5: the route that
does not hang on a 2-core machine), builds the same fixed global batch on every process,
feeds each process its rows through jax.make_array_from_process_local_data, runs two
jitted data-parallel train steps (replicated, then FSDP-sharded state) and, on this
process's own device alone, the same two steps unsharded. Writes the losses, gradient
norms and parameter checksums to OUT_JSON.
"""
import json
import os
import sys

import jax

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
MODES = (sys.argv[5] if len(sys.argv) > 5 else "dp").split(",")
from rin import distributed  # noqa: E402

distributed.initialize(f"127.0.0.1:{port}", nproc, pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rin import data as data_lib  # noqa: E402
from rin import train_state, train_step  # noqa: E402
from tests.rin.tiny import tiny_config  # noqa: E402


import time  # noqa: E402

T0 = time.time()


def log(msg):
  print(f"[worker {pid} +{time.time() - T0:.0f}s] {msg}", flush=True)


def checksum(tree):
  return distributed.tree_abs_sum(tree)


def main():
  cfg = tiny_config()
  # Smaller than tiny (one block): compile time dominates on a shared 2-core machine.
  cfg.model.update(dropout=0.0, drop_path=0.0, num_blocks=1)
  b = cfg.train.batch_size
  ds = data_lib.load_dataset("digits", image_size=cfg.model.image_size)
  images = ds.images[:b].astype(np.float32) / 127.5 - 1.0
  labels = ds.labels[:b]
  per = b // jax.process_count()
  rows = slice(pid * per, (pid + 1) * per)
  model = train_state.create_model(cfg)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count()}

  # Unsharded reference on this process's own device.
  state = train_state.init_state(cfg, model, jax.random.PRNGKey(0))
  step = jax.jit(train_step.make_train_step(model, cfg))
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  ref = []
  for _ in range(2):
    state, m = step(state, batch)
    ref.append(float(m["loss"]))
  result["ref_losses"] = ref
  log(f"reference losses {ref}")
  result["ref_grad_norm"] = float(m["grad_norm"])
  result["ref_checksum"] = checksum(state.params)

  mesh = distributed.make_mesh()
  for fsdp in [m == "fsdp" for m in MODES]:
    cfg.train.fsdp = fsdp
    abstract, sh = train_state.abstract_train_state(cfg, model, mesh)
    state = jax.jit(lambda k: train_state.init_state(cfg, model, k), out_shardings=sh)(
        jax.random.PRNGKey(0))
    bsh = distributed.batch_sharding(mesh)
    step = jax.jit(train_step.make_train_step(model, cfg, mesh=mesh),
                   in_shardings=(sh, {"image": bsh, "label": bsh}),
                   out_shardings=(sh, distributed.replicated(mesh)))
    gb = distributed.global_batch({"image": images[rows], "label": labels[rows]}, mesh)
    assert gb["image"].shape == images.shape, gb["image"].shape
    losses = []
    for _ in range(2):
      state, m = step(state, gb)
      losses.append(float(m["loss"]))
    key = "fsdp" if fsdp else "dp"
    log(f"{key} losses {losses}")
    result[f"{key}_losses"] = losses
    result[f"{key}_grad_norm"] = float(m["grad_norm"])
    result[f"{key}_checksum"] = checksum(state.params)
    result[f"{key}_sharded_leaves"] = sum(
        1 for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated)
  with open(out, "w") as f:
    json.dump(result, f)
  print("worker", pid, "done", flush=True)


if __name__ == "__main__":
  main()
  distributed.exit_process(0)    # a shutdown barrier, so worker 0 cannot abort worker 1
