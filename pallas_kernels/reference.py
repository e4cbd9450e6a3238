"""Plain-JAX W·A matmul: the oracle every kernel back-end is tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.bits import qrange
from pallas_kernels.weights import QuantizedWeight, unpack_codes

_TINY = 1e-8


def quantize_activations(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric per-token quantization of (M, K) → (int8 codes, (M, 1) float32 scales).

  Every back-end gets its codes from this one XLA computation, so they agree
  exactly. Exact .5 ties of x / scale (common for bf16 inputs) may round
  either way, as XLA may divide through a reciprocal.
  """
  lo, hi = qrange(bits)
  xf = x.astype(jnp.float32)
  scales = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), _TINY) / hi
  codes = jnp.clip(jnp.round(xf / scales), lo, hi).astype(jnp.int8)
  return codes, scales


def epilogue(acc: jax.Array, x_scales: jax.Array, w_scales: jax.Array,
             bias: jax.Array | None, dtype) -> jax.Array:
  """int32 accumulator → float: per-token × per-channel scale, plus bias."""
  y = acc.astype(jnp.float32) * x_scales * w_scales.reshape(1, -1)
  if bias is not None:
    y = y + bias.astype(jnp.float32).reshape(1, -1)
  return y.astype(dtype)


def int_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array, w_scales: jax.Array,
               bias: jax.Array | None, out_dtype) -> jax.Array:
  """(M, K) int8 activation codes × (N, K) int8 weight codes, exact int32 accumulation."""
  acc = jax.lax.dot_general(x_codes, w_codes, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return epilogue(acc, x_scales, w_scales, bias, out_dtype)


def matmul(x_codes: jax.Array, x_scales: jax.Array, qw: QuantizedWeight,
           bias: jax.Array | None, out_dtype) -> jax.Array:
  return int_matmul(x_codes, x_scales, unpack_codes(qw), qw.scales, bias, out_dtype)
