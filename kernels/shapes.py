"""The kernel shapes of the published RIN configs: one table that tests, benchmarks and
tools all read (tokamax's `arg_specs` idea).

A `ModelShapes` row holds the widths of one model: interface tokens N of width T,
latents M of width D, the read/write attention (heads, width = min(T, D)), the interface
MLP ratio, the latent self-attention heads and the tower depth. Every row is derived from
a config file in rin/configs (tests/kernels/test_shapes.py checks that it still is), so a
config change that moves a kernel shape fails a test instead of leaving tools and tests
on stale shapes. Batch is not part of a row: each user picks its own (tests 1, tools
their --batch).

`op_shapes(row)` names the five kernel-backed ops of one model in one vocabulary:
latent_self_attention, read_attention, write_attention (kernels.cross_attention) and
read_block, write_block (kernels.read_block / write_block). `abstract_args` turns one
into jax.ShapeDtypeStruct operands.
"""
from __future__ import annotations

import dataclasses

import jax

from kernels.params import ReadBlockParams, WriteBlockParams


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  """The kernel shapes of one model: latents [B, M, D], interface [B, N, T]."""
  name: str
  config: str            # rin/configs module it comes from
  overrides: tuple       # (field, value) pairs set on that config's model (e.g. the patch)
  m: int                 # latents
  d: int                 # latent width
  n: int                 # interface tokens
  t: int                 # interface width
  rw_heads: int          # read/write attention heads
  rw_width: int          # read/write attention width (min(T, D) in RIN)
  mlp_ratio: float       # interface MLP ratio (hidden = ratio * T)
  latent_heads: int
  num_blocks: int
  latent_layers: int     # latent self-attention layers per block

  @property
  def rw_head_dim(self) -> int:
    return self.rw_width // self.rw_heads

  @property
  def latent_head_dim(self) -> int:
    return self.d // self.latent_heads

  @property
  def mlp_hidden(self) -> int:
    return int(round(self.mlp_ratio * self.t))


# The video rows: 16 frames at 64x64, 5 conditioning, 2x4x4 tubelets: (6 + 3) x 16 x 16 =
# 2304 interface tokens (each part padded to an even frame count). "_n4096" is the same
# model with 1x4x4 tubelets: (11 + 5) x 16 x 16 = 4096 tokens, the long-interface case.
CIFAR10 = ModelShapes("cifar10", "cifar10", (), 128, 512, 256, 256, 8, 256, 2.0, 16, 3, 2)
IMAGENET64_P4 = ModelShapes("imagenet64_p4", "imagenet64", (("patch_size", 4),),
                            128, 768, 256, 512, 16, 512, 4.0, 16, 4, 4)
IMAGENET64_P8 = ModelShapes("imagenet64_p8", "imagenet64", (), 128, 768, 64, 512, 16, 512,
                            4.0, 16, 4, 4)
KINETICS600 = ModelShapes("kinetics600", "kinetics600", (), 256, 1024, 2304, 512, 16, 512,
                          4.0, 16, 6, 4)
KINETICS600_N4096 = ModelShapes("kinetics600_n4096", "kinetics600", (("tubelet_frames", 1),),
                                256, 1024, 4096, 512, 16, 512, 4.0, 16, 6, 4)
MOVING_DIGITS = ModelShapes("moving_digits", "moving_digits", (), 32, 96, 144, 128, 4, 96, 2.0,
                            4, 2, 1)

# The paper's image configs: what the kernel tests and the TPU / GPU tools cover.
PUBLISHED = (CIFAR10, IMAGENET64_P4, IMAGENET64_P8)
ALL = PUBLISHED + (KINETICS600, KINETICS600_N4096, MOVING_DIGITS)
BY_NAME = {s.name: s for s in ALL}

ATTENTION_OPS = ("latent_self_attention", "read_attention", "write_attention")
BLOCK_OPS = ("read_block", "write_block")
OPS = ATTENTION_OPS + BLOCK_OPS


@dataclasses.dataclass(frozen=True)
class OpShape:
  """One kernel-backed op of a model. Attention: q [B, lq, heads, head_dim], k/v
  [B, lk, heads, head_dim]. Blocks: queries' source [B, lq, cq], keys' source
  [B, lk, ckv], attention width `width`, MLP hidden `mlp` (write block; 0: none)."""
  name: str              # "<model>/<op>"
  op: str                # one of OPS
  lq: int
  lk: int
  heads: int
  head_dim: int
  cq: int = 0
  ckv: int = 0
  width: int = 0
  mlp: int = 0

  @property
  def kind(self) -> str:
    """"attention", "read" or "write": which public op runs it."""
    return "attention" if self.op in ATTENTION_OPS else self.op.split("_")[0]


def op_shape(s: ModelShapes, op: str, *, m: int | None = None, n: int | None = None) -> OpShape:
  """The shape of `op` in model `s` (m, n: other latent / interface lengths, for sweeps)."""
  m = s.m if m is None else m
  n = s.n if n is None else n
  name = f"{s.name}/{op}"
  dh = s.rw_head_dim
  if op == "latent_self_attention":
    return OpShape(name, op, m, m, s.latent_heads, s.latent_head_dim)
  if op == "read_attention":
    return OpShape(name, op, m, n, s.rw_heads, dh)
  if op == "write_attention":
    return OpShape(name, op, n, m, s.rw_heads, dh)
  if op == "read_block":
    return OpShape(name, op, m, n, s.rw_heads, dh, cq=s.d, ckv=s.t, width=s.rw_width)
  if op == "write_block":
    return OpShape(name, op, n, m, s.rw_heads, dh, cq=s.t, ckv=s.d, width=s.rw_width,
                   mlp=s.mlp_hidden)
  raise ValueError(f"op must be one of {OPS}, got {op!r}")


def op_shapes(s: ModelShapes, ops=OPS) -> tuple[OpShape, ...]:
  return tuple(op_shape(s, op) for op in ops)


def distinct_ops(models=PUBLISHED, ops=OPS) -> tuple[OpShape, ...]:
  """The ops of `models`, each shape once (the ImageNet-64 rows share their latent
  self-attention): what a tool that times or tunes per shape runs."""
  seen, out = set(), []
  for s in models:
    for o in op_shapes(s, ops):
      key = dataclasses.replace(o, name="")
      if key not in seen:
        seen.add(key)
        out.append(o)
  return tuple(out)


# Odd shapes (lengths 1 and 7, a 1000-long key axis, head dims 72 and 200) that the TPU
# lowering test and bench.tpu_aot_check compile beside the published ones.
ODD = (
    OpShape("q7_k1000_d72", "read_attention", 7, 1000, 2, 72),
    OpShape("q1_k1_d200", "read_attention", 1, 1, 1, 200),
    OpShape("read_m7_n1000_d72", "read_block", 7, 1000, 2, 72, cq=48, ckv=32, width=144),
    OpShape("write_n1000_m7_d72", "write_block", 1000, 7, 2, 72, cq=32, ckv=48, width=144,
            mlp=64),
)


def param_shapes(cq: int, ckv: int, width: int, mlp: int = 0) -> dict[str, tuple]:
  """{field: shape} of a block's parameters (kernels/params.py): queries' width cq, keys'
  width ckv, attention width `width`, MLP hidden `mlp` (0: no MLP fields)."""
  p = dict(ln_scale=(cq,), ln_bias=(cq,), wq=(cq, width), bq=(width,), wk=(ckv, width),
           bk=(width,), wv=(ckv, width), bv=(width,), wo=(width, cq), bo=(cq,))
  if mlp:
    p.update(mlp_ln_scale=(cq,), mlp_ln_bias=(cq,), w1=(cq, mlp), b1=(mlp,), w2=(mlp, cq),
             b2=(cq,))
  return p


def abstract_args(o: OpShape, batch: int, dtype, param_dtype=None, *, sharding=None) -> tuple:
  """jax.ShapeDtypeStruct operands of `o` at `batch`: (q, k, v) or (q_src, kv_src, params).
  Params in param_dtype (None: dtype)."""
  sds = lambda shape, dt: jax.ShapeDtypeStruct(tuple(shape), dt, sharding=sharding)
  if o.kind == "attention":
    return (sds((batch, o.lq, o.heads, o.head_dim), dtype),
            sds((batch, o.lk, o.heads, o.head_dim), dtype),
            sds((batch, o.lk, o.heads, o.head_dim), dtype))
  pdt = dtype if param_dtype is None else param_dtype
  cls = ReadBlockParams if o.kind == "read" else WriteBlockParams
  shapes = param_shapes(o.cq, o.ckv, o.width, o.mlp if o.kind == "write" else 0)
  params = cls(**{k: sds(v, pdt) for k, v in shapes.items()})
  return sds((batch, o.lq, o.cq), dtype), sds((batch, o.lk, o.ckv), dtype), params
