"""GPTQ rounding (Frantar et al. 2023) of one linear layer for fixed per-channel scales.

Input channels are quantized one at a time; each one's rounding error is
spread over the not-yet-quantized channels through the inverse Hessian of
the layer reconstruction loss, H = Σ xᵀx over the calibration tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.bits import qrange


def accumulate_hessian(h: jax.Array | None, x: jax.Array) -> jax.Array:
  """h + xᵀx for a batch of layer inputs x (..., K), in float32."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  hx = x.T @ x
  return hx if h is None else h + hx


@functools.partial(jax.jit, static_argnames=("bits", "percdamp"))
def gptq_quantize(w: jax.Array, h: jax.Array, scales: jax.Array, *, bits: int,
                  percdamp: float = 0.01) -> jax.Array:
  """Integer codes (K, N) int8 for a (K, N) kernel w, given H (K, K) and scales (N,).

  With H diagonal (uncorrelated inputs) this is exactly round-to-nearest.
  """
  lo, hi = qrange(bits)
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  k = h.shape[0]
  dead = jnp.diag(h) == 0  # channels that never see input: any code is exact
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[:, None], 0.0, w)
  damp = percdamp * jnp.mean(jnp.diag(h))
  h = h + damp * jnp.eye(k)
  # Upper Cholesky factor of H⁻¹: row i holds the error-propagation weights of channel i.
  u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T

  def step(w, i):
    row = w[i]
    q = jnp.clip(jnp.round(row / scales), lo, hi)
    err = (row - q * scales) / u[i, i]
    later = (jnp.arange(k) > i)[:, None]
    w = w - jnp.where(later, u[i][:, None] * err[None, :], 0.0)
    return w, q

  _, codes = jax.lax.scan(step, w, jnp.arange(k))
  return codes.astype(jnp.int8)
