"""A linear layer quantized separately for each range of denoising timesteps (ViDiT-Q).

Channel imbalance of a DiT's activations moves with the timestep, so one
smoothing vector fits no step well. `TimestepRangeLinear` holds one
`QuantLinear` per timestep range, all sharing the full-precision kernel and
bias but each with its own smoothing and therefore its own integer codes; it
runs the one whose range holds each sample's timestep, read from the model's
`step_context` (which `CogVideoXTransformer3D.embed` fills). The price is
one set of codes per range in the checkpoint, which the storage report shows.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def ensure_step_context(model: nnx.Module) -> nnx.Variable:
  """The model's shared timestep Variable, created on first use."""
  if model.step_context is None:
    model.step_context = nnx.Variable(jnp.zeros((1,), jnp.float32))
  return model.step_context


def range_index(timesteps: jax.Array, boundaries: Sequence[float]) -> jax.Array:
  """Index of the range holding each timestep; range i is [boundaries[i-1], boundaries[i])."""
  return jnp.searchsorted(jnp.asarray(boundaries, jnp.float32), timesteps, side="right")


class TimestepRangeLinear(nnx.Module):
  """Per-timestep-range layers (any `nnx.Module` taking x); picks one per sample."""

  def __init__(self, layers: Sequence[nnx.Module], boundaries: Sequence[float],
               step_context: nnx.Variable):
    if len(layers) != len(boundaries) + 1:
      raise ValueError(f"{len(layers)} layers need {len(layers) - 1} boundaries, "
                       f"got {len(boundaries)}")
    self.ranges = nnx.List(layers)
    self.boundaries = tuple(float(b) for b in boundaries)
    self.step_context = step_context

  def __call__(self, x: jax.Array) -> jax.Array:
    # Every range's output is computed and one kept per sample: a sampler batch has one
    # timestep, but calibration batches mix them, and `where` keeps both cases in one trace.
    index = range_index(self.step_context[...], self.boundaries)
    outs = [layer(x) for layer in self.ranges]
    if x.shape[0] != index.shape[0]:
      raise ValueError(f"input batch {x.shape[0]} differs from the {index.shape[0]} timesteps "
                       "the model last saw: call the model, not the block, with this layer")
    index = index.reshape((-1,) + (1,) * (x.ndim - 1))
    y = outs[0]
    for i, out in enumerate(outs[1:], start=1):
      y = jnp.where(index == i, out, y)
    return y
