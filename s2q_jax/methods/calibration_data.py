"""The model inputs a method calibrates on: chosen pool positions and their null-prompt twins.

Under classifier-free guidance (g > 1) every sampler step runs the model on
the conditional and the null-prompt input, and the guided prediction
amplifies the errors of both (v_u + g (v_c − v_u)). So, with
`calib.uncond` (the default, as the official ViDiT-Q / Q-VDiT code does),
each chosen position contributes both inputs and `calib.num_samples` counts
model inputs: num_samples / 2 positions.
"""
from __future__ import annotations

import numpy as np

from s2q_jax.calibration import select_indices
from s2q_jax.calibration.pool import Pool
from s2q_jax.errors import UserError


def uses_uncond(cfg, pool: Pool) -> bool:
  """Whether calibration includes the null-prompt inputs: only those the sampler ran
  (`Pool.sampled_uncond`; not for a model that embeds its guidance)."""
  return bool(cfg.calib.uncond) and pool.sampled_uncond


def num_positions(cfg, pool: Pool) -> int:
  """How many pool positions give `calib.num_samples` model inputs."""
  n, pool_size = cfg.calib.num_samples, len(pool)
  if uses_uncond(cfg, pool):
    if n % 2:
      raise UserError(f"calib.num_samples={n} must be even with calib.uncond=True: each chosen "
                      "step gives its conditional and its null-prompt input")
    n //= 2
  if not 1 <= n <= pool_size:
    raise UserError(f"calib.num_samples={cfg.calib.num_samples} needs {n} of the pool's "
                    f"{pool_size} positions: raise calib.num_prompts or lower calib.num_samples")
  return n


def uniform_positions(pool: Pool, cfg) -> np.ndarray:
  """Positions evenly spaced over the pool (every step, prompts in turn)."""
  return select_indices(None, num_positions(cfg, pool), "uniform", pool_size=len(pool))


def calibration_data(pool: Pool, positions: np.ndarray, cfg) -> tuple[Pool, dict]:
  """(model inputs, the report's `selection` entry) for the chosen pool positions."""
  data = pool.model_inputs(positions, uses_uncond(cfg, pool))
  num_steps = int(pool.steps.max()) + 1
  summary = {"positions": np.asarray(positions).tolist(),
             "step_histogram": np.bincount(data.steps, minlength=num_steps).tolist(),
             "uncond": len(data) - len(positions)}
  return data, summary
