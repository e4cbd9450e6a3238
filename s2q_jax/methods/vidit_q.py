"""ViDiT-Q: timestep-aware channel balancing, optional Hadamard rotation, no training.

For every quantized layer with quantized activations, the calibration
samples (uniformly spaced over the denoising steps) are split into
`vidit_q.timestep_ranges` ranges of equal step count, and each range gets its
own SmoothQuant-style balancing vector

    s_j = max|X_j|^α / max|W_j|^(1-α)      (clamped to [1e-2, 1e2])

from the full-precision activations of that range. The layer becomes a
`TimestepRangeLinear`: one set of codes per range, chosen by the sampler's
timestep. Weights are rounded to nearest per output channel; activations
are quantized per token at run time.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.calibration.capture import recorded_batches
from s2q_jax.calibration.pool import Pool
from s2q_jax.methods.calibration_data import calibration_data, uniform_positions
from s2q_jax.quant.rotation import hadamard_matrix
from s2q_jax.quant.apply import quantized_layers, replace_module
from s2q_jax.quant.qlinear import QuantLinear, Rotation, SmoothScale
from s2q_jax.quant.timestep_ranges import TimestepRangeLinear, ensure_step_context, range_index


def timestep_boundaries(timesteps: np.ndarray, num_ranges: int) -> list[float]:
  """Boundaries splitting the distinct calibration timesteps into ranges of equal count."""
  steps = np.unique(timesteps)
  if num_ranges < 1 or num_ranges > len(steps):
    raise ValueError(f"vidit_q.timestep_ranges={num_ranges} must be between 1 and the "
                     f"{len(steps)} distinct calibration timesteps")
  groups = np.array_split(steps, num_ranges)
  return [float(g[0]) for g in groups[1:]]


def channel_absmax_per_range(fp_model: nnx.Module, paths: set[str], data: Pool,
                             boundaries: list[float]) -> dict[str, np.ndarray]:
  """{layer path: (R, K) max |x| of each input channel over each range's samples}."""
  ranges = np.asarray(range_index(jnp.asarray(data.timesteps, jnp.float32), boundaries))
  out: dict[str, np.ndarray] = {}
  for sl, inputs in recorded_batches(fp_model, paths, data):
    for path, xs in inputs.items():
      for x in xs:
        per_sample = np.abs(np.asarray(x)).reshape(x.shape[0], -1, x.shape[-1]).max(axis=1)
        acc = out.setdefault(path, np.zeros((len(boundaries) + 1, x.shape[-1]), np.float32))
        np.maximum.at(acc, ranges[sl], per_sample)
  return out


def balancing_vector(x_absmax: np.ndarray, kernel: jax.Array, alpha: float) -> jax.Array:
  w_max = jnp.abs(kernel.astype(jnp.float32)).max(axis=1)
  return jnp.clip(jnp.asarray(x_absmax) ** alpha / jnp.maximum(w_max, 1e-8) ** (1 - alpha),
                  1e-2, 1e2)


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  del workdir, mesh  # nothing is trained, so nothing to checkpoint or shard
  data, selection = calibration_data(pool, uniform_positions(pool, cfg), cfg)
  boundaries = timestep_boundaries(data.timesteps, cfg.vidit_q.timestep_ranges)
  layers = [(p, l) for p, l in quantized_layers(q_model) if l.a_bits is not None]
  log(f"  activation ranges of {len(layers)} layers over {len(data)} samples, "
      f"{len(boundaries) + 1} timestep ranges (boundaries {boundaries})")
  absmax = channel_absmax_per_range(fp_model, {p for p, _ in layers}, data, boundaries)
  context = ensure_step_context(q_model)
  for path, layer in layers:
    per_range = []
    for r in range(len(boundaries) + 1):
      sub = QuantLinear(layer, w_bits=layer.w_bits, a_bits=layer.a_bits)
      sub.smooth = SmoothScale(balancing_vector(absmax[path][r], layer.kernel[...],
                                                cfg.vidit_q.alpha))
      if cfg.vidit_q.rotation:
        sub.rotation = Rotation(hadamard_matrix(layer.in_features))
      per_range.append(sub)
    replace_module(q_model, path, TimestepRangeLinear(per_range, boundaries, context))
  return {"num_candidates": len(pool), "selection": selection,
          "timestep_boundaries": boundaries, "balanced_layers": len(layers)}
