"""Helpers for tests that run real processes: free ports, env, hard timeouts."""
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(cache_dir=None, **extra) -> dict:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
           PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  e.pop("XLA_FLAGS", None)
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  e.pop("JAX_NUM_PROCESSES", None)
  e.pop("JAX_PROCESS_ID", None)
  if cache_dir:
    # The compiled step is cached on disk, so the 2nd..nth process skips compilation.
    e.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def start(args, log_path, **kw) -> subprocess.Popen:
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable] + list(args), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True, **kw)


def wait_all(procs, timeout: float) -> list:
  """Waits for every process; on timeout kills them all (their whole sessions) and raises."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    kill_all(procs)
    raise
  return [p.returncode for p in procs]


def kill_all(procs) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def tail(path, n=3000) -> str:
  try:
    with open(path) as f:
      return f.read()[-n:]
  except OSError:
    return ""
