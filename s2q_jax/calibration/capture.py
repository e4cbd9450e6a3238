"""Recording what each linear layer receives, without touching the model's code."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import jax
from flax import nnx

from s2q_jax.quant.apply import iter_linears, replace_module


class LayerInput(nnx.Variable):
  """Inputs seen by a layer during a recorded call."""


class _Recorder(nnx.Module):
  def __init__(self, layer: nnx.Module, transform: bool):
    self.layer, self.transform = layer, transform
    # A Variable, not a Python list: under nnx.jit its new value leaves the trace
    # as a state update, where a list would keep tracers.
    self.inputs = LayerInput(())

  def __call__(self, x: jax.Array) -> jax.Array:
    # For quantized layers record what is quantized: the smoothed / rotated input.
    seen = self.layer.transform_input(x) if self.transform else x
    self.inputs.set_value(self.inputs.get_value() + (seen,))
    return self.layer(x)

  def take(self) -> list[jax.Array]:
    """The inputs recorded since the last take; empties the record."""
    seen = list(self.inputs.get_value())
    self.inputs.set_value(())
    return seen


@contextlib.contextmanager
def recording(model: nnx.Module, paths: set[str] | None = None, *, transformed: bool = True
              ) -> Iterator[Callable[[], dict[str, list[jax.Array]]]]:
  """Within the block, calls of the chosen linears (default: all) record their inputs.

  Yields `collect()`, which returns {layer path: [inputs recorded since the
  last collect]}. Quantized layers record the input after their transforms
  (what is quantized), or the raw input if not `transformed`. Run the model
  eagerly (or under `nnx.jit`) inside the block; the original layers are put
  back on exit.
  """
  targets = [(p, m) for p, m in iter_linears(model) if paths is None or p in paths]
  recorders = {p: _Recorder(m, transformed and hasattr(m, "transform_input"))
               for p, m in targets}
  for p, r in recorders.items():
    replace_module(model, p, r)

  def collect() -> dict[str, list[jax.Array]]:
    return {p: r.take() for p, r in recorders.items()}

  try:
    yield collect
  finally:
    for p, m in targets:
      replace_module(model, p, m)


def recorded_batches(model: nnx.Module, paths: set[str], pool, batch: int = 8):
  """Runs `model` on `pool` (a `calibration.pool.Pool`) in batches; yields (slice, inputs).

  `inputs` is {layer path: [inputs recorded during that batch]}, so callers can reduce
  each batch to statistics instead of keeping every activation.
  """
  with recording(model, paths) as collect:
    for i in range(0, len(pool), batch):
      sl = slice(i, i + batch)
      model.denoise(pool.latents[sl], pool.conditions[sl], pool.timesteps[sl])
      yield sl, collect()
