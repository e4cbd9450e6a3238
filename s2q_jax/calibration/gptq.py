"""GPTQ rounding (Frantar et al. 2023) of one linear layer for fixed per-channel scales.

Input channels are quantized one at a time; each one's rounding error is
spread over the not-yet-quantized channels through the inverse Hessian of
the layer reconstruction loss, H = Σ xᵀx over the calibration tokens. The
scales are fixed beforehand (min-max or learned clipping), so only the
integer codes are chosen here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.bits import qrange

_HIGHEST = jax.lax.Precision.HIGHEST  # TF32/bf16 passes would blur H and the error feedback


def accumulate_hessian(h: jax.Array | None, x: jax.Array) -> jax.Array:
  """h + xᵀx for a batch of layer inputs x (..., K), in float32; h=None starts at zero."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  hx = jnp.matmul(x.T, x, precision=_HIGHEST)
  return hx if h is None else h + hx


def _round(w, scales, lo, hi):
  safe = jnp.where(scales > 0, scales, 1.0)
  return jnp.where(scales > 0, jnp.clip(jnp.round(w / safe), lo, hi), 0.0)


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "percdamp", "act_order"))
def gptq_quantize(w: jax.Array, h: jax.Array, scales: jax.Array, *, bits: int,
                  block_size: int = 128, percdamp: float = 0.01,
                  act_order: bool = False) -> jax.Array:
  """Integer codes (K, N) int8 in [−2^(b−1), 2^(b−1) − 1] for a Flax kernel w (K, N).

  Args:
    w: kernel (K_in, N_out); dequantized weight is codes * scales.
    h: Σ xᵀx (K, K) over the calibration inputs (see `accumulate_hessian`).
    scales: per output channel (N,); a zero scale gives zero codes.
    bits: weight bit width.
    block_size: input channels per lazy-update block (K need not divide).
    percdamp: damping added to H's diagonal, as a fraction of its mean.
    act_order: quantize input channels in order of decreasing H diagonal.

  With H diagonal (uncorrelated inputs) this is exactly round-to-nearest.
  """
  k, n = w.shape
  if h.shape != (k, k) or scales.shape != (n,):
    raise ValueError(f"gptq_quantize: w {w.shape} needs h ({k}, {k}) and scales ({n},), "
                     f"got {h.shape} and {scales.shape}")
  lo, hi = qrange(bits)
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  scales = scales.astype(jnp.float32)
  if act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
    w, h = w[perm], h[perm][:, perm]

  # Pad K to whole blocks with dead channels; they take no error and get code 0.
  pad = -k % block_size
  kp = k + pad
  w = jnp.pad(w, ((0, pad), (0, 0)))
  h = jnp.pad(h, ((0, pad), (0, pad)))
  dead = jnp.diag(h) == 0  # channels that never see input: any code is exact
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  live = jnp.maximum(jnp.sum(~dead[:k]), 1)
  damp = percdamp * jnp.sum(jnp.where(dead, 0.0, jnp.diag(h))) / live
  h = h + damp * jnp.eye(kp)
  # Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i holds how channel i's
  # error moves the channels after it, with the earlier ones already fixed.
  u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
  rows = jnp.arange(block_size)

  def block(w, b):
    start = b * block_size
    wb = jax.lax.dynamic_slice_in_dim(w, start, block_size, 0)
    ub = jax.lax.dynamic_slice(u, (start, start), (block_size, block_size))

    def column(wb, i):
      q = _round(wb[i], scales, lo, hi)
      err = (wb[i] - q * scales) / ub[i, i]
      wb = wb - jnp.where((rows > i)[:, None], ub[i][:, None] * err[None, :], 0.0)
      return wb, (q, err)

    _, (q, err) = jax.lax.scan(column, wb, rows)
    # Lazy batch update: the block's errors reach all later channels in one matmul.
    u_rows = jax.lax.dynamic_slice_in_dim(u, start, block_size, 0)
    later = (jnp.arange(kp) >= start + block_size)[:, None]
    w = w - jnp.where(later, jnp.matmul(u_rows.T, err, precision=_HIGHEST), 0.0)
    return w, q

  # Codes come out as scan outputs rather than updates of a fresh buffer: a
  # buffer made here would not carry the inputs' (explicit) mesh sharding.
  _, codes = jax.lax.scan(block, w, jnp.arange(kp // block_size))
  codes = codes.reshape(kp, n)[:k]
  if act_order:
    codes = codes[jnp.argsort(perm)]
  return codes.astype(jnp.int8)
