"""The candidate pool: every denoising step of the full-precision sampler on calibration prompts.

A candidate is one (prompt, sampler step) position of a trajectory: the
model input x_t, the step's output x_{t−1}, the timestep and the prompt's
condition. Under classifier-free guidance the model also sees x_t with the
null condition at every step, so `model_inputs` can return each chosen
position's conditional input followed by its null-prompt twin.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.calibration.salience import diffusion_salience
from s2q_jax.generation import sampler
from s2q_jax.sampling import Scheduler


@dataclasses.dataclass
class Pool:
  latents: np.ndarray  # (N, F, C, H, W): model input x_t at each position
  previous: np.ndarray  # (N, F, C, H, W): x_{t-1}, the step's output
  timesteps: np.ndarray  # (N,) diffusion timesteps
  steps: np.ndarray  # (N,) sampler step index, 0 = noisiest
  x0_change: np.ndarray  # (N,) ‖x̂₀(t) − x̂₀(t−1)‖² / ‖x̂₀(t)‖² (see `build_pool`)
  conditions: np.ndarray  # (N, L, D)
  null_condition: np.ndarray  # (L, D): the classifier-free-guidance null prompt
  # The classifier-free scale the sampler applied: above 1 it also ran the model on the null
  # prompt at every step; 1 (a model that embeds its guidance) means it never did.
  guidance_scale: float

  def __len__(self) -> int:
    return len(self.timesteps)

  def prompt_index(self) -> np.ndarray:
    """(N,) which calibration prompt each position comes from (`build_pool`'s step-major order)."""
    steps = np.asarray(self.steps)
    per_step = int(np.sum(steps == 0))
    if per_step == 0 or len(steps) % per_step or not np.array_equal(
        steps, np.repeat(np.arange(len(steps) // per_step), per_step)):
      raise ValueError("prompt_index needs a whole pool in build_pool's order (step-major)")
    return np.arange(len(steps)) % per_step

  @property
  def sampled_uncond(self) -> bool:
    """Whether the sampler's model inputs included each position's null-prompt twin."""
    return float(self.guidance_scale) > 1

  def take(self, idx: np.ndarray) -> "Pool":
    return dataclasses.replace(self, **{name: getattr(self, name)[idx]
                                        for name in _PER_POSITION})

  def model_inputs(self, idx: np.ndarray, with_uncond: bool) -> "Pool":
    """Positions `idx` as model inputs; with `with_uncond`, each null-prompt twin after them."""
    chosen = self.take(np.asarray(idx))
    if not with_uncond:
      return chosen
    twins = dataclasses.replace(chosen, conditions=np.broadcast_to(
        self.null_condition, chosen.conditions.shape).copy())
    return dataclasses.replace(chosen, **{
        name: np.concatenate([getattr(chosen, name), getattr(twins, name)])
        for name in _PER_POSITION})


_PER_POSITION = ("latents", "previous", "timesteps", "steps", "x0_change", "conditions")


def build_pool(model: nnx.Module, conditions: np.ndarray, uncond: np.ndarray, noise: np.ndarray,
               *, num_steps: int, guidance_scale: float, scheduler: Scheduler | None = None,
               key: jax.Array | None = None) -> Pool:
  """Runs the sampler on each prompt, keeping every step of every trajectory.

  `scheduler` defaults to CogVideoX-2B's DDIM; `key` seeds a stochastic
  scheduler's step noise. `x0_change` compares the clean video x̂₀ the step
  predicted with the one the next step predicts (the final sample after the
  last step): the paper's "change of the denoised feature" read as the
  predicted x̂₀.
  """
  run = sampler(model, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
                return_trajectory=True, scheduler=scheduler)
  final, trajectory = run(noise, conditions, key)
  traj = np.asarray(trajectory.inputs)  # (S, P, ...)
  final = np.asarray(final)
  prev = np.concatenate([traj[1:], final[None]], axis=0)
  s, p = traj.shape[:2]
  steps = np.repeat(np.arange(s), p)
  flat = lambda a: a.reshape(s * p, *a.shape[2:])  # noqa: E731  step-major, like `steps`
  x0 = np.asarray(trajectory.predicted_x0)
  x0_next = np.concatenate([x0[1:], final[None].astype(x0.dtype)], axis=0)
  return Pool(latents=flat(traj), previous=flat(prev),
              timesteps=np.repeat(np.asarray(trajectory.timesteps), p), steps=steps,
              x0_change=np.asarray(diffusion_salience(jnp.asarray(flat(x0)),
                                                      jnp.asarray(flat(x0_next)))),
              conditions=np.tile(np.asarray(conditions), (s, 1, 1)),
              null_condition=np.asarray(uncond, np.float32), guidance_scale=float(guidance_scale))
