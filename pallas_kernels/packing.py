"""Bit-packing of low-bit integer codes: the storage format of quantized weights.

Codes of a (N, K) weight (PyTorch layout: one row per output channel, so
each row is contiguous along the reduction axis K) are offset to unsigned
b-bit values and written as a little-endian bit stream per row. For 4 bits
this is two codes per byte, the even k in the low nibble. Exact for every
bit-width 2–8, portable (plain uint8), and safetensors-serialisable.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.bits import check_bits, qrange


def packed_row_bytes(k: int, bits: int) -> int:
  return -(-k * bits // 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """(N, K) signed codes → (N, ceil(K·bits/8)) uint8."""
  check_bits(bits)
  codes = np.asarray(codes)
  lo, hi = qrange(bits)
  if codes.size and (codes.min() < lo or codes.max() > hi):
    raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
  unsigned = (codes.astype(np.int16) - lo).astype(np.uint8)
  bit_planes = np.unpackbits(unsigned[..., None], axis=-1, bitorder="little")[..., :bits]
  n, k = codes.shape
  stream = bit_planes.reshape(n, k * bits)
  return np.packbits(stream, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
  """Inverse of `pack`: (N, bytes) uint8 → (N, K) int8 codes."""
  check_bits(bits)
  n = packed.shape[0]
  stream = np.unpackbits(packed, axis=-1, bitorder="little")[:, : k * bits]
  planes = stream.reshape(n, k, bits)
  unsigned = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(-1)
  return (unsigned + qrange(bits)[0]).astype(np.int8)
