"""The sampling loop every scheduler runs in: classifier-free guidance and one `lax.scan`.

A scheduler (`Scheduler` below) is a frozen dataclass of per-step numpy
constants, computed once in float64 and cast to float32, with `timesteps`,
`init_state` and `step`. Its state is a pytree the scan carries: empty for
one-step methods, the last x̂₀ predictions for multistep ones, plus a PRNG
key for the stochastic CogVideoX DPM solver.

Every step also returns its x̂₀, the clean sample the (guided) model output
implies; the calibration pool ranks steps by how it changes, which for a
multistep or stochastic scheduler cannot be recovered from x_t and x_{t−1}.
Guidance follows the diffusers pipelines (one batched call on [uncond,
cond]); CogVideoXPipeline's `use_dynamic_cfg` (a per-step guidance scale)
is not implemented. No supported scheduler scales the model input
(diffusers' `scale_model_input` is the identity for all of them and the
initial noise has unit variance), so the loop has no hook for it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# denoise_fn(latents (B, F, C, H, W), cond (B, L, D), timesteps (B,)) -> the model output
# (v, or flow velocity); timesteps come in the scheduler's dtype (int32 or float32).
Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Scheduler(Protocol):
  """What `sample` needs from a scheduler."""

  timesteps: np.ndarray  # (num_steps,) the model's timestep at each step, noisiest first

  @property
  def num_steps(self) -> int: ...

  def init_state(self, x: jax.Array, key: jax.Array | None) -> Any:
    """The scan carry before step 0 (a pytree); `key` seeds stochastic steps."""

  def step(self, state: Any, model_output: jax.Array, i: jax.Array,
           x: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """(x at the next step in x's dtype, the new state, float32 x̂₀) for step index i."""


class Trajectory(NamedTuple):
  inputs: jax.Array  # (num_steps, B, ...) the model input x_t at each step, in noise's dtype
  timesteps: jax.Array  # (num_steps,) the model's timestep at each step
  predicted_x0: jax.Array  # (num_steps, B, ...) float32: each step's (guided) x̂₀


def guided(denoise_fn: Denoiser, x: jax.Array, cond: jax.Array, uncond: jax.Array, t: jax.Array,
           guidance_scale: float) -> jax.Array:
  """Classifier-free guidance: out_u + g (out_c − out_u), both halves in one batched call.

  As in the diffusers pipelines, g <= 1 means no guidance: one conditional
  call, `uncond` unused. g must be a Python number (it decides the traced
  program). The result is float32, as the pipelines upcast the model output.
  """
  if guidance_scale <= 1:
    return denoise_fn(x, cond, t).astype(jnp.float32)
  both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([uncond, cond]),
                    jnp.concatenate([t, t]))
  out_u, out_c = jnp.split(both.astype(jnp.float32), 2)
  return out_u + guidance_scale * (out_c - out_u)


def _check(noise, cond, uncond, guidance_scale):
  if not isinstance(guidance_scale, (int, float, np.number)):
    raise TypeError(f"guidance_scale must be a Python number, got {type(guidance_scale)}")
  if cond.shape != uncond.shape or cond.shape[0] != noise.shape[0]:
    raise ValueError(f"cond {cond.shape} and uncond {uncond.shape} must match, with the "
                     f"batch of noise {noise.shape}")


def _run(denoise_fn, noise, cond, uncond, scheduler, guidance_scale, key, keep_trajectory):
  _check(noise, cond, uncond, guidance_scale)
  timesteps = jnp.asarray(scheduler.timesteps)

  def body(carry, i):
    x, state = carry
    t = jnp.full((x.shape[0],), timesteps[i], timesteps.dtype)
    out = guided(denoise_fn, x, cond, uncond, t, guidance_scale)
    x_next, state, x0 = scheduler.step(state, out, i, x)
    return (x_next, state), ((x, x0) if keep_trajectory else None)

  init = (noise, scheduler.init_state(noise, key))
  (out, _), outputs = jax.lax.scan(body, init, jnp.arange(scheduler.num_steps))
  return out, outputs, timesteps


def sample(denoise_fn: Denoiser, noise: jax.Array, cond: jax.Array, uncond: jax.Array,
           schedule: Scheduler, *, guidance_scale: float = 1.0, return_trajectory: bool = False,
           key: jax.Array | None = None):
  """Runs every step of `schedule` from `noise` (B, F, C, H, W); returns x_0.

  `denoise_fn(x, cond, t)` gets x in noise's dtype, cond (B, L, D) (2B rows,
  [uncond; cond], under guidance) and timesteps t of shape (B,) (or 2B) in
  the schedule's dtype. `uncond` has cond's shape. `key` is required by
  stochastic schedulers (the CogVideoX DPM solver) and ignored by the rest.
  Trace this under `jax.jit` (the steps are one `lax.scan`). With
  `return_trajectory`, returns (x_0, inputs, timesteps): inputs[i] is the
  model input x_t at step i, (num_steps, B, ...); see `sample_trajectory`
  for the per-step x̂₀ as well.
  """
  out, outputs, timesteps = _run(denoise_fn, noise, cond, uncond, schedule, guidance_scale, key,
                                 return_trajectory)
  return (out, outputs[0], timesteps) if return_trajectory else out


def sample_trajectory(denoise_fn: Denoiser, noise: jax.Array, cond: jax.Array, uncond: jax.Array,
                      schedule: Scheduler, *, guidance_scale: float = 1.0,
                      key: jax.Array | None = None) -> tuple[jax.Array, Trajectory]:
  """`sample` that also returns every step's model input, timestep and x̂₀."""
  out, (inputs, x0), timesteps = _run(denoise_fn, noise, cond, uncond, schedule, guidance_scale,
                                      key, True)
  return out, Trajectory(inputs, timesteps, x0)


def initial_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Standard normal starting latents (every supported scheduler's init_noise_sigma is 1)."""
  return jax.random.normal(key, shape, dtype)

