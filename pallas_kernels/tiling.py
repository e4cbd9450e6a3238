"""Tile-size choice and zero padding shared by the Pallas back-ends."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def divisor_block(dim: int, preferred: int, align: int) -> int | None:
  """Largest multiple of `align` that is ≤ `preferred` and divides `dim`, if any."""
  for b in range(preferred - preferred % align, 0, -align):
    if dim % b == 0:
      return b
  return None


def pow2_block(dim: int, preferred: int, minimum: int) -> int:
  """Largest power of two ≤ `preferred` dividing `dim`, else `preferred` clipped to `dim`."""
  b = preferred
  while b >= minimum:
    if dim % b == 0:
      return b
    b //= 2
  return max(minimum, min(preferred, next_pow2(dim)))


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` up to `size`. Exact here: padded K codes contribute 0 to every dot,
  padded rows or output channels are sliced off."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)
