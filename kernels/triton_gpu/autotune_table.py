"""GPU measurements that drive the Triton backend.

WINS: per op/shape class (kernels.api.shape_class: "op:dims[:h<heads>]:dtype"), the
fwd+bwd medians of implementation="triton" and "xla" from a GPU run of
`python -m kernels.triton_gpu.gpu_check --write-wins` (bench/gpu_suite.sh runs it).
`implementation=None` on GPU uses Triton for a class only where triton_us < xla_us here.
No GPU has been available to this project's sessions so far, so WINS is empty and
implementation=None means "xla" everywhere on GPU (said once per class in the log);
implementation="triton" always runs the Triton kernels.

TABLE: tuned attention launch parameters per shape, regenerated on a GPU with
`python -m kernels.triton_gpu.tune --write`. Keys "attn:{q_len}x{kv_len}x{head_dim}:{dtype}";
values override the heuristic defaults in config.py field by field. Empty: no GPU
measurement behind any entry yet.
"""

WINS: dict[str, dict] = {}

TABLE: dict[str, dict[str, int]] = {
}
