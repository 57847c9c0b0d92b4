"""Command line of the training loop (rin.loop.train):

    python -m rin.train --config rin/configs/digits.py --workdir /tmp/rin

Trains, resuming from the newest readable checkpoint in --workdir. Multi-host:
--coordinator, --num_processes, --process_id (or JAX's environment) start `jax.distributed`;
each host reads its own shard of the data. Logs: warnings and the run's own events
(resumed, eval results) around the progress bar; --verbosity=0 adds the libraries' INFO
logs (absl, orbax). Exit codes: 0 when done or stopped by SIGTERM/SIGINT (checkpointed),
3 when a non-finite loss stopped the run (config.train.nonfinite="stop").

This module holds the flags and process setup only: XLA:CPU and malloc settings
(rin/xla_cpu.py) are process-wide, so they are applied here and never on import of the
library modules.
"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from rin import distributed
from rin import logging_utils
from rin import loop
from rin import xla_cpu


def main():
  """CLI entry point; flags are defined here so importing rin.train defines none."""
  config = config_flags.DEFINE_config_file("config", "rin/configs/digits.py",
                                           "Path to a config file (get_config()).")
  workdir = flags.DEFINE_string("workdir", "runs/digits", "Checkpoints, metrics, samples.")
  impl = flags.DEFINE_string("implementation", None,
                             "Kernel implementation: xla, pallas_tpu, triton (default: "
                             "config.train.implementation, else the platform default).")
  interpret = flags.DEFINE_bool("interpret", False, "Run kernels in their interpreter (CPU).")
  coordinator = flags.DEFINE_string(
      "coordinator", None, "Multi-host: address host:port of process 0 (or "
      "JAX_COORDINATOR_ADDRESS); starts jax.distributed.")
  num_processes = flags.DEFINE_integer("num_processes", None,
                                       "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
  process_id = flags.DEFINE_integer("process_id", None,
                                    "Multi-host: this process's index (or JAX_PROCESS_ID).")
  stop_at = flags.DEFINE_integer("stop_at_step", None,
                                 "Checkpoint and exit once this global step is reached "
                                 "(the schedule still follows config.train.num_steps).")
  progress = flags.DEFINE_bool("progress", True, "Show the progress bar.")

  def run(argv):
    del argv
    # Before the first computation starts the backend: oneDNN dots (bf16: every dot) and
    # malloc settings that keep XLA's per-step temporaries mapped (rin/xla_cpu.py).
    xla_cpu.configure(config.value.train.dtype)
    logging_utils.quiet_library_logs()
    distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    if jax.process_count() > 1:
      logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                   jax.process_count(), jax.local_device_count(), jax.device_count())
    try:
      loop.train(config.value, workdir.value, implementation=impl.value,
                 interpret=interpret.value, stop_at_step=stop_at.value, progress=progress.value)
    except FloatingPointError as e:
      logging.error("%s", e)
      print(f"rin.train: {e}", flush=True)
      raise SystemExit(3)
    if jax.process_count() > 1:
      distributed.exit_process(0)     # everything is saved (the checkpoint save is a barrier)

  app.run(run)


if __name__ == "__main__":
  main()
