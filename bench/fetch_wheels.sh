#!/usr/bin/env bash
# Fills the repo's ignored .whl/ folder with the wheels the lent H200 lacks, for
# bench/gpu_suite.sh (which installs them with --no-index --no-deps).
#
#   bash bench/fetch_wheels.sh [--dry-run]
#
# Target: Python 3.12, manylinux x86_64, the H200 image (jax 0.11.2 + CUDA 13, triton 3.6.0,
# torch 2.11, flax, optax, orbax). Packages the image already has are NOT downloaded
# (no dependency resolution: each pin below is fetched with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PIP=${PIP:-.venv/bin/pip}
# name==version  (versions chosen for the H200 image; see DESIGN.md section 5)
WHEELS=(
  "jax-triton==0.3.1"          # 0.3.1 works with triton 3.6 (0.4.x wants triton >= 3.7)
  "tokamax==0.0.17"
  "einshape==1.0" "jaxtyping==0.3.11" "wadler-lindig==0.1.8" "qwix==0.1.8"
  "immutabledict==4.3.1" "pydantic==2.14.4" "pydantic-core==2.50.5"
  "annotated-types==0.8.0" "typing-inspection==0.4.5" "tensorboardx"
  "rin-pytorch==0.8.0"
  "torchvision==0.26.0"        # matches torch 2.11
  "accelerate==1.15.0" "ema-pytorch==0.8.3" "einops==0.8.2" "beartype==0.23.1"
  "safetensors==0.8.0" "huggingface-hub==2.4.0"
)
# `import tokamax` imports xprof (its profiler timing); set WITH_XPROF=0 to leave it out
# (then the suite reports tokamax as not importable).
if [[ "${WITH_XPROF:-1}" == 1 ]]; then WHEELS+=("xprof==2.24.2"); fi
CMD=("$PIP" download --dest "$DEST" --no-deps --only-binary=:all: --python-version 3.12
     --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64
     --platform any
     --implementation cp --abi cp312 --abi abi3 --abi none "${WHEELS[@]}")
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
mkdir -p "$DEST"
"${CMD[@]}"
ls -la "$DEST"
du -sh "$DEST"
