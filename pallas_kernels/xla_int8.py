"""`xla_int8` back-end: XLA's own int8 × int8 → int32 dot on (N, K) int8 weights.

This is the floor every fused kernel has to beat (`../shared/DESIGN.md` §6: on
one H100 it measured 1.3–1.7× XLA bf16 at video-DiT shapes): no custom kernel,
just the weight codes unpacked ahead of time to int8 in PyTorch's (N, K)
layout, because int8 tensor-core paths want both operands K-major and XLA's
int8 dot was measured 1.3–1.7× faster with (N, K) weights than with (K, N).

Weights should arrive unpacked (`QuantizedWeight.unpacked()`, done once at
load by `s2q_jax.deploy`): a packed weight is unpacked inside the program on
every call, which is correct but costs a pass over the weights. The epilogue
(per-token × per-channel scales, bias, cast) is in the same jitted program as
the dot, so XLA may fuse it into the dot's output; its float32 math is the
reference's, so the outputs are identical to `reference`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.weights import QuantizedWeight, unpack_codes

_NT = (((1,), (1,)), ((), ()))  # contract K, the last dim of both operands


def matmul(x_codes: jax.Array, x_scales: jax.Array, qw: QuantizedWeight,
           bias: jax.Array | None, out_dtype) -> jax.Array:
  """(M, K) int8 codes, (M, 1) float32 scales × `qw` → (M, N) `out_dtype`."""
  w = unpack_codes(qw)  # no-op for an unpacked weight
  acc = jax.lax.dot_general(x_codes, w, _NT, preferred_element_type=jnp.int32)
  return reference.epilogue(acc, x_scales, qw.scales, bias, out_dtype)
