"""Pallas kernel for GPUs (Triton lowering); also the `interpret` back-end on CPU.

Grid over (M, N) output tiles; each program loops over K in `block_k` steps:
loads int8 activation codes and packed weight codes, unpacks nibbles in
registers, accumulates int8 × int8 → int32, then applies the per-token and
per-channel scales and the bias in the epilogue. Inputs arrive padded to
whole tiles (see `ops.py`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.weights import unpack_nibbles


def _kernel(x_ref, xs_ref, w_ref, ws_ref, b_ref, o_ref, *, block_k: int, k_steps: int,
            packed: bool):
  bm, bn = o_ref.shape

  def body(step, acc):
    x = x_ref[:, pl.ds(step * block_k, block_k)]
    if packed:
      w = unpack_nibbles(w_ref[:, pl.ds(step * (block_k // 2), block_k // 2)])
    else:
      w = w_ref[:, pl.ds(step * block_k, block_k)]
    return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros((bm, bn), jnp.int32))
  y = acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...] + b_ref[...]
  o_ref[...] = y.astype(o_ref.dtype)


def matmul(x_codes, x_scales, w_data, w_scales, bias, *, packed: bool, out_dtype,
           block_m: int, block_n: int, block_k: int, interpret: bool = False):
  """x_codes (M, K) int8, x_scales (M, 1), w_data (N, K or K/2), w_scales (1, N), bias (1, N)."""
  m, k = x_codes.shape
  n = w_data.shape[0]
  kernel = functools.partial(_kernel, block_k=block_k, k_steps=k // block_k, packed=packed)
  kw = k // 2 if packed else k
  return pl.pallas_call(
      kernel,
      grid=(m // block_m, n // block_n),
      in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((block_n, kw), lambda i, j: (j, 0)),
                pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
                pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      interpret=interpret,
  )(x_codes, x_scales, w_data, w_scales, bias)
