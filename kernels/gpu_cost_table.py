"""Estimated per-op-class times on GPU: the evidence implementation=None follows on GPU
until a GPU measurement (kernels/triton_gpu/autotune_table.py WINS) exists for a class.

WINS: per op/shape class (kernels.api.shape_class key), the train-step time of the class's
op group for each implementation (`xla_us`, `cudnn_us`, `triton_us`), from `python -m
bench.gpu_static --write-wins h100`: a roofline ESTIMATE over the kernels XLA:GPU compiles
deviceless for an H100 target (per kernel max(dot FLOPs / 790 TFLOP/s, bytes / HBM
bandwidth) + 2 us launch; no autotuning), not a measurement. kernels.api picks the fastest.
"""

WINS: dict[str, dict] = {
}
