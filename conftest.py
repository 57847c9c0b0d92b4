"""Repository-root conftest: makes kernels/rin/bench importable and shares compiled
programs between tests through JAX's persistent compilation cache (many tests build the
same tiny model; recompiling it each time dominated the run)."""
import os
import tempfile

import jax

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RIN_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rin_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
