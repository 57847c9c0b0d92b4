"""GPU measurements that drive the Triton backend.

WINS: per op/shape class (kernels.api.shape_class: "op:dims[:h<heads>]:dtype"), the
fwd+bwd medians of implementation="triton" and "xla" from a GPU run of
`python -m bench.triton_gpu_check --write-wins` (bench/gpu_suite.sh runs it).
`implementation=None` on GPU uses Triton for a class only where triton_us < xla_us here.
While WINS is empty (no GPU measurement recorded), implementation=None means "xla"
everywhere on GPU (said once per class in the log); implementation="triton" always runs
the Triton kernels.

TABLE: tuned attention launch parameters per shape, regenerated on a GPU with
`python -m bench.triton_tune --write`. Keys "attn:{q_len}x{kv_len}x{head_dim}:{dtype}";
values override the heuristic defaults in config.py field by field. Empty: no GPU
measurement behind any entry yet.
"""

WINS: dict[str, dict] = {}

TABLE: dict[str, dict[str, int]] = {
}
