"""Block sizes and launch parameters for the Triton kernels, with budget checks.

`BlockSizes` is what callers pass as `block_sizes=` (every field optional; None
means: the autotune table's entry for this shape, else the heuristic below).

Heuristics (H100/H200 have 132 SMs; we aim for >= 2 programs per SM):
  * attention query/key tiles of 64 (16..64 for tiny lengths), head dim padded to
    a power of two >= 16;
  * read direction (few queries, many keys): the key axis is split over
    `kv_splits` programs until q_blocks * batch * heads * splits >= 264;
    partial (o, lse) are merged by a combine kernel. The dQ backward is split the
    same way; dK/dV splits the query axis when keys are few (write direction).
  * the projections and MLPs of the blocks are XLA GEMMs (cuBLAS), not Triton
    (kernels/triton_gpu/blocks.py says why).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from kernels.tiling import cdiv, next_pow2
from kernels.triton_gpu import autotune_table

TARGET_PROGRAMS = 264  # 2 x 132 SMs
SMEM_LIMIT_BYTES = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}  # per-block opt-in max


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Optional overrides; None = autotune table / heuristic."""
  block_q: int | None = None        # attention forward / dQ query tile
  block_kv: int | None = None       # attention forward / dQ key tile
  kv_splits: int | None = None      # forward and dQ split of the key axis
  block_q_bwd: int | None = None    # dK/dV pass query tile
  block_kv_bwd: int | None = None   # dK/dV pass key tile
  q_splits_bwd: int | None = None   # dK/dV split of the query axis
  num_warps: int | None = None
  num_stages: int | None = None
  fused_bwd: bool | None = None     # one-pass backward where the keys are one tile


def _tile(n: int, cap: int) -> int:
  return min(cap, max(16, next_pow2(n)))


def as_block_sizes(bs: Any) -> BlockSizes:
  if bs is None:
    return BlockSizes()
  if isinstance(bs, BlockSizes):
    return bs
  if isinstance(bs, dict):
    unknown = set(bs) - {f.name for f in dataclasses.fields(BlockSizes)}
    if unknown:
      raise ValueError(f"block_sizes has unknown fields {sorted(unknown)}; "
                       f"expected fields of kernels.triton_gpu.BlockSizes")
    return BlockSizes(**bs)
  raise TypeError(f"block_sizes must be a kernels.triton_gpu.BlockSizes, a dict or None, "
                  f"got {type(bs).__name__}")


def _check_tile(name: str, v: int) -> None:
  if v < 16 or v & (v - 1):
    raise ValueError(f"block_sizes.{name}={v} must be a power of two >= 16 (tl.dot's "
                     "minimum tile)")


def _pick(user, table: dict, key: str, default):
  if user is not None:
    return user
  return table.get(key, default)


def split_axis(requested, tab, name, length, block, programs):
  """(number of splits, tokens per split) of an axis of `length` in `block` tiles, so
  that `programs` (the other grid axes) times the splits fills TARGET_PROGRAMS."""
  splits = _pick(requested, tab, name, max(1, cdiv(TARGET_PROGRAMS, programs)))
  if splits < 1:
    raise ValueError(f"block_sizes.{name}={splits} must be >= 1")
  blocks = cdiv(length, block)
  split_len = cdiv(blocks, min(splits, blocks)) * block
  return cdiv(length, split_len), split_len


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  d_pad: int
  block_q: int
  block_kv: int
  kv_splits: int
  split_len: int          # keys per forward/dQ split (multiple of block_kv)
  block_q_bwd: int
  block_kv_bwd: int
  q_splits_bwd: int
  q_split_len_bwd: int    # queries per dK/dV split
  num_warps: int
  num_stages: int
  # One-pass backward (delta, dQ, dK, dV in one kernel) when every key fits one tile of a
  # non-split forward: the latent and write attention's 128 keys.
  fused_bwd: bool = False
  num_warps_fused_bwd: int = 8


ONE_PASS_MAX_KEYS = 128   # key ranges up to this are one tile: softmax without rescale
INT32_MAX = 2 ** 31 - 1


def check_slab(what: str, seq: int, width: int) -> None:
  """The kernels address one batch element's [seq, width] slab with int32 in-tile offsets
  (their per-batch/head base offsets are int64): a clear error instead of wrong addresses."""
  if seq * width > INT32_MAX:
    raise ValueError(f"{what}: one batch element's [{seq}, {width}] slab has {seq * width} "
                     f"elements, more than 2^31 - 1 (the kernels' in-tile int32 offsets)")


def attention_plan(b: int, lq: int, lk: int, h: int, dh: int, dtype_name: str,
                   bs: Any = None, precision: str = "default") -> AttentionPlan:
  bs = as_block_sizes(bs)
  tab = autotune_table.TABLE.get(f"attn:{lq}x{lk}x{dh}:{dtype_name}", {})
  d_pad = max(16, next_pow2(dh))
  if d_pad > 256:
    raise ValueError(f"triton attention: head_dim={dh} is above the supported 256")
  check_slab("triton attention", max(lq, lk), h * dh)
  # IEEE fp32 dots (precision="highest") run on FMA units and hold twice the operand
  # registers: 32-row tiles where 64 spilled (compile report). Tensor-core dots (bf16,
  # fp16, TF32) take 64-row query tiles: wgmma's M per warpgroup.
  ieee = dtype_name == "float32" and precision == "highest"
  cap = 32 if (ieee and d_pad >= 64) else 64
  block_q = _pick(bs.block_q, tab, "block_q", _tile(lq, cap))
  # Few keys (the write direction: M = 128 latents): one key tile, one-pass softmax.
  kv_cap = ONE_PASS_MAX_KEYS if (lk <= ONE_PASS_MAX_KEYS and not ieee and d_pad <= 64) else cap
  block_kv = _pick(bs.block_kv, tab, "block_kv", _tile(lk, kv_cap))
  bwd_cap = 32 if ieee else cap
  block_q_bwd = _pick(bs.block_q_bwd, tab, "block_q_bwd", _tile(lq, bwd_cap))
  block_kv_bwd = _pick(bs.block_kv_bwd, tab, "block_kv_bwd", _tile(lk, bwd_cap))
  for name, v in (("block_q", block_q), ("block_kv", block_kv),
                  ("block_q_bwd", block_q_bwd), ("block_kv_bwd", block_kv_bwd)):
    _check_tile(name, v)
  num_warps = _pick(bs.num_warps, tab, "num_warps", 8 if ieee else 4)
  num_stages = _pick(bs.num_stages, tab, "num_stages", 2)

  itemsize = 4 if dtype_name == "float32" else 2
  # K and V tiles per pipeline stage plus the resident Q tile (forward); dK/dV
  # pass: Q and dO tiles per stage plus the resident K, V tiles.
  fwd_smem = lambda: num_stages * 2 * block_kv * d_pad * itemsize + block_q * d_pad * itemsize
  bwd_smem = lambda: (num_stages * 2 * block_q_bwd * d_pad * itemsize
                      + 2 * block_kv_bwd * d_pad * itemsize)
  limit = min(SMEM_LIMIT_BYTES.values())
  # Default tiles halve until they fit (float32 at head_dim > 64 does not at 64 rows); a size
  # the caller or the tuning table chose is kept and, if it does not fit, named in the error.
  chosen = lambda name: getattr(bs, name) is not None or name in tab
  while fwd_smem() > limit and not chosen("block_kv") and block_kv > 16:
    block_kv //= 2
  while bwd_smem() > limit and not chosen("block_q_bwd") and block_q_bwd > 16:
    block_q_bwd //= 2
  while bwd_smem() > limit and not chosen("block_kv_bwd") and block_kv_bwd > 16:
    block_kv_bwd //= 2
  for what, need in (("forward", fwd_smem()), ("backward", bwd_smem())):
    if need > limit:
      raise ValueError(
          f"triton attention {what}: block sizes need ~{need} bytes of shared memory "
          f"(> {limit}, the A100 per-block limit); lower block_q/block_kv or num_stages")

  # Forward / dQ: split the key axis when query tiles alone leave SMs idle.
  splits, split_len = split_axis(bs.kv_splits, tab, "kv_splits", lk, block_kv,
                                  cdiv(lq, block_q) * b * h)
  # dK/dV: split the query axis when key tiles alone leave SMs idle (write direction).
  qs, q_split_len = split_axis(bs.q_splits_bwd, tab, "q_splits_bwd", lq, block_q_bwd,
                                cdiv(lk, block_kv_bwd) * b * h)
  # The fused backward holds K, V, dK, dV ([block_kv, d_pad] each) and the [block_q_bwd,
  # block_kv] score tiles of one program: tensor-core dtypes up to 128 keys x 64 dims.
  fused_bwd = (splits == 1 and lk <= block_kv and not ieee and d_pad <= 64
               and _pick(bs.fused_bwd, tab, "fused_bwd", True))
  return AttentionPlan(d_pad, block_q, block_kv, splits, split_len, block_q_bwd,
                       block_kv_bwd, qs, q_split_len, num_warps, num_stages, bool(fused_bwd))
