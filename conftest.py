"""Repository-root conftest: makes kernels/rin/bench importable and shares compiled
programs between tests through JAX's persistent compilation cache (many tests build the
same tiny model; recompiling it each time dominated the run)."""
import os
import tempfile

from rin import xla_cpu

xla_cpu.enable_onednn_dots()   # test what the CLIs run (rin/xla_cpu.py); before any jax work

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RIN_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rin_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
