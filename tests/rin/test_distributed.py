"""Data parallelism across processes, FSDP sharding, mixed precision.

Why processes and not --xla_force_host_platform_device_count: on this 2-core machine a
jitted step with a cross-device all-reduce between forced host devices of ONE process can
hang (XLA's CPU thread pool is sized from the visible cores and the collective waits on
devices that never get a thread). Separate processes each own one CPU device and meet in
gloo collectives over TCP (jax.distributed + jax_cpu_collectives_implementation="gloo"),
which is also the real multi-host code path. Every process has a hard timeout and is
killed (with its whole session) if it overruns, so the test cannot hang CI.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rin import distributed
from rin import train_state, train_step
from tests.rin import subproc
from tests.rin.tiny import tiny_config

TIMEOUT = 420


def _run_workers(tmp_path, modes="dp", nproc=2):
  port = subproc.free_port()
  procs, logs, outs = [], [], []
  for i in range(nproc):
    out = tmp_path / f"out{i}.json"
    log = tmp_path / f"worker{i}.log"
    procs.append(subproc.start(["-m", "tests.rin.dp_worker", str(i), str(nproc), str(port),
                                str(out), modes], log, env=subproc.env()))
    logs.append(log)
    outs.append(out)
  try:
    rcs = subproc.wait_all(procs, TIMEOUT)
  except Exception:
    pytest.fail("workers timed out:\n" + "\n".join(subproc.tail(l) for l in logs))
  assert rcs == [0] * nproc, "\n".join(subproc.tail(l) for l in logs)
  return [json.loads(o.read_text()) for o in outs]


def _check(res, modes):
  for i, r in enumerate(res):
    assert r["process_index"] == i and r["process_count"] == 2 and r["device_count"] == 2
    for key in modes:
      # Same loss as the unsharded step on one device (up to all-reduce summation order),
      # for the first step and -- after an all-reduced update -- the second.
      np.testing.assert_allclose(r[f"{key}_losses"], r["ref_losses"], rtol=2e-5)
      np.testing.assert_allclose(r[f"{key}_grad_norm"], r["ref_grad_norm"], rtol=1e-4)
      np.testing.assert_allclose(r[f"{key}_checksum"], r["ref_checksum"], rtol=1e-5)
  # Both processes computed the same global loss.
  for key in modes:
    np.testing.assert_array_equal(res[0][f"{key}_losses"], res[1][f"{key}_losses"])


def test_data_parallel_two_processes_match_single_device_loss(tmp_path):
  res = _run_workers(tmp_path, "dp")
  _check(res, ["dp"])
  assert all(r["dp_sharded_leaves"] == 0 for r in res)


@pytest.mark.slow
def test_fsdp_two_processes_match_single_device_loss(tmp_path):
  res = _run_workers(tmp_path, "fsdp")
  _check(res, ["fsdp"])
  assert all(r["fsdp_sharded_leaves"] > 0 for r in res)     # FSDP really shards weights


@pytest.mark.slow
def test_cli_trains_and_resumes_with_two_processes(tmp_path):
  """`python -m rin.train --num_processes 2` end to end: per-host data shards, checkpoint
  with both hosts' iterator states, resume on two processes."""
  cache = tmp_path / "jax_cache"
  work = tmp_path / "work"

  def launch(stop_at, tag):
    port = subproc.free_port()
    procs, logs = [], []
    for i in range(2):
      log = tmp_path / f"{tag}{i}.log"
      logs.append(log)
      procs.append(subproc.start(
          ["-m", "rin.train", "--config", "tests/rin/tiny_cli_config.py", "--workdir",
           str(work), "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
           "--process_id", str(i), f"--stop_at_step={stop_at}", "--noprogress",
           "--config.train.checkpoint_every=2"], log, env=subproc.env(cache)))
    try:
      rcs = subproc.wait_all(procs, TIMEOUT)
    except Exception:
      pytest.fail("timed out:\n" + "\n".join(subproc.tail(l) for l in logs))
    assert rcs == [0, 0], "\n".join(subproc.tail(l) for l in logs)
    return logs

  launch(2, "a")
  ckpt = work / "checkpoints"
  assert (ckpt / "2").is_dir()
  logs = launch(4, "b")
  assert "resumed from step 2" in subproc.tail(logs[0], 100000)
  assert (ckpt / "4").is_dir()
  recs = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]


def test_fsdp_spec_shards_largest_divisible_dim():
  assert distributed.fsdp_spec((64, 128), 4) == jax.sharding.PartitionSpec(None, "data")
  assert distributed.fsdp_spec((6, 3), 4) == jax.sharding.PartitionSpec()
  assert distributed.fsdp_spec((8,), 1) == jax.sharding.PartitionSpec()
  assert distributed.fsdp_spec((4096,), 2, min_size=10_000) == jax.sharding.PartitionSpec()


def test_batch_not_divisible_by_devices_is_a_clear_error():
  import types
  fake_mesh = types.SimpleNamespace(shape={"data": 4})
  with pytest.raises(ValueError, match="batch_size=30 .* divisible by the number of devices"):
    distributed.check_batch_divisible(30, fake_mesh)
  distributed.check_batch_divisible(32, fake_mesh)


def _dot_operand_dtypes(jaxpr):
  """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.invars[0].aval.dtype)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        name = type(sub).__name__
        if name == "ClosedJaxpr":
          out += _dot_operand_dtypes(sub.jaxpr)
        elif name == "Jaxpr":
          out += _dot_operand_dtypes(sub)
  return out


def test_bfloat16_computes_in_bf16_with_fp32_params_and_loss():
  cfg = tiny_config()
  cfg.train.dtype = "bfloat16"
  model = train_state.create_model(cfg)
  state = train_state.init_state(cfg, model, jax.random.PRNGKey(0))
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1), minval=-1),
           "label": jnp.arange(16, dtype=jnp.int32) % 10}
  step = train_step.make_train_step(model, cfg)
  closed = jax.make_jaxpr(step)(state, batch)
  # "Computes in bf16" = the matmul operands are bf16 (accumulation may be fp32, as on MXUs).
  operand_dtypes = _dot_operand_dtypes(closed.jaxpr)
  bf16 = [d for d in operand_dtypes if d == jnp.bfloat16]
  assert len(bf16) >= 0.8 * len(operand_dtypes), (len(bf16), len(operand_dtypes))
  new, m = jax.jit(step)(state, batch)
  assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
  for tree in (new.params, new.ema_params, new.opt_state):
    for x in jax.tree.leaves(tree):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert x.dtype == jnp.float32
  # Close to the float32 loss on the same batch and randomness.
  cfg32 = tiny_config()
  m32 = train_state.create_model(cfg32)
  loss32 = train_step.loss_and_metrics(state.params, m32, cfg32, batch, jax.random.PRNGKey(5))
  loss16 = train_step.loss_and_metrics(state.params, model, cfg, batch, jax.random.PRNGKey(5))
  assert loss16.dtype == jnp.float32
  assert float(loss16) == pytest.approx(float(loss32), rel=5e-2)
  assert float(loss16) != float(loss32)
