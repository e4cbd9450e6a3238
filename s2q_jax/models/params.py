"""Flat {dotted path: array} views of an NNX model's parameters."""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
  """{dotted path: value} of every `nnx.Param` of the model."""
  state = nnx.state(model, nnx.Param)
  return {_dotted(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  return {k: (tuple(v.shape), v.dtype) for k, v in flat_params(model).items()}


def load_flat_params(model: nnx.Module, params: Mapping[str, jax.Array | np.ndarray]) -> None:
  """Assigns {dotted path: array} into the model in place; keys and shapes must match exactly."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  expected = {_dotted(path) for path, _ in flat}
  missing, unexpected = sorted(expected - set(params)), sorted(set(params) - expected)
  if missing or unexpected:
    raise KeyError(f"parameter mismatch: missing {missing}, unexpected {unexpected}")
  for path, var in flat:
    value = params[_dotted(path)]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"{_dotted(path)}: shape {tuple(value.shape)} != {tuple(var.shape)}")
    var.set_value(jax.numpy.asarray(value, dtype=var.dtype))
  nnx.update(model, state)
