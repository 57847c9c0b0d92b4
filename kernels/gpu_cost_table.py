"""Estimated per-op-class times on GPU: the evidence implementation=None follows on GPU
until a GPU measurement (kernels/triton_gpu/autotune_table.py WINS) exists for a class.

WINS: per op/shape class (kernels.api.shape_class key), the train-step time of the class's
op group for each implementation (`xla_us`, `cudnn_us`, `triton_us`), from `python -m
bench.gpu_static --write-wins h100`: a roofline ESTIMATE over the kernels XLA:GPU compiles
deviceless for an H100 target (per kernel max(dot FLOPs / 790 TFLOP/s, bytes / HBM
bandwidth) + 2 us launch; no autotuning), not a measurement. kernels.api picks the fastest.
"""

WINS: dict[str, dict] = {
    'latent_attn:128x512x512:h16:bfloat16': {
        'cudnn_us': 7556.8,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, cifar10 train, batch 256, op group latent_attn)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 7561.0,
        'xla_us': 12549.3,
    },
    'latent_attn:128x768x768:h16:bfloat16': {
        'cudnn_us': 18500.3,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, imagenet64_p4 train, batch 128, op group latent_attn)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 18505.9,
        'xla_us': 25916.5,
    },
    'read:128x512x256x256x256:h8:bfloat16': {
        'cudnn_us': 3891.4,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, cifar10 train, batch 256, op group read)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 3365.2,
        'xla_us': 6255.0,
    },
    'read:128x768x256x512x512:h16:bfloat16': {
        'cudnn_us': 4906.3,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, imagenet64_p4 train, batch 128, op group read)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 4204.9,
        'xla_us': 8057.7,
    },
    'write:256x256x128x512x256x512:h8:bfloat16': {
        'cudnn_us': 6550.9,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, cifar10 train, batch 256, op group write)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 5154.7,
        'xla_us': 8796.8,
    },
    'write:256x512x128x768x512x2048:h16:bfloat16': {
        'cudnn_us': 11790.0,
        'device': 'h100 (ESTIMATE: bench.gpu_static roofline over the deviceless XLA:GPU compile, imagenet64_p4 train, batch 128, op group write)',
        'source': 'bench/results/gpu_static/h100_h200.json',
        'triton_us': 9931.5,
        'xla_us': 14845.1,
    },
}
