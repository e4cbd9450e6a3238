"""Pallas Mosaic TPU kernel: (M, N, K) grid, int32 accumulator in VMEM scratch.

K is the innermost ("arbitrary") grid axis so each output tile stays resident
while its K tiles stream through; the scales and bias are applied once, on
the last K step. As on GPU, 4-bit weights arrive as bytes and the even-k and
odd-k activation columns as two operands, so unpacking is elementwise (no lane
shuffles, which Mosaic handles poorly). Tiles follow Mosaic's rules: the last
two block dims are multiples of (32, 128) for int8, or the whole dim. A ragged
last row tile is left to Pallas (reads past M are garbage in rows whose
writes are dropped). Runs on CPU in TPU interpret mode; not run on a TPU here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tiling
from pallas_kernels.pallas_gpu import unpack_pair

_NT = (((1,), (1,)), ((), ()))
# The Pallas TPU matmul guide reaches 80–90% of the MXU's peak with blocks like these;
# 128×128 tiles made ≈ 62,500 grid steps at 17,776×7680×1920, each paying a fixed cost.
# VMEM at these sizes (double-buffered int8 inputs, int32 accumulator, bf16 output)
# is ≈ 6 MiB, inside the default scoped limit of every generation with an int8 MXU.
DEFAULT_TILES = dict(block_m=512, block_n=1024, block_k=1024)


def _kernel(*refs, packed: bool):
  *x_refs, xs_ref, w_ref, ws_ref, b_ref, o_ref, acc_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  w = w_ref[...]
  w_parts = unpack_pair(w) if packed else (w,)
  for x_ref, w_part in zip(x_refs, w_parts):
    acc_ref[...] += jax.lax.dot_general(x_ref[...], w_part, _NT,
                                        preferred_element_type=jnp.int32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...] + b_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def _tile(dim: int, preferred: int, align: int, whole_up_to: int) -> tuple[int, int]:
  """(block, padded dim) obeying Mosaic's alignment rule."""
  block = tiling.divisor_block(dim, preferred, align)
  if block is not None:
    return block, dim
  if dim <= whole_up_to:
    return dim, dim  # a whole-dim block needs no alignment
  return preferred, tiling.round_up(dim, preferred)


def matmul(x_parts: tuple[jax.Array, ...], x_scales: jax.Array, w: jax.Array,
           w_scales: jax.Array, bias: jax.Array, *, packed: bool, out_dtype,
           block_m: int, block_n: int, block_k: int, interpret: bool = False) -> jax.Array:
  """Same contract as `pallas_gpu.matmul`."""
  m, kc = x_parts[0].shape
  n = w.shape[0]
  bm = block_m if m >= block_m else m  # small M: one whole-dim row tile
  bn, np_ = _tile(n, block_n, 128, block_n)
  bkc, kp = _tile(kc, block_k // 2 if packed else block_k, 128, 4096)
  x_parts = tuple(tiling.pad_to(x, 1, kp) for x in x_parts)
  w = tiling.pad_to(tiling.pad_to(w, 0, np_), 1, kp)
  w_scales = tiling.pad_to(w_scales, 0, np_).reshape(1, np_)
  bias = tiling.pad_to(bias, 0, np_).reshape(1, np_)
  col_block = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
  out = pl.pallas_call(
      functools.partial(_kernel, packed=packed),
      grid=(pl.cdiv(m, bm), np_ // bn, kp // bkc),
      in_specs=[*[pl.BlockSpec((bm, bkc), lambda i, j, kk: (i, kk))] * len(x_parts),
                pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                pl.BlockSpec((bn, bkc), lambda i, j, kk: (j, kk)),
                col_block, col_block],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, np_), out_dtype),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      # Reads past a ragged last row tile are legal on TPU (garbage in dropped rows).
      interpret=pltpu.InterpretParams(out_of_bounds_reads="uninitialized") if interpret
      else False,
  )(*x_parts, x_scales, w, w_scales, bias)
  return out if np_ == n else out[:, :n]
