"""Pallas TPU (Mosaic) implementation of the RIN kernels: `implementation="pallas_tpu"`.

  cross_attention  -> attention.py    (flash attention, read and write directions)
  read_block       -> read.py         (LN + q-proj, interface K/V projection fused
                                       with the attention, out-proj + residual)
  write_block      -> write.py        (LN, q-proj, attention, out-proj, residual,
                                       LN, MLP, residual per interface tile)

Every op has a jax.custom_vjp whose backward is also Pallas kernels. `interpret=True`
(or a `pltpu.InterpretParams`) runs the same kernels in Pallas' interpreter on CPU.
"""
from kernels.pallas_tpu.attention import AttentionBlockSizes, cross_attention
from kernels.pallas_tpu.common import VMEM_LIMIT_BYTES, BlockSizes
from kernels.pallas_tpu.read import ReadBlockSizes, read_block
from kernels.pallas_tpu.write import WriteBlockSizes, write_block



def latent_attention_block(z, p, *, num_heads, residual=False, interpret=False,
                           block_sizes=None):
  """Composed for now: LN and the q/k/v/out projections in XLA around the Pallas attention."""
  from kernels import reference
  attn = lambda q, k, v: cross_attention(q, k, v, interpret=interpret, block_sizes=block_sizes)
  return reference.latent_attention_block(z, p, num_heads=num_heads, residual=residual,
                                          attention=attn)


__all__ = ["AttentionBlockSizes", "BlockSizes", "ReadBlockSizes", "WriteBlockSizes", "VMEM_LIMIT_BYTES",
           "cross_attention", "latent_attention_block", "read_block", "write_block"]
