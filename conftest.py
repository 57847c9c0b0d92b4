"""Repository-root conftest: makes kernels/rin/bench importable and shares compiled
programs between tests through JAX's persistent compilation cache (many tests build the
same tiny model; recompiling it each time dominated the run).

Tests run XLA:CPU's default path. The CLIs' oneDNN dot setting (rin/xla_cpu.py) is tested
where it matters, in fresh processes (tests/rin/test_xla_cpu.py); RIN_TEST_ONEDNN=1 runs
the whole suite with it, as the CLIs run.
"""
import os
import tempfile

if os.environ.get("RIN_TEST_ONEDNN", "0").strip().lower() in ("1", "true", "yes", "on"):
  from rin import xla_cpu
  xla_cpu.enable_onednn_dots()   # before any jax work: XLA reads XLA_FLAGS once

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RIN_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rin_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
