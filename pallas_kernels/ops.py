"""`w4a6_matmul`: per-token activation quantization + low-bit integer matmul, any back-end."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_gpu, pallas_tpu, reference
from pallas_kernels.bits import check_bits
from pallas_kernels.weights import QuantizedWeight

BACKENDS = ("auto", "reference", "interpret", "gpu", "tpu", "tpu_interpret")


def resolve_backend(backend: str) -> str:
  """The back-end `backend` runs on here: `auto` is gpu/tpu by platform, else reference."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
  if backend == "auto":
    platform = jax.default_backend()
    return platform if platform in ("gpu", "tpu") else "reference"
  return backend


def w4a6_matmul(x: jax.Array, qw: QuantizedWeight, bias: jax.Array | None = None, *,
                act_bits: int = 6, act_clip: jax.Array | None = None, backend: str = "auto",
                block_m: int = 128, block_n: int = 128, block_k: int = 256) -> jax.Array:
  """y = Q_a(x) · Ŵ + bias for x (..., K); integer math with int32 accumulation, returns x.dtype.

  Activations are quantized per token (row) to `act_bits`, symmetric, held in
  int8 (`act_clip`, a learned factor in (0, 1], maps that fraction of each
  token's absmax onto the top code); the weight's per-channel scales, the
  activation scales and the bias are applied to the int32 accumulator in the
  epilogue. `block_*` are the
  kernel's preferred tiles (block_k counts K, not packed bytes); each back-end
  shrinks or pads them to what its hardware accepts.
  """
  check_bits(act_bits, "act_bits")
  backend = resolve_backend(backend)
  if x.shape[-1] != qw.in_features:
    raise ValueError(f"x has {x.shape[-1]} features, the weight expects {qw.in_features}")
  if bias is not None and bias.shape != (qw.out_features,):
    raise ValueError(f"bias must have shape ({qw.out_features},), got {bias.shape}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  clip = None if act_clip is None else jnp.asarray(act_clip, jnp.float32).reshape(())
  out = _matmul_2d(x2, qw, bias, clip, act_bits, backend, block_m, block_n, block_k)
  if backend == "tpu_interpret" and not isinstance(out, jax.core.Tracer):
    # TPU interpret mode runs JAX ops from host callbacks; if the caller dispatches more
    # eager work while they run, both can wait on each other. Finish the call first.
    out.block_until_ready()
  return out.reshape(*lead, qw.out_features)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _matmul_2d(x, qw, bias, act_clip, act_bits, backend, block_m, block_n, block_k):
  # Quantized once, by XLA, for every back-end: identical codes everywhere, and
  # fusing it into the kernel would redo it for every N tile.
  codes, scales = reference.quantize_activations(x, act_bits, act_clip)
  if backend == "reference":
    return reference.matmul(codes, scales, qw, bias, x.dtype)
  if qw.packed:  # even-k columns meet the low nibbles, odd-k the high ones
    x_parts = (codes[:, 0::2], codes[:, 1::2])
    w = jax.lax.bitcast_convert_type(qw.data, jnp.int8)
  else:
    x_parts, w = (codes,), qw.data
  b = jnp.zeros(qw.out_features, jnp.float32) if bias is None else bias.astype(jnp.float32)
  kernel = pallas_tpu.matmul if backend.startswith("tpu") else pallas_gpu.matmul
  return kernel(x_parts, scales, w, qw.scales, b, packed=qw.packed, out_dtype=x.dtype,
                block_m=block_m, block_n=block_n, block_k=block_k,
                interpret=backend in ("interpret", "tpu_interpret"))
