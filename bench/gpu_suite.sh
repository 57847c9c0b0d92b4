#!/usr/bin/env bash
# One-shot GPU suite for a freshly lent H200 (or any CUDA GPU), within 9 minutes:
#   0. record the machine (nvidia-smi, versions)
#   1. install the wheels carried in .whl/ (bench/fetch_wheels.sh) that the image lacks,
#      offline: pip install --no-index --find-links .whl --no-deps
#   2. kernel numerics on the GPU in bf16 (bench.triton_gpu_check: Triton ops vs the
#      float64 reference at the published shapes, B=64) and their fwd+bwd timings vs xla,
#      written into kernels/triton_gpu/autotune_table.py WINS (--write-wins: what
#      implementation=None then picks); the table is copied to the results folder
#   3. python -m bench.kernels   (published shapes, every implementation, bf16)
#   4. python -m bench.model     (CIFAR-10 B=256 bf16 train/sample steps), one run per
#      implementation (xla, cudnn, triton) side by side, each with XLA's autotune results
#      dumped (--xla_gpu_dump_autotune_results_to=$RES/autotune_<impl>.textproto): a later
#      deviceless `python -m bench.gpu_static --autotune-from <that file>` compiles with the
#      GEMM configs this GPU chose instead of the defaults
#   5. python -m bench.video_quality (moving digits, rin/configs/moving_digits.py, seeds 0,1,2,
#      and the conv_kernel_size=0 ablation at seed 0 in the same table: PSNR/SSIM vs copy-last and blank frames)
# Each stage has its own timeout; a stage that fails or times out does not stop the next.
# Everything goes under $OUT when set, else bench/results/<device>-<date>/.
#
#   bash bench/gpu_suite.sh [--dry-run]      # --dry-run: list what would run, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -z "${PY:-}" ]]; then
  PY=python3
  [[ -x .venv/bin/python ]] && PY=.venv/bin/python
fi
if [[ -n "${OUT:-}" ]]; then
  RES="$OUT"
else
  DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
  RES="bench/results/${DEV:-gpu}-$(date -u +%Y%m%d)"
fi
# Stage timeouts (seconds); stages 0-4 stay under 9 minutes, the video stage adds up to 7
# (T_VIDEO=0 skips it).
T_INSTALL=${T_INSTALL:-45}
T_NUMERICS=${T_NUMERICS:-100}
T_KERNELS=${T_KERNELS:-130}
T_MODEL=${T_MODEL:-75}        # per implementation
T_VIDEO=${T_VIDEO:-420}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so bench.model's peak memory is the model's

run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  if [[ $DRY == 1 ]]; then
    echo "[$name] timeout ${t}s: $*"
    return 0
  fi
  echo "=== [$name] (timeout ${t}s): $*" | tee -a "$RES/suite.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" > >(tee "$RES/$name.log") 2>&1
  local rc=$?
  echo "=== [$name] rc=$rc in $((SECONDS - t0))s" | tee -a "$RES/suite.log"
  return 0
}

INSTALL_PY='
import glob, importlib.metadata as md, re, sys
need = []
for w in sorted(glob.glob(".whl/*.whl")):
  dist = re.split(r"-\d", w.split("/")[-1], 1)[0].replace("_", "-").lower()
  try:
    md.version(dist)            # already in the image: keep the image version
  except md.PackageNotFoundError:
    need.append(w)
print(" ".join(need))
'

if [[ $DRY == 1 ]]; then
  echo "# bench/gpu_suite.sh --dry-run: results would go to $RES"
  echo "[env] nvidia-smi; $PY -c 'jax/triton/torch versions' > $RES/env.txt"
  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "[install] wheels in .whl/: $(ls .whl | tr '\n' ' ')"
  else
    echo "[install] .whl/ is empty here: run bash bench/fetch_wheels.sh first"
  fi
  echo "[install] timeout ${T_INSTALL}s: $PY -m pip install --no-index --find-links .whl --no-deps <wheels whose package the image lacks>"
else
  mkdir -p "$RES"
  : > "$RES/suite.log"
  { date -u; nvidia-smi; $PY -c 'import sys, jax; print(sys.version); print(jax.__version__, jax.devices())'; \
    $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|triton|jax-triton|torch|tokamax|rin-pytorch|flax|optax) "; } \
    > "$RES/env.txt" 2>&1
  WHEELS=$($PY -c "$INSTALL_PY")
  if [[ -n "$WHEELS" ]]; then
    run install "$T_INSTALL" $PY -m pip install --no-index --find-links .whl --no-deps $WHEELS
  else
    echo "=== [install] nothing to install (no .whl/ wheels missing from the image)" | tee -a "$RES/suite.log"
  fi
fi

run numerics "$T_NUMERICS" bash -c "$PY -m bench.triton_gpu_check --batch 64 --iters 10 \
  --dtypes bfloat16 --write-wins --out $RES/triton_gpu_check.md; \
  cp kernels/triton_gpu/autotune_table.py $RES/autotune_table.py"
run kernels "$T_KERNELS" $PY -m bench.kernels --quick --dtypes bf16 \
  --configs cifar10,imagenet64_p4 --out "$RES"
# bf16: the H200 targets are bf16; xla, cudnn and triton on the same model and batch, one
# process each so that each dumps the autotune results of its own compiles.
for IMPL in xla cudnn triton; do
  run "model_$IMPL" "$T_MODEL" env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dump_autotune_results_to=$RES/autotune_$IMPL.textproto" \
    $PY -m bench.model --config cifar10 --batch 256 --implementations "$IMPL" \
    --dtype bfloat16 --steps 10 --sample-steps 10 --out "$RES/model_$IMPL"
done

# Video prediction at the moving-digits config (issue 25): the 2-core CPU budget could not
# show it for three seeds; a few minutes of a GPU can. float32, as the CPU runs.
if [[ "$T_VIDEO" != 0 ]]; then
  run video "$T_VIDEO" $PY -m bench.video_quality --seeds 0,1,2 \
    --ablate model.conv_kernel_size=0 --ablate_seeds 0 --out "$RES/video_quality"
fi

if [[ $DRY == 1 ]]; then
  echo "# outputs: $RES/{env.txt,suite.log,*.log,triton_gpu_check.md,autotune_table.py,kernels.json,kernels.md,kernels_sweep_interface.png,model_{xla,cudnn,triton}/model_cifar10_b256.{json,md},autotune_{xla,cudnn,triton}.textproto,video_quality/}"
  echo "# then: copy $RES/autotune_table.py over kernels/triton_gpu/autotune_table.py and commit both;"
  echo "#       python -m bench.gpu_static --autotune-from $RES/autotune_xla.textproto --tag autotuned"
else
  echo "=== done; results in $RES" | tee -a "$RES/suite.log"
  ls -la "$RES"
fi
