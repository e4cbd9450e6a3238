"""Flow-matching Euler sampling (diffusers' `FlowMatchEulerDiscreteScheduler`) in JAX.

Rectified flow: x_σ = (1 − σ) x₀ + σ ε and the model predicts the velocity
u = ε − x₀, so x̂₀ = x − σ u and an Euler step is x ← x + (σ_next − σ) u,
down to σ = 0. Noise levels are shifted towards the noisy end by
σ' = s σ / (1 + (s − 1) σ) (HunyuanVideo: s = 7; Wan: 3 at 480p, 5 at 720p).
The model's timestep is 1000 σ' as float32, not rounded.

Two ways to choose σ, both diffusers':
- `set_timesteps(n)` (the default here): σ evenly spaced from σ_max to
  σ_min of the *shifted* training grid, then shifted again. The double shift
  is diffusers' behaviour, reproduced rather than fixed.
- explicit `sigmas`, shifted once: HunyuanVideoPipeline passes
  np.linspace(1, 0, n + 1)[:-1].

Only the static shift is supported (`use_dynamic_shifting=False`);
`load_scheduler` refuses configs that ask for more.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchEulerSchedule:
  """A schedule's constants; closed over by jitted code, not passed as a pytree."""
  sigmas: np.ndarray  # (num_steps + 1,) float32, descending, ending at 0
  timesteps: np.ndarray  # (num_steps,) float32: 1000 σ, the model's timestep at each step

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def init_state(self, x: jax.Array, key: jax.Array | None = None) -> tuple:
    del x, key  # one-step and deterministic: nothing to carry
    return ()

  def step(self, state: tuple, u: jax.Array, i: jax.Array,
           x: jax.Array) -> tuple[jax.Array, tuple, jax.Array]:
    """`loop.Scheduler.step`: one Euler step at step index i, and its x̂₀."""
    sigmas = jnp.asarray(self.sigmas)
    # σ_next − σ rounded in float32 before it multiplies u, as diffusers does.
    sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
    x32, u32 = x.astype(jnp.float32), u.astype(jnp.float32)
    return (x32 + dt * u32).astype(x.dtype), state, x32 - sigma * u32


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
  """σ' = s σ / (1 + (s − 1) σ), in sigmas' own dtype (diffusers mixes float32 and float64)."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_flow_match_schedule(num_steps: int, *, shift: float = 1.0,
                             num_train_timesteps: int = 1000,
                             sigmas: Sequence[float] | None = None) -> FlowMatchEulerSchedule:
  """The steps diffusers' scheduler takes after `set_timesteps(num_steps)` or `(sigmas=...)`.

  `sigmas` (num_steps values, descending in (0, 1]) replaces the default
  spacing, as HunyuanVideoPipeline does.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}")
  if shift <= 0:
    raise ValueError(f"shift must be positive, got {shift}")
  if sigmas is None:
    # σ_max and σ_min of the training grid i / N, i = N..1, shifted in float32 as
    # diffusers' constructor does; then evenly spaced between them and shifted again.
    n_train = num_train_timesteps
    train = shift_sigmas(np.arange(n_train, 0, -1, dtype=np.float32) / np.float32(n_train), shift)
    t = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, num_steps)
    sigmas = shift_sigmas(t / n_train, shift)  # float64
  else:
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.shape != (num_steps,):
      raise ValueError(f"sigmas must hold num_steps={num_steps} values, got shape {sigmas.shape}")
    if not (np.all(sigmas > 0) and np.all(sigmas <= 1) and np.all(np.diff(sigmas) < 0)):
      raise ValueError(f"sigmas must decrease within (0, 1], got {sigmas.tolist()}")
    sigmas = shift_sigmas(sigmas, shift)  # float32
  sigmas = sigmas.astype(np.float32)
  timesteps = sigmas * np.float32(num_train_timesteps)
  return FlowMatchEulerSchedule(np.append(sigmas, np.float32(0)), timesteps)
