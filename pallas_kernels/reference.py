"""Plain-JAX W·A matmul: the oracle every kernel back-end is tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.bits import qrange
from pallas_kernels.weights import QuantizedWeight, unpack_codes

_TINY = 1e-8


def activation_scales(absmax: jax.Array, bits: int, clip: jax.Array | None = None) -> jax.Array:
  """Per-token scales from per-token absmax: clip · absmax / (2^(b−1) − 1), float32.

  `clip` (a learned factor in (0, 1], scalar or broadcastable) maps that
  fraction of the absmax onto the top code; larger values saturate. Training
  (`s2q_jax.quant.quantizer`) uses this same formula, so fake quantization and
  every deployed back-end agree bit for bit.
  """
  absmax = jnp.maximum(absmax.astype(jnp.float32), _TINY)
  if clip is not None:
    absmax = absmax * jnp.asarray(clip, jnp.float32)
  return absmax / qrange(bits)[1]


def quantize_activations(x: jax.Array, bits: int, clip: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric per-token quantization of (M, K) → (int8 codes, (M, 1) float32 scales).

  Every back-end gets its codes from this one XLA computation, so they agree
  exactly. Exact .5 ties of x / scale (common for bf16 inputs) may round
  either way, as XLA may divide through a reciprocal. `clip`: see
  `activation_scales`.
  """
  lo, hi = qrange(bits)
  xf = x.astype(jnp.float32)
  scales = activation_scales(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), bits, clip)
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
