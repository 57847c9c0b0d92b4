"""TPU estimates that drive the pallas_tpu backend's default.

WINS: per op/shape class (kernels.api.shape_class: "op:dims[:h<heads>]:dtype"), the
estimated time per train step of that op as the model uses it (every call of the class,
forward and backward, kernels plus the XLA ops around them) with implementation=
"pallas_tpu" and with "xla", from the TPU compiler's own cost model: `python -m
bench.tpu_static ... --write-wins` (its per-op-group table; an ESTIMATE, no TPU
measured). `implementation=None` on TPU uses the Pallas kernels for a class only where
pallas_tpu_us < xla_us here, XLA otherwise (and for every class not here);
implementation="pallas_tpu" always runs the kernels. Same rule as the GPU's
kernels/triton_gpu/autotune_table.py WINS (kernels.api._measured_default).
"""

WINS: dict[str, dict] = {
    'attention:128x16x32x128x16x32:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, cifar10 train, batch 32, op group latent_attn)',
        'pallas_tpu_us': 6268.1,
        'source': 'bench/results/tpu_static/scopes_v5e.json',
        'xla_us': 3239.5,
    },
    'attention:128x16x48x128x16x48:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, imagenet64_p4 train, batch 32, op group latent_attn)',
        'pallas_tpu_us': 21081.8,
        'source': 'bench/results/tpu_static/imagenet64_v5e.json',
        'xla_us': 12316.9,
    },
    'latent_attn:128x512x512:h16:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, cifar10 train, batch 32, op group latent_attn)',
        'pallas_tpu_us': 2049.8,
        'source': 'bench/results/tpu_static/latent_v5e.json',
        'xla_us': 3179.5,
    },
    'read:128x512x256x256x256:h8:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, cifar10 train, batch 32, op group read)',
        'pallas_tpu_us': 2142.2,
        'source': 'bench/results/tpu_static/latent_v5e.json',
        'xla_us': 1813.7,
    },
    'read:128x768x256x512x512:h16:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, imagenet64_p4 train, batch 32, op group read)',
        'pallas_tpu_us': 5602.9,
        'source': 'bench/results/tpu_static/imagenet64_v5e.json',
        'xla_us': 4682.9,
    },
    'write:256x256x128x512x256x512:h8:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, cifar10 train, batch 32, op group write)',
        'pallas_tpu_us': 2106.7,
        'source': 'bench/results/tpu_static/latent_v5e.json',
        'xla_us': 2084.7,
    },
    'write:256x512x128x768x512x2048:h16:bfloat16': {
        'device': 'v5e (XLA:TPU cost model ESTIMATE, imagenet64_p4 train, batch 32, op group write)',
        'pallas_tpu_us': 8306.2,
        'source': 'bench/results/tpu_static/imagenet64_v5e.json',
        'xla_us': 7899.0,
    },
}
