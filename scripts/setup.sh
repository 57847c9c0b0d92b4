#!/usr/bin/env bash
# Creates .venv (Python >= 3.12) and installs the project with its test extras,
# pinned by constraints.txt so a new jax release cannot silently change main.
#   PYTHON=/path/to/python3.12 bash scripts/setup.sh     # choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in /root/.pyenv/versions/3.12.1/bin/python3.12 python3.13 python3.12 python3; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup.sh: need Python >= 3.12 (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# jax's CUDA plugin (XLA's GPU compiler) for the deviceless GPU compile rung, in a folder of
# its own: bench.gpu_static puts it on PYTHONPATH of its compile processes only (in
# site-packages every CPU-only jax process would print the plugin's cuInit failure). Its
# CUDA libraries are torch's nvidia-* wheels above. ~140 MB download, ~400 MB on disk.
[ -d .venv/xla_gpu_plugin/jax_plugins/xla_cuda13 ] || .venv/bin/python -m pip install -q \
  --no-deps -c constraints.txt --target .venv/xla_gpu_plugin jax-cuda13-plugin jax-cuda13-pjrt
# libtpu (XLA:TPU + Mosaic) for the deviceless TPU compile rung, likewise in its own folder
# (bench.tpu_static's and the tests' compile processes): installed, every jax process printed
# libtpu's host warnings. ~137 MB download, ~484 MB on disk.
[ -d .venv/libtpu_site/libtpu ] || .venv/bin/python -m pip install -q --no-deps \
  -c constraints.txt --target .venv/libtpu_site libtpu
echo "setup.sh: .venv ready ($(.venv/bin/python --version))"
