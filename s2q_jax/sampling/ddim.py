"""CogVideoX's DDIM sampler (diffusers' `CogVideoXDDIMScheduler`, eta = 0) in JAX.

v-prediction on a scaled-linear beta schedule whose cumulative alphas are
SNR-shifted and rescaled to zero terminal SNR, "trailing" timestep spacing.
Per-step coefficients are computed once in float64 with numpy, as diffusers
does, and the sampling loop is a `lax.scan`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
  alphas_cumprod: np.ndarray  # (num_train_timesteps,) float64
  timesteps: np.ndarray  # (num_steps,) int32, descending
  # (num_steps, 4) float32 per step: sqrt(ᾱ_t), sqrt(1 − ᾱ_t), and the DDIM
  # update's a_t (weight of x_t) and b_t (weight of the predicted x_0).
  coefficients: np.ndarray

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)


def train_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                         beta_end: float = 0.012, snr_shift_scale: float = 3.0,
                         rescale_zero_snr: bool = True) -> np.ndarray:
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  ac = np.cumprod(1.0 - betas)
  ac = ac / (snr_shift_scale + (1 - snr_shift_scale) * ac)
  if rescale_zero_snr:  # Lin et al. 2024, Algorithm 1
    s = np.sqrt(ac)
    s0, s_last = s[0], s[-1]
    ac = ((s - s_last) * s0 / (s0 - s_last)) ** 2
  return ac


def make_schedule(num_inference_steps: int = 50, *, num_train_timesteps: int = 1000,
                  beta_start: float = 0.00085, beta_end: float = 0.012,
                  snr_shift_scale: float = 3.0, rescale_zero_snr: bool = True) -> DDIMSchedule:
  """CogVideoX-2B's scheduler config by default (5B uses snr_shift_scale=1.0)."""
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, "
                     f"got {num_inference_steps}")
  ac = train_alphas_cumprod(num_train_timesteps, beta_start, beta_end, snr_shift_scale,
                            rescale_zero_snr)
  ratio = num_train_timesteps / num_inference_steps
  timesteps = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
  prev = timesteps - num_train_timesteps // num_inference_steps
  a_t = ac[timesteps]
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)  # set_alpha_to_one
  coef_x = np.sqrt((1 - a_prev) / (1 - a_t))
  coef_x0 = np.sqrt(a_prev) - np.sqrt(a_t) * coef_x
  coefficients = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t), coef_x, coef_x0], axis=1)
  return DDIMSchedule(ac, timesteps.astype(np.int32), coefficients.astype(np.float32))


def _per_sample(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  v = jnp.asarray(values, jnp.float32)[t]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def add_noise(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε for integer timesteps t of shape (B,)."""
  ac = _per_sample(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise


def v_target(schedule: DDIMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """The v-prediction target sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0."""
  ac = _per_sample(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ac) * noise - jnp.sqrt(1 - ac) * x0


def ddim_step(schedule: DDIMSchedule, v: jax.Array, step: int | jax.Array,
              x: jax.Array) -> jax.Array:
  """x_{t_prev} from x_t and the model's v prediction at step index `step`."""
  sqrt_a, sqrt_b, coef_x, coef_x0 = jnp.asarray(schedule.coefficients)[step]
  x0 = sqrt_a * x - sqrt_b * v
  return coef_x * x + coef_x0 * x0


def guided(denoise_fn: Denoiser, x, cond, uncond, t, guidance_scale: float) -> jax.Array:
  """Classifier-free guidance: v_u + g (v_c − v_u), both halves in one batched call."""
  if guidance_scale == 1.0:
    return denoise_fn(x, cond, t)
  both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([uncond, cond]),
                    jnp.concatenate([t, t]))
  v_u, v_c = jnp.split(both, 2)
  return v_u + guidance_scale * (v_c - v_u)


def sample(denoise_fn: Denoiser, noise: jax.Array, cond: jax.Array, uncond: jax.Array,
           schedule: DDIMSchedule, *, guidance_scale: float = 1.0,
           return_trajectory: bool = False):
  """Runs every step of `schedule` from `noise` (B, F, C, H, W).

  `denoise_fn(x, cond, t)` returns the v prediction for timesteps t of shape
  (B,). With `return_trajectory`, also returns the model input x_t of every
  step, (num_steps, B, ...), and the timesteps; the final sample is x_{-1}.
  """
  steps = jnp.arange(len(schedule.timesteps))
  timesteps = jnp.asarray(schedule.timesteps)

  def body(x, step):
    t = jnp.full((x.shape[0],), timesteps[step], jnp.int32)
    v = guided(denoise_fn, x, cond, uncond, t, guidance_scale)
    return ddim_step(schedule, v.astype(x.dtype), step, x), x if return_trajectory else None

  out, trajectory = jax.lax.scan(body, noise, steps)
  if return_trajectory:
    return out, trajectory, timesteps
  return out


def initial_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, shape, jnp.float32)
