"""The candidate pool: every denoising step of the full-precision sampler on calibration prompts."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import nnx

from s2q_jax.generation import sampler


@dataclasses.dataclass
class Pool:
  latents: np.ndarray  # (P·S, F, C, H, W): model input x_t at each step
  previous: np.ndarray  # (P·S, F, C, H, W): x_{t-1}, the step's output
  timesteps: np.ndarray  # (P·S,)
  conditions: np.ndarray  # (P·S, L, D)

  def __len__(self) -> int:
    return len(self.timesteps)

  def take(self, idx: np.ndarray) -> "Pool":
    return Pool(self.latents[idx], self.previous[idx], self.timesteps[idx], self.conditions[idx])


def build_pool(model: nnx.Module, conditions: np.ndarray, uncond: np.ndarray, noise: np.ndarray,
               *, num_steps: int, guidance_scale: float) -> Pool:
  """Runs the sampler on each prompt, keeping (x_t, x_{t-1}, t, condition) of every step."""
  run = sampler(model, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
                return_trajectory=True)
  final, trajectory, timesteps = run(noise, conditions)
  traj = np.asarray(trajectory)  # (S, P, ...)
  prev = np.concatenate([traj[1:], np.asarray(final)[None]], axis=0)
  s, p = traj.shape[:2]
  return Pool(latents=traj.reshape(s * p, *traj.shape[2:]),
              previous=prev.reshape(s * p, *traj.shape[2:]),
              timesteps=np.repeat(np.asarray(timesteps), p),
              conditions=np.tile(np.asarray(conditions), (s, 1, 1)))


def save_pool(path: str, pool: Pool) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **dataclasses.asdict(pool))
  os.replace(tmp, path)


def load_pool(path: str) -> Pool:
  with np.load(path) as f:
    return Pool(**{k: f[k] for k in f.files})
