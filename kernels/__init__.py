"""Fused RIN kernels: cross-attention and the read/write blocks.

    import kernels
    o = kernels.cross_attention(q, k, v, implementation="xla")
    z = kernels.read_block(z, x, kernels.ReadBlockParams(...), num_heads=8)
    x = kernels.write_block(x, z, kernels.WriteBlockParams(...), num_heads=8)
    y = kernels.latent_attention_block(z, kernels.LatentAttentionParams(...), num_heads=16)
    z = kernels.latent_mlp_block(z, kernels.LatentMLPParams(...), residual=True)
"""
from kernels.api import (IMPLEMENTATIONS, available_implementations, cross_attention,
                         default_implementation, latent_attention_block, latent_mlp_block,
                         read_block,
                         resolve_implementation, write_block)
from kernels.params import (LatentAttentionParams, LatentMLPParams, ReadBlockParams,
                            WriteBlockParams)

__all__ = [
    "IMPLEMENTATIONS", "available_implementations", "cross_attention",
    "default_implementation", "latent_attention_block", "latent_mlp_block", "read_block", "resolve_implementation", "write_block",
    "LatentAttentionParams", "LatentMLPParams", "ReadBlockParams", "WriteBlockParams",
]
