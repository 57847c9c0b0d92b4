"""@triton.jit helpers shared by the fused block kernels.

Imported by name into the kernel modules; `launch.interpreted` interprets them over this
module's own globals, so they run the same way compiled and through the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
  """a @ b with fp32 accumulation; IEEE=True forces exact fp32 products (the fp32 path),
  otherwise tensor-core precision (tf32 for fp32 inputs, native for fp16/bf16)."""
  if IEEE:
    return tl.dot(a, b, input_precision="ieee")
  else:
    return tl.dot(a, b)
