"""Quantized weights as the kernels consume them.

Stored in (N, K) order — one row per output channel, contiguous along the
reduction axis — because Hopper's int8 tensor-core instructions need both
operands K-major, and XLA's own int8 dot is faster that way too. 4-bit codes
are packed two per byte (`packing.pack`: offset-binary nibbles, the even k in
the low nibble): plain uint8 works on every back-end and serialises with
safetensors, unlike `jnp.int4`, whose support varies across back-ends and
file formats. Other widths are held as int8 codes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import packing
from pallas_kernels.bits import check_bits, qrange


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  # 4-bit as stored: (N, K // 2) uint8 nibbles; otherwise, or after `unpacked()`: (N, K) int8
  data: jax.Array
  scales: jax.Array  # (N,) float32: weight = codes × scales
  bits: int = dataclasses.field(metadata=dict(static=True))
  in_features: int = dataclasses.field(metadata=dict(static=True))

  @property
  def out_features(self) -> int:
    return self.data.shape[0]

  @property
  def packed(self) -> bool:
    """Two 4-bit codes per byte. Told apart by dtype: packed bytes are uint8, codes int8."""
    return self.data.dtype == jnp.uint8

  def unpacked(self) -> "QuantizedWeight":
    """The same weight with (N, K) int8 codes: twice the bytes of packed 4-bit, but what
    XLA's int8 dot consumes directly (the `xla_int8` back-end), so unpack once, at load."""
    if not self.packed:
      return self
    return QuantizedWeight(unpack_nibbles(self.data), self.scales, self.bits, self.in_features)

  @property
  def nbytes(self) -> int:
    """Bytes actually held by the arrays (packed codes + scales), not a nominal bits/8."""
    return int(self.data.size * self.data.dtype.itemsize
               + self.scales.size * self.scales.dtype.itemsize)

  @classmethod
  def from_codes(cls, codes: np.ndarray | jax.Array, scales: np.ndarray | jax.Array,
                 bits: int) -> "QuantizedWeight":
    """From integer codes in Flax layout (K, N) and per-output-channel scales (N,).

    For calibrated weights (GPTQ, learned clipping): the given integers and
    scales are stored exactly, nothing is re-rounded.
    """
    check_bits(bits, "weight bits")
    codes = np.asarray(codes)
    k, n = codes.shape
    if np.asarray(scales).shape != (n,):
      raise ValueError(f"scales must have shape ({n},), got {np.asarray(scales).shape}")
    if bits == 4:
      if k % 2:
        raise ValueError(f"4-bit packing needs an even number of input features, got {k}")
      data = jnp.asarray(packing.pack(codes.T, 4))
    else:
      lo, hi = qrange(bits)
      if codes.min(initial=0) < lo or codes.max(initial=0) > hi:
        raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
      data = jnp.asarray(codes.T.astype(np.int8))
    return cls(data, jnp.asarray(scales, jnp.float32), bits, k)


def quantize_weight(w: jax.Array | np.ndarray, bits: int = 4) -> QuantizedWeight:
  """Round-to-nearest, symmetric, per-output-channel quantization of a (K, N) kernel."""
  check_bits(bits, "weight bits")
  w = np.asarray(w, np.float32)
  if w.ndim != 2:
    raise ValueError(f"expected a (K, N) kernel, got shape {w.shape}")
  lo, hi = qrange(bits)
  scales = np.maximum(np.abs(w).max(axis=0), 1e-8) / hi
  codes = np.clip(np.round(w / scales), lo, hi).astype(np.int8)
  return QuantizedWeight.from_codes(codes, scales, bits)


def unpack_codes(qw: QuantizedWeight) -> jax.Array:
  """(N, K) int8 codes, traceable (used by the reference back-end and inside kernels)."""
  return unpack_nibbles(qw.data) if qw.packed else qw.data


def unpack_nibbles(data: jax.Array) -> jax.Array:
  """(..., K // 2) packed uint8 → (..., K) int8 codes in [-8, 7]."""
  d = data.astype(jnp.int32)
  low, high = (d & 0xF) - 8, (d >> 4) - 8
  return jnp.stack([low, high], axis=-1).reshape(*data.shape[:-1], -1).astype(jnp.int8)


def dequantize_weight(qw: QuantizedWeight) -> jax.Array:
  """The (K, N) float32 kernel the codes represent."""
  return (unpack_codes(qw).astype(jnp.float32) * qw.scales[:, None]).T
