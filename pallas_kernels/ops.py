"""`w4a6_matmul`: per-token activation quantization + low-bit integer matmul, any back-end;
`int8_matmul`: the same on activations already quantized by their producer."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels import autotune, mosaic_gpu, pallas_gpu, pallas_tpu, reference, xla_int8
from pallas_kernels.bits import check_bits
from pallas_kernels.weights import QuantizedWeight, unpack_codes

BACKENDS = ("auto", "reference", "xla_int8", "interpret", "gpu", "mosaic_gpu",
            "mosaic_gpu_interpret", "tpu", "tpu_interpret")
# Preferred tiles of each Pallas kernel, clamped to the problem by the kernel.
_TILES = {"gpu": pallas_gpu.DEFAULT_TILES, "interpret": pallas_gpu.DEFAULT_TILES,
          "mosaic_gpu": mosaic_gpu.DEFAULT_TILES, "mosaic_gpu_interpret": mosaic_gpu.DEFAULT_TILES,
          "tpu": pallas_tpu.DEFAULT_TILES, "tpu_interpret": pallas_tpu.DEFAULT_TILES}
_INTERPRETED = ("interpret", "mosaic_gpu_interpret", "tpu_interpret")


def resolve_backend(backend: str, problem: autotune.Problem | None = None) -> str:
  """The back-end `backend` runs on here; `auto` is measured per problem (see `autotune`).

  Without a `problem`, `auto` can only be resolved where nothing is measured
  (a pin, or CPU).
  """
  return _resolve(backend, problem).backend


def _resolve(backend: str, problem: autotune.Problem | None) -> autotune.Choice:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
  if backend != "auto":
    return autotune.Choice(backend)
  if problem is None:
    if os.environ.get(autotune.PIN_ENV) or not autotune.candidates(jax.default_backend()):
      return autotune.choose(None)
    raise ValueError("backend='auto' on an accelerator is chosen per shape: pass the problem")
  return autotune.choose(problem)


def w4a6_matmul(x: jax.Array, qw: QuantizedWeight, bias: jax.Array | None = None, *,
                act_bits: int = 6, act_clip: jax.Array | None = None, backend: str = "auto",
                out_dtype=None, block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None) -> jax.Array:
  """y = Q_a(x) · Ŵ + bias for x (..., K); integer math with int32 accumulation.

  Activations are quantized per token (row) to `act_bits`, symmetric, held in
  int8 (`act_clip`, a learned factor in (0, 1], maps that fraction of each
  token's absmax onto the top code); the weight's per-channel scales, the
  activation scales and the bias are applied to the int32 accumulator in the
  float32 epilogue, which writes `out_dtype` (default x.dtype) directly.
  `block_*` override a Pallas kernel's preferred tiles (block_k counts K, not
  packed bytes); each kernel shrinks or pads them to what its hardware accepts.
  """
  check_bits(act_bits, "act_bits")
  _check(x.shape[-1], qw, bias)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  x2 = x.reshape(-1, x.shape[-1])
  choice, tiles = _choose(backend, x2.shape[0], qw, act_bits, jnp.dtype(x.dtype).name, out_dtype,
                          block_m, block_n, block_k)
  clip = None if act_clip is None else jnp.asarray(act_clip, jnp.float32).reshape(())
  out = _matmul_2d(x2, qw, bias, clip, act_bits, choice.backend, out_dtype, tiles)
  return _finish(out, choice.backend).reshape(*x.shape[:-1], qw.out_features)


def int8_matmul(codes: jax.Array, scales: jax.Array, qw: QuantizedWeight,
                bias: jax.Array | None = None, *, out_dtype, act_bits: int = 6,
                backend: str = "auto", block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None) -> jax.Array:
  """The matmul half of `w4a6_matmul`, for activations quantized by their producer.

  `codes` (..., K) int8 and `scales` (..., 1) float32 are what
  `reference.quantize_activations` returns for the layer's input; computing
  them inside the producer's XLA fusion (norm + modulation, GELU) saves the
  read and write of a full-size activation (see `s2q_jax.fused_quant`).
  `act_bits` only keys the autotuner's measurements.
  """
  check_bits(act_bits, "act_bits")
  _check(codes.shape[-1], qw, bias)
  if codes.dtype != jnp.int8 or scales.shape != (*codes.shape[:-1], 1):
    raise ValueError(f"expected int8 codes (..., K) and float32 scales (..., 1), got "
                     f"{codes.dtype} {codes.shape} and {scales.shape}")
  out_dtype = jnp.dtype(out_dtype)
  c2, s2 = codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, 1).astype(jnp.float32)
  choice, tiles = _choose(backend, c2.shape[0], qw, act_bits, out_dtype.name, out_dtype,
                          block_m, block_n, block_k)
  out = _codes_matmul_2d(c2, s2, qw, bias, choice.backend, out_dtype, tiles)
  return _finish(out, choice.backend).reshape(*codes.shape[:-1], qw.out_features)


def _check(k: int, qw: QuantizedWeight, bias: jax.Array | None) -> None:
  if k != qw.in_features:
    raise ValueError(f"x has {k} features, the weight expects {qw.in_features}")
  if bias is not None and bias.shape != (qw.out_features,):
    raise ValueError(f"bias must have shape ({qw.out_features},), got {bias.shape}")


def _choose(backend, m, qw, act_bits, x_dtype, out_dtype, block_m, block_n, block_k):
  """(back-end choice, its tiles as a static tuple) for an (m, K) × `qw` problem."""
  problem = autotune.Problem(m, qw.in_features, qw.out_features, qw.bits, qw.packed, act_bits,
                             x_dtype, out_dtype.name)
  choice = _resolve(backend, problem)
  given = dict(block_m=block_m, block_n=block_n, block_k=block_k)
  tiles = {**_TILES.get(choice.backend, {}), **(choice.tiles or {}),
           **{k: v for k, v in given.items() if v is not None}}
  return choice, tuple(sorted(tiles.items()))


def _finish(out: jax.Array, backend: str) -> jax.Array:
  if backend in ("tpu_interpret", "mosaic_gpu_interpret") and not isinstance(
      out, jax.core.Tracer):
    # The TPU and GPU interpret modes run JAX ops from host callbacks; if the caller
    # dispatches more eager work while they run, both can wait on each other. Finish first.
    out.block_until_ready()
  return out


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _matmul_2d(x, qw, bias, act_clip, act_bits, backend, out_dtype, tiles):
  # Quantized once, by XLA, for every back-end: identical codes everywhere, and
  # fusing it into the kernel would redo it for every N tile.
  codes, scales = reference.quantize_activations(x, act_bits, act_clip)
  return _codes_matmul_2d(codes, scales, qw, bias, backend, out_dtype, tiles)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _codes_matmul_2d(codes, scales, qw, bias, backend, out_dtype, tiles):
  if backend == "reference":
    return reference.matmul(codes, scales, qw, bias, out_dtype)
  if backend == "xla_int8":
    return xla_int8.matmul(codes, scales, qw, bias, out_dtype)
  b = jnp.zeros(qw.out_features, jnp.float32) if bias is None else bias.astype(jnp.float32)
  if backend.startswith("mosaic_gpu"):  # int8 (N, K) codes only: a packed weight is unpacked here
    return mosaic_gpu.matmul(codes, scales, unpack_codes(qw), qw.scales, b, out_dtype=out_dtype,
                             interpret=backend in _INTERPRETED, **dict(tiles))
  if qw.packed:  # even-k columns meet the low nibbles, odd-k the high ones
    x_parts = (codes[:, 0::2], codes[:, 1::2])
    w = jax.lax.bitcast_convert_type(qw.data, jnp.int8)
  else:
    x_parts, w = (codes,), qw.data
  kernel = pallas_tpu.matmul if backend.startswith("tpu") else pallas_gpu.matmul
  return kernel(x_parts, scales, w, qw.scales, b, packed=qw.packed, out_dtype=out_dtype,
                interpret=backend in _INTERPRETED, **dict(tiles))
