"""Tuned launch parameters per shape. Regenerate on a GPU with

    python -m kernels.triton_gpu.tune --write

Keys: "attn:{q_len}x{kv_len}x{head_dim}:{dtype}" and "linear:{rows}x{k}x{n}:{dtype}"
(rows = batch * seq for a batch of 1; `config.py` looks rows up by bucket).
Values override the heuristic defaults in `config.py` field by field.
Entries without a GPU measurement behind them are not listed: as of this
commit no GPU has been available to tune on, so the table is empty and every
shape uses the heuristics (documented in config.py).
"""

TABLE: dict[str, dict[str, int]] = {
}
