"""Pallas Mosaic TPU kernel: (M, N, K) grid, int32 accumulator in VMEM scratch.

K is the innermost ("arbitrary") grid axis so each output tile stays resident
while its K tiles stream through; the scales and bias are applied once, on
the last K step. Tested on CPU in TPU interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.weights import unpack_nibbles


def _kernel(x_ref, xs_ref, w_ref, ws_ref, b_ref, o_ref, acc_ref, *, packed: bool):
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  w = unpack_nibbles(w_ref[...]) if packed else w_ref[...]
  acc_ref[...] += jax.lax.dot_general(x_ref[...], w, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.int32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...] + b_ref[...]
    o_ref[...] = y.astype(o_ref.dtype)


def matmul(x_codes, x_scales, w_data, w_scales, bias, *, packed: bool, out_dtype,
           block_m: int, block_n: int, block_k: int, interpret: bool = False):
  m, k = x_codes.shape
  n = w_data.shape[0]
  bkw = block_k // 2 if packed else block_k
  return pl.pallas_call(
      functools.partial(_kernel, packed=packed),
      grid=(m // block_m, n // block_n, k // block_k),
      in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((block_m, 1), lambda i, j, kk: (i, 0)),
                pl.BlockSpec((block_n, bkw), lambda i, j, kk: (j, kk)),
                pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j)),
                pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(x_codes, x_scales, w_data, w_scales, bias)
