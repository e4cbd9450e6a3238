"""Feed-forwards and adaLN modulations shared by HunyuanVideo's blocks."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.layers import LayerNorm, Linear


class FeedForward(nnx.Module):
  """diffusers' `FeedForward`: proj_in (`net.0.proj`) → activation → proj_out (`net.2`)."""

  def __init__(self, dim: int, hidden: int, activation: Callable[[jax.Array], jax.Array], *,
               dtype, rngs: nnx.Rngs):
    self.activation = activation
    self.proj_in = Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.proj_out = Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(self.activation(self.proj_in(x)))


class AdaLayerNormZero(nnx.Module):
  """LayerNorm without affine weights, shifted and scaled by vectors computed from temb.

  `chunks=6` is diffusers' `AdaLayerNormZero` (shift, scale, gate of the
  attention, then of the MLP), `chunks=3` its `AdaLayerNormZeroSingle`.
  """

  def __init__(self, dim: int, chunks: int, *, dtype, rngs: nnx.Rngs):
    self.chunks = chunks
    self.linear = Linear(dim, chunks * dim, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)

  def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, ...]:
    """(B, S, dim) x, (B, dim) temb → (modulated x, gate, *the MLP's shift, scale, gate),
    the vectors as (B, 1, dim)."""
    shift, scale, *rest = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], self.chunks,
                                    axis=-1)
    return (self.norm(x) * (1 + scale) + shift, *rest)


class AdaLayerNormContinuous(nnx.Module):
  """diffusers' `AdaLayerNormContinuous` before the output projection (scale first, then shift)."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear = Linear(dim, 2 * dim, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
    return self.norm(x) * (1 + scale) + shift


class AdaGates(nnx.Module):
  """diffusers' `HunyuanVideoAdaNorm` (the refiner's `norm_out`): despite its name, no
  normalisation, only the attention and MLP gates computed from temb."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear = Linear(dim, 2 * dim, dtype=dtype, rngs=rngs)

  def __call__(self, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate_attn, gate_mlp = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
    return gate_attn, gate_mlp
