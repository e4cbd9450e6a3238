"""`w4a6_matmul`: per-token activation quantization + low-bit integer matmul, any back-end."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_gpu, pallas_tpu, reference
from pallas_kernels.bits import check_bits
from pallas_kernels.weights import QuantizedWeight

BACKENDS = ("auto", "reference", "interpret", "gpu", "tpu", "tpu_interpret")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block(dim: int, preferred: int, align: int) -> tuple[int, int]:
  """(block, padded dim): `preferred` if it tiles `dim`, else the whole (aligned) dim when small."""
  if dim % preferred == 0:
    return preferred, dim
  if dim <= preferred:
    padded = _round_up(dim, align)
    return padded, padded
  return preferred, _round_up(dim, preferred)


def _resolve(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
  if backend == "auto":
    platform = jax.default_backend()
    return platform if platform in ("gpu", "tpu") else "reference"
  return backend


def w4a6_matmul(x: jax.Array, qw: QuantizedWeight, bias: jax.Array | None = None, *,
                act_bits: int = 6, backend: str = "auto", block_m: int = 128,
                block_n: int = 128, block_k: int = 256) -> jax.Array:
  """y = Q_a(x) · Ŵ + bias for x (..., K); integer math with int32 accumulation, returns x.dtype.

  Activations are quantized per token (row) to `act_bits`, symmetric, held in
  int8; the weight's per-channel scales, the activation scales and the bias
  are applied to the int32 accumulator in the epilogue.
  """
  check_bits(act_bits, "act_bits")
  backend = _resolve(backend)
  if x.shape[-1] != qw.in_features:
    raise ValueError(f"x has {x.shape[-1]} features, the weight expects {qw.in_features}")
  if bias is not None and bias.shape != (qw.out_features,):
    raise ValueError(f"bias must have shape ({qw.out_features},), got {bias.shape}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  out = _matmul_2d(x2, qw, bias, act_bits, backend, block_m, block_n, block_k)
  return out.reshape(*lead, qw.out_features)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _matmul_2d(x, qw, bias, act_bits, backend, block_m, block_n, block_k):
  codes, scales = reference.quantize_activations(x, act_bits)
  if backend == "reference":
    return reference.matmul(codes, scales, qw, bias, x.dtype)
  m, k = x.shape
  n = qw.out_features
  bm, mp = _block(m, block_m, 8)
  bn, np_ = _block(n, block_n, 8)
  bk, kp = _block(k, block_k, 2)
  # Zero padding is exact: padded codes contribute 0 to every dot product.
  codes = jnp.pad(codes, ((0, mp - m), (0, kp - k)))
  scales = jnp.pad(scales, ((0, mp - m), (0, 0)), constant_values=1.0)
  kw = (kp - k) // 2 if qw.packed else kp - k
  # A zero byte unpacks to code -8: pad packed weights with 0x88 (codes 0, 0) instead.
  w = jnp.pad(qw.data, ((0, np_ - n), (0, kw)), constant_values=0x88 if qw.packed else 0)
  w_scales = jnp.pad(qw.scales, (0, np_ - n)).reshape(1, -1)
  b = jnp.zeros((1, np_), jnp.float32) if bias is None else \
      jnp.pad(bias.astype(jnp.float32), (0, np_ - n)).reshape(1, -1)
  kernel = pallas_tpu.matmul if backend.startswith("tpu") else pallas_gpu.matmul
  out = kernel(codes, scales, w, w_scales, b, packed=qw.packed, out_dtype=x.dtype,
               block_m=bm, block_n=bn, block_k=bk,
               interpret=backend in ("interpret", "tpu_interpret"))
  return out[:m, :n]
