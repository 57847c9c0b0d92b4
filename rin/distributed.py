"""Data parallelism, FSDP-style sharding and multi-host set-up for RIN training.

Everything here is JAX's own machinery:

* ``initialize``: ``jax.distributed.initialize`` for multi-host (or several processes on
  one machine), from flags or the usual environment (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a cluster JAX detects itself). On CPU it
  selects the gloo collectives, the route that does not hang on small machines (DESIGN.md 5).
* ``make_mesh``: a 1-D ``jax.sharding.Mesh`` named ``"data"`` over every device of every
  process.
* ``state_shardings``: ``NamedSharding``s for the train state: replicated (pure data
  parallelism; XLA inserts the gradient all-reduce in the jitted step), or with
  ``fsdp=True`` every parameter / EMA / optimiser-state leaf sharded along its largest
  dimension divisible by the number of devices (XLA all-gathers the weights for the
  forward pass and reduce-scatters the gradients).
* ``global_batch``: this host's shard of the batch -> one global ``jax.Array`` split over
  the ``"data"`` axis (``jax.make_array_from_process_local_data``).
* ``shard_map_apply``: runs a function (the model's apply, whose fused kernels are custom
  calls the SPMD partitioner cannot split) per device on its slice of the batch with
  ``jax.shard_map``; weights enter replicated. Gradients through it come back summed over
  devices (shard_map transposes a replicated input into a psum).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None) -> bool:
  """Starts jax.distributed when asked to (flags or environment); returns whether it did.

  With no arguments and no ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` in the
  environment this is a no-op (single process). Must run before any other JAX call.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator is None and num_processes is None:
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                     f"{num_processes})")
  if num_processes == 1 and coordinator is None:
    return False
  # On CPU the default collectives cannot cross processes; gloo can (and does not hang on
  # a 2-core machine, unlike forced host-platform devices in one process).
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms in ("", "cpu") or "cpu" in platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes) with axis ``"data"``."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape, n: int, min_size: int = 0) -> P:
  """Shards the largest dimension divisible by n (replicates small or indivisible leaves)."""
  if n <= 1 or len(shape) == 0 or int(np.prod(shape)) < max(min_size, n):
    return P()
  dims = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in dims:
    if shape[i] % n == 0:
      spec = [None] * len(shape)
      spec[i] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, *, fsdp: bool = False, min_size: int = 0):
  """NamedShardings for a TrainState (pytree of ShapeDtypeStruct).

  step and rng are always replicated; params, EMA params and optimiser state are
  replicated, or FSDP-sharded when ``fsdp``.
  """
  n = mesh.shape[DATA_AXIS]
  rep = replicated(mesh)

  def leaf(x):
    if not fsdp:
      return rep
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size))

  sharded = jax.tree.map(leaf, (abstract_state.params, abstract_state.ema_params,
                                abstract_state.opt_state))
  return abstract_state.replace(step=rep, rng=rep, params=sharded[0], ema_params=sharded[1],
                                opt_state=sharded[2])


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"config.train.batch_size={batch_size} (global) must be divisible by "
                     f"the number of devices ({n}: {jax.process_count()} process(es) x "
                     f"{jax.local_device_count()} local device(s))")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of the batch -> global arrays split over ``"data"``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def shard_map_apply(fn: Callable, mesh: Mesh, num_replicated: int, num_batched: int,
                    num_out: int) -> Callable:
  """fn(*replicated_args, *batched_args) -> outputs, each batched along axis 0.

  Runs ``fn`` once per device on that device's slice of the batched arguments
  (``None`` batched arguments are passed through). Replicated arguments may be pytrees.
  """
  if mesh.size == 1:
    return fn

  def wrapped(*args):
    rep, bat = args[:num_replicated], args[num_replicated:]
    assert len(bat) == num_batched, (len(bat), num_batched)
    none = [a is None for a in bat]
    live = [a for a in bat if a is not None]

    def inner(rep_args, live_args):
      it = iter(live_args)
      full = [None if isnone else next(it) for isnone in none]
      return fn(*rep_args, *full)

    out_specs = tuple(P(DATA_AXIS) for _ in range(num_out))
    if num_out == 1:
      out_specs = out_specs[0]
    return jax.shard_map(inner, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                         out_specs=out_specs, check_vma=False)(tuple(rep), tuple(live))

  return wrapped


# ---------------------------------------------------------------------------------------
# Host-level helpers.
# ---------------------------------------------------------------------------------------

def allgather_json(obj: Any) -> list:
  """Every process's JSON-serialisable ``obj``, in process order (works on gloo)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  lengths = np.asarray(lengths).reshape(-1)
  buf = np.zeros((int(lengths.max()),), np.uint8)
  buf[:raw.size] = raw
  allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [json.loads(bytes(allb[i, :lengths[i]]).decode()) for i in range(len(lengths))]


def any_process(flag: bool) -> bool:
  """True when ``flag`` is true on any process (a collective: call on all of them)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.asarray(flags).any())


def to_host(x) -> np.ndarray:
  """A (replicated or sharded) global array -> numpy on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_all_finite(tree) -> bool:
  """Whether every floating leaf of a (possibly sharded) pytree is finite; one jitted
  reduction (a collective when the leaves span processes)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return True
  out = jax.jit(lambda ls: jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in ls])))(leaves)
  return bool(to_host(out))


def tree_abs_sum(tree) -> float:
  """sum(|x|) over all leaves, in float32 on device (a checksum for tests)."""
  out = jax.jit(lambda ls: sum(jnp.sum(jnp.abs(l.astype(jnp.float32))) for l in ls))(
      jax.tree.leaves(tree))
  return float(to_host(out))


def is_primary() -> bool:
  return jax.process_index() == 0


def exit_process(code: int = 0) -> None:
  """Leaves a multi-process run without tripping the other processes, then ``os._exit``.

  Process 0 hosts the coordination service; if it exits while another process still polls
  that service, the other process aborts ("JAX distributed service detected fatal errors",
  SIGABRT) even though its work is done. ``jax.distributed.shutdown()`` is a barrier over
  all processes that disconnects them before the service stops (checked on this machine:
  a process 2 s late to the exit aborted every time with only ``sync_global_devices``, and
  never with the shutdown). Interpreter teardown of a gloo-connected process was seen
  spinning for minutes, so the process then leaves with ``os._exit``. Call on every process.
  """
  import sys
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


__all__ = ["initialize", "make_mesh", "replicated", "batch_sharding", "state_shardings",
           "fsdp_spec", "global_batch", "shard_map_apply", "allgather_json", "any_process",
           "to_host", "is_primary", "exit_process", "check_batch_divisible", "DATA_AXIS", "jnp"]
