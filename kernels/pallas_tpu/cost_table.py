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

WINS: dict[str, dict] = {}
