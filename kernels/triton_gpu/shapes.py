"""The published RIN op shapes (DESIGN.md section 2) the GPU tools run: one entry per
kernel-backed op class (attention core, read block, write block) of the CIFAR-10 and
ImageNet-64 configs. `b` is a placeholder: the tools set the batch."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  op: str            # "attention" | "read" | "write"
  b: int
  lq: int            # attention: q length; blocks: query-side tokens
  lk: int
  cq: int = 0        # blocks: query-side width
  ckv: int = 0
  width: int = 0     # attention width (heads * head_dim)
  heads: int = 0
  head_dim: int = 0  # attention op only
  mlp: int = 0       # write block MLP hidden width (0: none)


PUBLISHED = (
    Shape("cifar10/read", "read", 1, 128, 256, cq=512, ckv=256, width=256, heads=8),
    Shape("cifar10/write", "write", 1, 256, 128, cq=256, ckv=512, width=256, heads=8, mlp=512),
    Shape("cifar10/latent_self_attn", "attention", 1, 128, 128, heads=16, head_dim=32),
    Shape("imagenet64_p4/read", "read", 1, 128, 256, cq=768, ckv=512, width=512, heads=16),
    Shape("imagenet64_p4/write", "write", 1, 256, 128, cq=512, ckv=768, width=512, heads=16,
          mlp=2048),
    Shape("imagenet64_p8/read", "read", 1, 128, 64, cq=768, ckv=512, width=512, heads=16),
    Shape("imagenet64_p8/write", "write", 1, 64, 128, cq=512, ckv=768, width=512, heads=16,
          mlp=2048),
    Shape("imagenet64/latent_self_attn", "attention", 1, 128, 128, heads=16, head_dim=48),
)


def abstract_args(s: Shape, dtype, param_dtype=jnp.float32) -> tuple:
  """Abstract operands of shape `s` (params in param_dtype, as the model keeps them)."""
  from kernels.params import ReadBlockParams, WriteBlockParams
  sds = jax.ShapeDtypeStruct
  if s.op == "attention":
    return (sds((s.b, s.lq, s.heads, s.head_dim), dtype),
            sds((s.b, s.lk, s.heads, s.head_dim), dtype),
            sds((s.b, s.lk, s.heads, s.head_dim), dtype))
  a, cq, ckv = s.width, s.cq, s.ckv
  p = dict(ln_scale=(cq,), ln_bias=(cq,), wq=(cq, a), bq=(a,), wk=(ckv, a), bk=(a,),
           wv=(ckv, a), bv=(a,), wo=(a, cq), bo=(cq,))
  if s.op == "write" and s.mlp:
    p.update(mlp_ln_scale=(cq,), mlp_ln_bias=(cq,), w1=(cq, s.mlp), b1=(s.mlp,),
             w2=(s.mlp, cq), b2=(cq,))
  cls = ReadBlockParams if s.op == "read" else WriteBlockParams
  params = cls(**{k: sds(v, param_dtype) for k, v in p.items()})
  return sds((s.b, s.lq, cq), dtype), sds((s.b, s.lk, ckv), dtype), params
