"""Parameter containers of the fused blocks (pytrees, so they pass through jit/grad).

Shapes, with A the attention width (= heads * head_dim) and F the MLP width:

  ReadBlockParams   (queries: latents of width D, keys/values: interface of width T)
    ln_scale, ln_bias [D]; wq [D, A]; bq [A]; wk, wv [T, A]; bk, bv [A]; wo [A, D]; bo [D]
  WriteBlockParams  (queries: interface of width T, keys/values: latents of width D)
    ln_scale, ln_bias [T]; wq [T, A]; bq [A]; wk, wv [D, A]; bk, bv [A]; wo [A, T]; bo [T]
    mlp_ln_scale, mlp_ln_bias [T]; w1 [T, F]; b1 [F]; w2 [F, T]; b2 [T]   (all None: no MLP)
  LatentAttentionParams   (latent self-attention: queries, keys and values all from LN(z))
    ln_scale, ln_bias [D]; wq, wk, wv [D, A]; bq, bk, bv [A]; wo [A, D]; bo [D]
    (rin.layers.LatentSelfAttention holds them as ln/{scale,bias}, q|k|v|out/{kernel,bias})
  LatentMLPParams   (the latent tower's pre-norm MLP: z + MLP(LN(z)))
    ln_scale, ln_bias [D]; w1 [D, F]; b1 [F]; w2 [F, D]; b2 [D]
    (rin.layers.LatentMLP holds them as <name>_ln/{scale,bias}, <name>/Dense_0|Dense_1/
    {kernel,bias}, the tree nn.LayerNorm + rin.layers.MLP made)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class ReadBlockParams(NamedTuple):
  ln_scale: jax.Array
  ln_bias: jax.Array
  wq: jax.Array
  bq: jax.Array
  wk: jax.Array
  bk: jax.Array
  wv: jax.Array
  bv: jax.Array
  wo: jax.Array
  bo: jax.Array


class WriteBlockParams(NamedTuple):
  ln_scale: jax.Array
  ln_bias: jax.Array
  wq: jax.Array
  bq: jax.Array
  wk: jax.Array
  bk: jax.Array
  wv: jax.Array
  bv: jax.Array
  wo: jax.Array
  bo: jax.Array
  mlp_ln_scale: Optional[jax.Array] = None
  mlp_ln_bias: Optional[jax.Array] = None
  w1: Optional[jax.Array] = None
  b1: Optional[jax.Array] = None
  w2: Optional[jax.Array] = None
  b2: Optional[jax.Array] = None

  @property
  def has_mlp(self) -> bool:
    return self.w1 is not None


class LatentAttentionParams(NamedTuple):
  ln_scale: jax.Array
  ln_bias: jax.Array
  wq: jax.Array
  bq: jax.Array
  wk: jax.Array
  bk: jax.Array
  wv: jax.Array
  bv: jax.Array
  wo: jax.Array
  bo: jax.Array


class LatentMLPParams(NamedTuple):
  ln_scale: jax.Array
  ln_bias: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array
