"""Orthogonal rotations that fold into linear layers (Hadamard, QuaRot/FlatQuant-style).

A rotation R (K, K) spreads outlier channels over all channels before
per-token activation quantization and changes nothing in full precision:
x W = (x R)(Rᵀ W). The convention matches `QuantLinear`: activations are
multiplied by R, the kernel (K_in, N_out) by Rᵀ from the left.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST  # a bf16-pass fold would perturb the weights it quantizes


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _hartley(m: int) -> np.ndarray:
  """Unnormalised discrete Hartley matrix cas(2πij/m): C Cᵀ = m I for every m."""
  angle = 2 * np.pi * np.outer(np.arange(m), np.arange(m)) / m
  return np.cos(angle) + np.sin(angle)


def hadamard_matrix(n: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Orthogonal (n, n) matrix with near-equal entry magnitudes, symmetric (so R⁻¹ = R).

  n = 2^k · m with m odd. For m = 1 this is the Sylvester Hadamard matrix
  divided by √n (entries ±1/√n). Otherwise it is the Kronecker product of
  the 2^k Sylvester matrix with the m-point discrete Hartley matrix, both
  normalised: it mixes every channel with every other (a block-diagonal of
  2^k Hadamards would mix only within blocks), and its entries stay within
  1.37/√n for m = 3 and √2/√n for any m (a true Hadamard matrix would give
  exactly 1/√n, but none exists for many n, e.g. 1920 = 2^7·15 is not
  covered by the standard constructions). Built in float64 with numpy
  because n is static; the result is a constant inside jit.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"hadamard_matrix: n must be a positive integer, got {n!r}")
  power = n & -n  # largest power of two dividing n
  m = n // power
  rot = np.kron(_sylvester(power), _hartley(m)) / np.sqrt(n)
  return jnp.asarray(rot, dtype)


def _check(kernel_dim: int, rot: jax.Array, what: str) -> None:
  if rot.ndim != 2 or rot.shape != (kernel_dim, kernel_dim):
    raise ValueError(f"{what}: rotation {rot.shape} does not match dimension {kernel_dim}")


def rotate_linear(kernel: jax.Array, rot: jax.Array) -> jax.Array:
  """Rᵀ W for a kernel (K_in, N_out): the layer then takes rotated inputs x R."""
  _check(kernel.shape[0], rot, "rotate_linear")
  return jnp.matmul(rot.T.astype(jnp.float32), kernel.astype(jnp.float32),
                    precision=_HIGHEST).astype(kernel.dtype)


def rotate_output(kernel: jax.Array, bias: jax.Array | None, rot: jax.Array
                  ) -> tuple[jax.Array, jax.Array | None]:
  """(W R, b R): the layer emits rotated outputs y R, so the next linear layer

  (its kernel passed through `rotate_linear`) needs no online rotation. Exact
  only if nothing between the two layers mixes channels non-linearly.
  """
  _check(kernel.shape[1], rot, "rotate_output")
  r = rot.astype(jnp.float32)
  w = jnp.matmul(kernel.astype(jnp.float32), r, precision=_HIGHEST).astype(kernel.dtype)
  if bias is None:
    return w, None
  return w, jnp.matmul(bias.astype(jnp.float32), r, precision=_HIGHEST).astype(bias.dtype)
