"""Pallas Mosaic-GPU (`plgpu`) kernel for Hopper: int8 wgmma with TMA loads, fused epilogue.

A persistent kernel: one CUDA block per SM walks the (M, N) output tiles in
`planar_snake` order (`GRID_TILE_WIDTH` column tiles side by side, so
concurrently running blocks share weight columns and activation rows in L2).
For each tile, `plgpu.emit_pipeline` streams (block_m, block_k) activation
codes and (block_n, block_k) weight codes through shared memory with TMA,
`max_concurrent_steps` stages in flight, into an int32 wgmma accumulator.

Why this layout:
- Both operands are K-major. Hopper's int8 wgmma refuses a transposed
  operand ("Only f16 WGMMA supports transposes"); weights are kept (N, K)
  and handed to wgmma through `transpose_ref`, which is a view, not a copy.
- The epilogue is fused: the per-token and per-channel float32 scales and the
  bias are read into shared memory by TMA (issued before the K loop, so they
  arrive while it runs), applied to the accumulator in registers in the
  reference's float32 order, cast to the output dtype and written back by TMA.
- Ragged M (17,550 + 226 tokens is no multiple of 64): the last row tile's
  TMA loads run past M and read zeros; its store is split into power-of-two
  row counts so no row past M is written (a "ladder" of static TMA shapes).
- 4-bit weights arrive unpacked to (N, K) int8 (what deployment holds for
  `auto`); a packed weight is unpacked by XLA before the call. Unpacking
  nibbles inside the K loop would need a register round trip through shared
  memory before every wgmma (see DESIGN.md §6).

The `plgpu` API changes between jax releases. The names used here are the same
in jax 0.10.2 and 0.11.1 (checked against both sources); the row/column vector
layouts, spelled `Layout.WGMMA_ROW`/`_COL` in older releases, are looked up by
`_row_layout`/`_col_layout`, and the private interpret-mode parameters by
`interpret_params`.

On CPU the kernel runs in Mosaic-GPU interpret mode, which simulates shared
memory, TMA, barriers and wgmma (and can detect races), with two differences
forced by the interpreter (jax ≤ 0.11): its wgmma takes no transposed view,
so the weight is handed over (K, N), and it has no register layouts, so the
epilogue vectors are plain reads. Everything else is the same kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tiling

# 128×128×128 int8 tiles with four stages: 4 · (16 + 16) KiB of operands plus a 32 KiB
# bf16 output tile, well inside an H100's 227 KiB of shared memory per block.
DEFAULT_TILES = dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=4)
GRID_TILE_WIDTH = 4
H100_SMS = 132  # used when no GPU is attached (lowering on CPU, interpret mode)
_WGMMA_M = 64  # wgmma's M granule: a row tile is a multiple of one warpgroup's 64 rows


def _row_layout():
  """Register layout of a (block_m,) vector broadcast along the accumulator's columns."""
  layout = plgpu.Layout
  return layout.WGMMA_ROW if hasattr(layout, "WGMMA_ROW") else layout.WGMMA.reduce(1)


def _col_layout():
  layout = plgpu.Layout
  return layout.WGMMA_COL if hasattr(layout, "WGMMA_COL") else layout.WGMMA.reduce(0)


def _compiler_params():
  # Warpgroup semantics let Mosaic infer layouts and shared-memory swizzles (jax ≥ 0.7).
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _num_sms() -> int:
  dev = jax.devices()[0]
  return (getattr(dev, "core_count", None) or H100_SMS) if dev.platform == "gpu" else H100_SMS


def _load_vector(ref, layout, interpret: bool) -> jax.Array:
  """A vector from shared memory in the register layout its broadcast needs. The
  interpreter has no layouts (nor `plgpu.load`): there it is a plain read."""
  return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _store_rows(o_smem, o_gmem, row0, rows, col_slice, block_m: int, m: int) -> None:
  """Writes the first `rows` (dynamic, 1..block_m) rows of `o_smem` to `o_gmem` at `row0`.

  TMA copies have static shapes, so a ragged count is written as its binary
  digits: one copy of 2^j rows for every bit j set in `rows`.
  """
  start = 0
  size = min(block_m, m)
  while size > 0:
    rung = 1 << int(math.log2(size))
    size = rung // 2

    @pl.when(rows & rung != 0)
    def _(rung=rung, start=start):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, rung)],
                              o_gmem.at[pl.ds(row0 + start, rung), col_slice])

    start = start + (rows & rung)


def _kernel(x_gmem, xs_gmem, w_gmem, ws_gmem, b_gmem, o_gmem, *, m: int, block_m: int,
            block_n: int, block_k: int, steps: int, interpret: bool):
  k = x_gmem.shape[1]
  n = w_gmem.shape[1 if interpret else 0]
  m_tiles, n_tiles = pl.cdiv(m, block_m), n // block_n
  shape = (block_m, block_n)

  def tiles(xs_smem, ws_smem, b_smem, o_smem, barrier):  # scratch shared by a block's tiles
    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
    def _tile(info):
      mi, ni = plgpu.planar_snake(info.index[0], (m_tiles, n_tiles), 1, GRID_TILE_WIDTH)
      row0 = mi * block_m
      cols = pl.ds(ni * block_n, block_n)
      # Epilogue operands first: their TMA copies overlap the whole K loop.
      plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(row0, block_m)], xs_smem, barrier.at[0])
      plgpu.copy_gmem_to_smem(ws_gmem.at[cols], ws_smem, barrier.at[1])
      plgpu.copy_gmem_to_smem(b_gmem.at[cols], b_smem, barrier.at[2])

      def accumulate(acc_ref):  # the accumulator lives in registers, in a scope of its own
        if interpret:  # the interpreter's wgmma takes no transposed view: w comes (K, N)
          w_spec = plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni), delay_release=1)
          rhs = lambda w_smem: w_smem
        else:
          w_spec = plgpu.BlockSpec((block_n, block_k), lambda kk: (ni, kk), delay_release=1)
          rhs = lambda w_smem: plgpu.transpose_ref(w_smem, (1, 0))
        plgpu.emit_pipeline(
            lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, rhs(w_smem)),
            grid=(k // block_k,),
            in_specs=[plgpu.BlockSpec((block_m, block_k), lambda kk: (mi, kk), delay_release=1),
                      w_spec],
            max_concurrent_steps=steps,
        )(x_gmem, w_gmem)
        return acc_ref[...]  # waits for the last wgmma

      acc = pl.run_scoped(accumulate, plgpu.ACC(shape, jnp.int32))
      for i in range(3):
        plgpu.barrier_wait(barrier.at[i])
      xs = _load_vector(xs_smem, _row_layout(), interpret)
      ws = _load_vector(ws_smem, _col_layout(), interpret)
      bias = _load_vector(b_smem, _col_layout(), interpret)
      # The reference's float32 order: ((acc · x_scale) · w_scale) + bias, then one rounding.
      y = acc.astype(jnp.float32) * jax.lax.broadcast_in_dim(xs, shape, [0])
      y = y * jax.lax.broadcast_in_dim(ws, shape, [1]) + jax.lax.broadcast_in_dim(bias, shape, [1])
      o_smem[...] = y.astype(o_smem.dtype)
      plgpu.commit_smem()
      _store_rows(o_smem, o_gmem, row0, jnp.minimum(block_m, m - row0), cols, block_m, m)
      # The next tile overwrites o_smem: these copies must have read it by then.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  pl.run_scoped(tiles, plgpu.SMEM((block_m,), jnp.float32), plgpu.SMEM((block_n,), jnp.float32),
                plgpu.SMEM((block_n,), jnp.float32), plgpu.SMEM(shape, o_gmem.dtype),
                plgpu.Barrier(num_barriers=3))


def matmul(x_codes: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array,
           bias: jax.Array, *, out_dtype, block_m: int, block_n: int, block_k: int,
           max_concurrent_steps: int = 4, num_sms: int | None = None,
           interpret=False) -> jax.Array:
  """x_codes (M, K) int8, x_scales (M, 1) float32, w (N, K) int8 codes, w_scales and
  bias (N,) float32 → (M, N) `out_dtype`. Tiles are shrunk to the problem; N and K are
  zero-padded to whole tiles (never at the model dims). `interpret`: True, or
  `interpret_params(...)` (e.g. with race detection) to run in the Mosaic-GPU
  interpreter; `num_sms`: CUDA blocks of the persistent grid (default: the device's)."""
  if max_concurrent_steps < 2:  # a stage is released one step late (the wgmma is async)
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps}: the pipeline needs >= 2")
  m, k = x_codes.shape
  n = w.shape[0]
  bm = _WGMMA_M if m <= _WGMMA_M else block_m
  bn = tiling.pow2_block(n, block_n, 32)
  bk = tiling.pow2_block(k, block_k, 32)
  np_, kp = tiling.round_up(n, bn), tiling.round_up(k, bk)
  x_codes = tiling.pad_to(x_codes, 1, kp)
  w = tiling.pad_to(tiling.pad_to(w, 0, np_), 1, kp)
  w_scales = tiling.pad_to(w_scales.astype(jnp.float32), 0, np_)
  bias = tiling.pad_to(bias.astype(jnp.float32), 0, np_)
  tiles = pl.cdiv(m, bm) * (np_ // bn)
  if interpret is True:
    interpret = interpret_params()
  kwargs = dict(interpret=interpret) if interpret else {}
  out = plgpu.kernel(
      functools.partial(_kernel, m=m, block_m=bm, block_n=bn, block_k=bk,
                        steps=max_concurrent_steps, interpret=bool(interpret)),
      out_type=jax.ShapeDtypeStruct((m, np_), out_dtype),
      grid=(min(num_sms or _num_sms(), tiles),), grid_names=("sm",),
      compiler_params=_compiler_params(), **kwargs,
  )(x_codes, x_scales.reshape(m), w.T if interpret else w, w_scales, bias)
  return out if np_ == n else out[:, :n]


def interpret_params(**kwargs):
  """Mosaic-GPU interpret mode's parameters (`InterpretGPUParams`, private in jax 0.10).

  Reads past a ragged last row tile are allowed: TMA fills them with zeros on the
  device, the interpreter with garbage, and neither reaches a stored row.
  """
  try:
    # pylint: disable-next=import-outside-toplevel
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as e:
    raise NotImplementedError(f"this jax ({jax.__version__}) has no Mosaic-GPU interpret "
                              "mode; use the `interpret` (Triton) back-end on CPU") from e
  return InterpretGPUParams(**{"out_of_bounds_reads": "uninitialized", **kwargs})
