"""The precision policy of every op and backend, in one place.

Operands, accumulators, parameters:
  * Every dot takes its operands in the compute dtype: bf16/fp16 inputs are bf16/fp16
    operands (tensor cores / MXU at full rate); fp32 inputs are fp32 operands.
  * Every dot accumulates in fp32 (fp64 for fp64 inputs); softmax, LayerNorm statistics,
    GELU, biases and the residual stream of the blocks are fp32. A block's output is cast
    back to its input dtype once, at the end.
  * fp32 parameters are cast to the operand dtype once per call of a block (one XLA
    convert per weight per step), never per tile inside a kernel.

fp32 dots (`precision=`, on every public op):
  * None / "default": what XLA does with a plain fp32 model: TF32 tensor cores on GPU
    (Ampere and later), the MXU's default passes on TPU, exact fp32 on CPU. The Triton
    kernels use `tl.dot(..., input_precision="tf32")` for fp32 operands.
  * "highest": exact fp32 products (`Precision.HIGHEST` for XLA; IEEE fp32 FMA dots in
    Triton, which never use tensor cores: expect several times slower).
  bf16/fp16 operands are the same under both (their products are exact in fp32).

The test oracle (tests/kernels/op_cases.oracle) is the jax.numpy reference in float64 at
"highest"; the "xla" implementation that users and benchmarks get runs at "default".
"""
from __future__ import annotations

import jax

PRECISIONS = ("default", "highest")


def check(precision) -> str:
  """The canonical name of `precision` (None -> "default"); ValueError otherwise."""
  if precision is None:
    return "default"
  if isinstance(precision, jax.lax.Precision):
    precision = {jax.lax.Precision.DEFAULT: "default",
                 jax.lax.Precision.HIGHEST: "highest"}.get(precision, str(precision))
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r} must be None, 'default' or 'highest' "
                     f"(the TF32 default or exact fp32 dots)")
  return precision


def lax_precision(precision) -> jax.lax.Precision:
  """The jax.lax.Precision of an XLA dot under `precision`."""
  return (jax.lax.Precision.HIGHEST if check(precision) == "highest"
          else jax.lax.Precision.DEFAULT)


def triton_input_precision(precision) -> str:
  """tl.dot's input_precision under `precision` ("ieee" or "tf32"; ignored by Triton for
  bf16/fp16 operands)."""
  return "ieee" if check(precision) == "highest" else "tf32"
