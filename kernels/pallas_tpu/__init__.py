"""Pallas TPU (Mosaic) implementation of the RIN kernels: `implementation="pallas_tpu"`.

  cross_attention  -> attention.py    (flash attention, read and write directions)
  read_block       -> read.py         (LN + q-proj, interface K/V projection fused
                                       with the attention, out-proj + residual)
  write_block      -> write.py        (LN, q-proj, attention, out-proj, residual,
                                       LN, MLP, residual per interface tile)
  latent_attention_block -> latent.py (LN, q/k/v projections, attention over all
                                       latents, out-projection [+ residual] per block
                                       of batch elements)

Every op has a jax.custom_vjp whose backward is also Pallas kernels. `interpret=True`
(or a `pltpu.InterpretParams`) runs the same kernels in Pallas' interpreter on CPU.
"""
from kernels.pallas_tpu.attention import AttentionBlockSizes, cross_attention
from kernels.pallas_tpu.common import VMEM_LIMIT_BYTES, BlockSizes
from kernels.pallas_tpu.latent import LatentBlockSizes, latent_attention_block
from kernels.pallas_tpu.read import ReadBlockSizes, read_block
from kernels.pallas_tpu.write import WriteBlockSizes, write_block


def latent_mlp_block(z, p, *, residual=False, branch_scale=None, dropout_rate=0.0,
                     dropout_seed=None, interpret=False, block_sizes=None):
  """Composed for now: XLA's GEMMs and fusions (kernels/reference.py)."""
  from kernels import reference
  return reference.latent_mlp_block(z, p, residual=residual, branch_scale=branch_scale,
                                    dropout_rate=dropout_rate, dropout_seed=dropout_seed)


__all__ = ["AttentionBlockSizes", "BlockSizes", "LatentBlockSizes", "ReadBlockSizes",
           "WriteBlockSizes", "VMEM_LIMIT_BYTES",
           "cross_attention", "latent_attention_block", "latent_mlp_block", "read_block",
           "write_block"]
