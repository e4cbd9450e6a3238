"""Pallas kernel for NVIDIA GPUs, Triton lowering; also the `interpret` back-end on CPU.

One program per (M, N) output tile, in grouped order (below); each loops over K, loading int8
activation codes and packed weight bytes, unpacking the nibbles in registers
and accumulating int8 × int8 → int32 on the tensor cores, then applies the
per-token and per-channel scales and the bias in the epilogue.

Layout choices, all for Triton/Hopper:
- Weights stay (N, K): the dot contracts the last dim of both operands, so
  both are K-major, as int8 tensor-core instructions need.
- 4-bit: instead of interleaving the two nibbles of a byte back into K order
  (a register shuffle), the caller hands over the even-k and odd-k activation
  columns separately; low nibbles multiply the even columns, high nibbles the
  odd ones, two dots per K step and no data movement.
- Program order: with row tiles fastest, every column tile re-reads all of
  the activations (≈ M·K bytes per N tile). Programs run in groups of
  `GROUP_M` row tiles × every column tile, row fastest within a group (Triton's
  usual swizzle), so concurrently running programs share both their activation
  rows and their weight columns in L2.
- Triton needs power-of-two tiles. Ragged M (17,776 tokens) is handled by
  masked loads and stores of the last row tile rather than padding, which
  would cost an extra copy of the output; N and K are padded only when they
  are not multiples of a tile (never for the model dims).

The Triton back-end is picked explicitly (`CompilerParams`): jax would lower a
bare `pallas_call` with Mosaic GPU, which stages whole blocks in shared memory.
Not run on GPU hardware here; CI lowers it to Triton IR and runs the same
body in the Pallas interpreter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import tiling

_NT = (((1,), (1,)), ((), ()))  # contract the last dim of both operands
DEFAULT_TILES = dict(block_m=128, block_n=128, block_k=256)
GROUP_M = 8


def tile_ids(p: jax.Array, m_tiles: int, n_tiles: int) -> tuple[jax.Array, jax.Array]:
  """(row tile, column tile) of program `p` in grouped order: `GROUP_M` row tiles
  run over all column tiles together (the last group may have fewer rows)."""
  per_group = GROUP_M * n_tiles
  first = (p // per_group) * GROUP_M
  rows = jnp.minimum(m_tiles - first, GROUP_M)
  return first + (p % per_group) % rows, (p % per_group) // rows


def unpack_pair(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed bytes (as int8) → (low-nibble codes, high-nibble codes), int8 in [-8, 7].

  Uses only signed ops (the byte is sign-extended, then masked) so it lowers on
  every back-end; Triton's dot refuses unsigned inputs anyway.
  """
  w = w.astype(jnp.int32)
  return ((w & 15) - 8).astype(jnp.int8), (((w >> 4) & 15) - 8).astype(jnp.int8)


def _kernel(*refs, m: int, block_kc: int, k_steps: int, packed: bool, m_tiles: int,
            n_tiles: int):
  *x_refs, xs_ref, w_ref, ws_ref, b_ref, o_ref = refs
  bm = o_ref.shape[0]
  i, _ = tile_ids(pl.program_id(0), m_tiles, n_tiles)
  rows = i * bm + jnp.arange(bm)
  valid = (rows < m)[:, None]  # the last row tile may run past M

  def body(step, acc):
    cols = pl.ds(pl.multiple_of(step * block_kc, block_kc), block_kc)
    w = w_ref[:, cols]
    w_parts = unpack_pair(w) if packed else (w,)
    for x_ref, w_part in zip(x_refs, w_parts):
      x = pltriton.load(x_ref.at[:, cols], mask=valid, other=0)
      acc += jax.lax.dot_general(x, w_part, _NT, preferred_element_type=jnp.int32)
    return acc

  acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros(o_ref.shape, jnp.int32))
  xs = pltriton.load(xs_ref, mask=valid, other=0.0)
  y = acc.astype(jnp.float32) * xs * ws_ref[...] + b_ref[...]
  pltriton.store(o_ref, y.astype(o_ref.dtype), mask=valid)


def matmul(x_parts: tuple[jax.Array, ...], x_scales: jax.Array, w: jax.Array,
           w_scales: jax.Array, bias: jax.Array, *, packed: bool, out_dtype,
           block_m: int, block_n: int, block_k: int, interpret: bool = False) -> jax.Array:
  """x_parts: (M, Kc) int8 each ((even, odd) columns if packed); x_scales (M, 1);
  w (N, Kc) int8; w_scales, bias (N,) float32. Returns (M, N) `out_dtype`."""
  m, kc = x_parts[0].shape
  n = w.shape[0]
  # Tensor-core dots need at least 16 rows/cols and 32 int8s along K.
  bm = min(block_m, max(16, tiling.next_pow2(m)))
  bn = tiling.pow2_block(n, block_n, 16)
  bkc = tiling.pow2_block(kc, block_k // 2 if packed else block_k, 32)
  np_, kp = tiling.round_up(n, bn), tiling.round_up(kc, bkc)
  x_parts = tuple(tiling.pad_to(x, 1, kp) for x in x_parts)
  w = tiling.pad_to(tiling.pad_to(w, 0, np_), 1, kp)
  w_scales = tiling.pad_to(w_scales, 0, np_).reshape(1, np_)
  bias = tiling.pad_to(bias, 0, np_).reshape(1, np_)
  m_tiles, n_tiles = pl.cdiv(m, bm), np_ // bn
  row = lambda p: tile_ids(p, m_tiles, n_tiles)[0]
  col = lambda p: tile_ids(p, m_tiles, n_tiles)[1]
  row_block = pl.BlockSpec((bm, kp), lambda p: (row(p), 0))
  col_block = pl.BlockSpec((1, bn), lambda p: (0, col(p)))
  out = pl.pallas_call(
      functools.partial(_kernel, m=m, block_kc=bkc, k_steps=kp // bkc, packed=packed,
                        m_tiles=m_tiles, n_tiles=n_tiles),
      grid=(m_tiles * n_tiles,),
      in_specs=[*[row_block] * len(x_parts),
                pl.BlockSpec((bm, 1), lambda p: (row(p), 0)),
                pl.BlockSpec((bn, kp), lambda p: (col(p), 0)),
                col_block, col_block],
      out_specs=pl.BlockSpec((bm, bn), lambda p: (row(p), col(p))),
      out_shape=jax.ShapeDtypeStruct((m, np_), out_dtype),
      compiler_params=pltriton.CompilerParams(num_warps=8 if bm * bn >= 128 * 128 else 4,
                                              num_stages=3),
      interpret=interpret,
  )(*x_parts, x_scales, w, w_scales, bias)
  return out if np_ == n else out[:, :n]
