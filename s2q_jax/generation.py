"""Video generation with a (possibly quantized) model: jitted sampling in batches."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.sampling import make_schedule, sample


def sampler(model: nnx.Module, uncond: np.ndarray, *, num_steps: int, guidance_scale: float,
            return_trajectory: bool = False) -> Callable:
  """A jitted `f(noise, cond)` running the DDIM sampler with `model` (see `sampling.sample`)."""
  graphdef, state = nnx.split(model)
  schedule = make_schedule(num_inference_steps=num_steps)

  @jax.jit
  def run(state, noise, cond):
    # Merged at every step, inside the sampler's scan: a model that writes into its own
    # state while running (its `step_context`) may only do so in the trace it was made in.
    denoiser = lambda *args: nnx.merge(graphdef, state, copy=True)(*args)  # noqa: E731
    null = jnp.broadcast_to(uncond, cond.shape)
    return sample(denoiser, noise, cond, null, schedule, guidance_scale=guidance_scale,
                  return_trajectory=return_trajectory)

  return lambda noise, cond: run(state, jnp.asarray(noise), jnp.asarray(cond))


def generate(model: nnx.Module, noise: np.ndarray, cond: np.ndarray, uncond: np.ndarray, *,
             num_steps: int, guidance_scale: float, batch_size: int = 4,
             log: Callable[[str], None] | None = print, label: str = "videos") -> np.ndarray:
  """Denoises `noise` (N, F, C, H, W) under `cond` (N, L, D); returns (N, F, C, H, W) float32.

  `uncond` (L, D) is the null condition for classifier-free guidance. The
  same noise and conditions give the same videos for any model, so full
  precision and quantized outputs compare pixel by pixel.
  """
  run = sampler(model, uncond, num_steps=num_steps, guidance_scale=guidance_scale)
  out, start = [], time.perf_counter()
  for i in range(0, len(noise), batch_size):
    out.append(np.asarray(run(noise[i:i + batch_size], cond[i:i + batch_size]), np.float32))
    if log:
      done = min(i + batch_size, len(noise))
      log(f"  {label}: {done}/{len(noise)} ({time.perf_counter() - start:.0f}s)")
  return np.concatenate(out)
