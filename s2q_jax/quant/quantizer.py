"""Uniform symmetric quantizers: per-output-channel weights, dynamic per-token activations.

b-bit codes are the integers [-2^(b-1), 2^(b-1) - 1] (6-bit: [-32, 31]);
scales map absmax onto 2^(b-1) - 1, so -2^(b-1) is only reached by clipped
weights. Rounding uses a straight-through estimator so clipping factors,
smoothing scales and rotations can be learned through the quantizer. The
grid is the one `pallas_kernels.reference` deploys: fake-quant values are
codes × scales of exactly those codes and scales. Weight scales (and
smoothing vectors) are float16 values, as checkpoints store them: half the
bytes of float32 per channel, which matters at small K, and calibration
already sees the values deployment will use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.bits import check_bits, qrange  # noqa: F401  (re-exported)

# How checkpoints store weight scales and smoothing vectors: float16 (as GPTQ/AWQ
# checkpoints do) halves float32's bytes and keeps a 2⁻¹¹ relative error, 4× finer
# than bf16; a scale error moves every weight of its channel.
STORAGE_DTYPE = jnp.float16
_SCALE_FLOOR = float(jnp.finfo(STORAGE_DTYPE).tiny)  # smallest normal float16, ≈ 6e-5


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward (exactly: x - x is 0), identity backward."""
  return jax.lax.stop_gradient(jnp.round(x)) + (x - jax.lax.stop_gradient(x))


def round_to_storage(x: jax.Array) -> jax.Array:
  """x rounded to `STORAGE_DTYPE` values, kept in x's dtype; identity backward."""
  stored = x.astype(STORAGE_DTYPE).astype(x.dtype)
  return jax.lax.stop_gradient(stored) + (x - jax.lax.stop_gradient(x))


def quantize(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """Integer codes of x / scale (in x's float dtype, so gradients pass).

  Gradients are LSQ's: x / scale passes straight through where it rounds into
  the range ([lo − ½, hi + ½)) and is constant where it saturates, so the
  scale's gradient is round(x/s) − x/s in range and the bound outside. The
  boundary is half a step past the top code on purpose: a token's absmax lands
  on hi itself up to float rounding, and a boundary there would flip its
  gradient with the summation order (different on 1 and 8 devices).
  """
  lo, hi = qrange(bits)
  r = x / scale
  codes = jax.lax.stop_gradient(jnp.clip(jnp.round(r), lo, hi))
  inside = (r >= lo - 0.5) & (r < hi + 0.5)
  return jnp.where(inside, r + jax.lax.stop_gradient(codes - r), codes)


def weight_scales(w: jax.Array, bits: int, clip: jax.Array | None = None) -> jax.Array:
  """(N,) scales of a (K, N) kernel: max_k |w[k, n]| · clip_n / (2^(b-1) - 1), bf16-rounded.

  Rounding may shrink a scale by up to 2⁻¹¹, so a channel's absmax can land just
  past the top code; `quantize` clips it there, an error far below one step.
  Channels with absmax below ~6e-5 · (2^(b-1) - 1) (all-zero ones included)
  get the smallest normal float16 scale.
  """
  absmax = jnp.max(jnp.abs(w), axis=0)
  if clip is not None:
    absmax = absmax * clip
  return round_to_storage(jnp.maximum(absmax / qrange(bits)[1], _SCALE_FLOOR))


def fake_quant_weights(w: jax.Array, bits: int, clip: jax.Array | None = None) -> jax.Array:
  """Per-output-channel quantize → dequantize of a (K, N) kernel, in float32."""
  wf = w.astype(jnp.float32)
  scales = weight_scales(wf, bits, clip)
  return quantize(wf, scales, bits) * scales


def activation_scales(x: jax.Array, bits: int, clip: jax.Array | None = None) -> jax.Array:
  """(..., 1) scales of each token (row of the last axis), computed from the data itself.

  The token's absmax is held constant for gradients (the STE then treats in-range
  values as passed through), so a token's gradient does not depend on which entry
  is its max. A learned `clip` factor scales it and does get a gradient: LSQ's,
  round(x/s) − x/s from the values in range and ±(2^(b−1)) from the saturated ones.
  The formula is the deployed one (`pallas_kernels.reference.activation_scales`).
  """
  absmax = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  return reference.activation_scales(absmax, bits, clip)


def fake_quant_activations(x: jax.Array, bits: int, clip: jax.Array | None = None) -> jax.Array:
  """Dynamic per-token quantize → dequantize, computed in float32; `clip` see above."""
  xf = x.astype(jnp.float32)
  scale = activation_scales(xf, bits, clip)
  return (quantize(xf, scale, bits) * scale).astype(x.dtype)
